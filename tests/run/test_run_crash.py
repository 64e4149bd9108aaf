"""Real crashes: child processes killed with SIGKILL at random instants while they sum a
stream, and interrupted by SIGINT/SIGTERM in the middle of an item.

After every crash the child is started again and resumes; the final sum must equal the
plain sum, the output file must hold each input record exactly once, and a checkpoint
never holds a half-processed item.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from run_helpers import saved, start_child, write_numbers

import safepoint.run as runs
from safepoint.policy import every, manual
from safepoint.store import open_store

LINES = 200_000
NAME = "torture"


def sum_stream(conn: Any, path: str, store: str, out: str, progress: Any) -> None:
    """The child: sum the stream, copying each line to the output."""
    with runs.resume(NAME, location=store, policy=every(items=1000), keep_completed=True) as run:
        run.state.setdefault("total", 0)
        run.state.setdefault("count", 0)
        sink = run.open_output(out)
        conn.send("ready")
        for line in run.lines(path):
            run.state["total"] += int(line)
            run.state["count"] += 1
            sink.write(line)
            if run.state["count"] % 100 == 0:
                progress.value = run.durable_position or 0


def sum_stream_async(conn: Any, path: str, store: str, out: str, progress: Any) -> None:
    """The async child: ``alines`` with background commits; it publishes, every 100 lines,
    the position of the newest commit that has been written."""

    async def main() -> None:
        async with runs.resume(NAME, location=store, policy=every(items=1000), commit="async",
                               keep_completed=True) as run:
            run.state.setdefault("total", 0)
            run.state.setdefault("count", 0)
            sink = run.open_output(out)
            conn.send("ready")
            async for line in run.alines(path):
                run.state["total"] += int(line)
                run.state["count"] += 1
                sink.write(line)
                if run.state["count"] % 100 == 0:
                    progress.value = run.durable_position or 0

    asyncio.run(main())


def torture(tmp_path: Path, child: Callable[..., None], kills: int, seed: int) -> int:
    """Kill ``child`` ``kills`` times; returns the number of file passes.

    The kills land where the test decides: each picks a line count at random, waits until
    the child reports that a commit at or past it is written, then waits a random few
    milliseconds more, so every kill hits a stream in progress after a known commit, however
    loaded the machine is. Each pass sums the file to the end through as many kills as it
    takes; then the result is checked and the run removed, and the next pass starts.
    """
    from child_processes import CONTEXT

    rng = random.Random(seed)
    path = tmp_path / "numbers.txt"
    values = write_numbers(path, LINES, seed)
    store, out = tmp_path / "store", tmp_path / "out.txt"
    progress = CONTEXT.Value("q", 0, lock=False)  # no lock a killed child could leave held
    killed = passes = 0
    while True:
        process, conn = start_child(child, str(path), str(store), str(out), progress)
        assert conn.poll(30), "the child did not start"
        conn.recv()
        if killed < kills:
            target = rng.randrange(1000, LINES - 1000)
            deadline = time.monotonic() + 120
            while progress.value < target and process.is_alive():
                assert time.monotonic() < deadline, "the child stopped making progress"
                time.sleep(0.001)
            time.sleep(rng.uniform(0.0, 0.02))
            seen = progress.value
            try:
                os.kill(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it finished the file first: a completed pass, checked below
            else:
                process.join()
                if process.exitcode == -signal.SIGKILL:
                    killed += 1
                    check_after_kill(store, seen)
                    continue
        process.join()
        assert process.exitcode == 0
        passes += 1
        check_complete(store, values, path, out)
        if killed >= kills:
            return passes
        open_store(store).delete(NAME)
        progress.value = 0


def check_after_kill(store: Path, durable_seen: int) -> None:
    """What every kill must leave: a checkpoint at least as new as the newest commit the
    child reported written, holding whole items only."""
    found = saved(store, NAME)
    assert found is not None, "a commit was reported written, but nothing is saved"
    record = found.record
    if record.complete:
        return  # the kill came after the end
    assert found.state["count"] == record.position  # never a half-processed item
    assert record.position % 1000 == 0 or record.finished
    assert record.position >= durable_seen  # no commit known to be written is lost


def check_complete(store: Path, values: list[int], path: Path, out: Path) -> None:
    found = saved(store, NAME)
    assert found is not None and found.record.complete
    assert found.state == {"total": sum(values), "count": len(values)}
    assert out.read_bytes() == path.read_bytes()  # every record exactly once


@pytest.mark.slow
def test_sigkill_torture_on_a_stream(tmp_path: Path) -> None:
    assert torture(tmp_path, sum_stream, kills=100, seed=11) >= 1


@pytest.mark.slow
def test_sigkill_torture_on_an_async_stream_with_background_commits(tmp_path: Path) -> None:
    assert torture(tmp_path, sum_stream_async, kills=20, seed=12) >= 1


def slow_items(conn: Any, store: str, policy: Any) -> None:
    """The child: each item updates ``a``, reports that it is inside the item, sleeps,
    then updates ``b``; a half-processed item would leave ``a != b``."""
    with runs.resume("slow", location=store, policy=policy) as run:
        for i in run.range(1000):
            run.state["a"] = run.state.get("a", 0) + i
            conn.send(i)
            time.sleep(0.05)
            run.state["b"] = run.state.get("b", 0) + i


def interrupt(store: Path, signum: int, at_item: int, policy: Any, second: bool = False) -> int | None:
    process, conn = start_child(slow_items, str(store), policy)
    while True:
        assert conn.poll(30), "the child stopped reporting"
        item = conn.recv()
        if item == at_item:
            break
    os.kill(process.pid, signum)
    if second:
        time.sleep(0.01)
        os.kill(process.pid, signum)
    process.join(30)
    return process.exitcode


@pytest.mark.parametrize(("signum", "exitcode"), [(signal.SIGINT, 1), (signal.SIGTERM, 143)])
def test_a_signal_inside_an_item_checkpoints_after_that_item(tmp_path: Path, signum: int, exitcode: int) -> None:
    store = tmp_path / "store"
    at_item = random.Random(signum).randint(3, 12)
    assert interrupt(store, signum, at_item, manual()) == exitcode
    found = saved(store, "slow")
    assert found.record.position == at_item + 1  # the interrupted item was finished, then saved
    assert found.state == {"a": sum(range(at_item + 1)), "b": sum(range(at_item + 1))}
    with runs.resume("slow", location=store) as run:
        assert next(iter(run.range(1000))) == at_item + 1
        raise_to_keep = run.attempt
    assert raise_to_keep == 2


def test_a_second_signal_stops_at_once_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert interrupt(store, signal.SIGINT, 5, every(items=1), second=True) == 1
    found = saved(store, "slow")
    assert found.record.position == 5  # items 0-4; item 5 was abandoned half-way
    assert found.state == {"a": sum(range(5)), "b": sum(range(5))}


def test_signal_handlers_are_restored_after_the_run(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with runs.resume("job", location=tmp_path / "store") as run:
        assert signal.getsignal(signal.SIGINT) != before[0]
        list(run.range(3))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
