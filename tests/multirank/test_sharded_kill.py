"""Sharded saves under kill -9: one rank of a store-coordinated job dies at a random instant
of a save, then the job is torn down; every kill must leave the store consistent.

Each trial is one launch of ``world`` ranks (children of the tests' fork server: real
processes, started in milliseconds), each with a ``StoreGroup`` of a new run id and a
few MiB of its own shards. The newest committed step is ``k``; every rank builds its state
of step ``k + 1`` and says it is ready; the test lets them all start the save at once and
SIGKILLs one rank (any, the coordinator included):

- at an instant drawn uniformly from the save's measured duration (a little beyond it,
  so that kills just after the commit are drawn too), or
- right after a named point of the save, seen in the store: a rank's part of round 1 is
  published, the step's manifest is committed, the coordinator's round-2 outcome is out.

Then the other ranks go too: killed after a random delay (as torchrun tears a job down),
or, in some trials, left to give up on their own through a short ``StoreGroup`` timeout,
each of which must then raise ``GroupTimeout`` (or return, only if the step committed).

After every trial, whatever the kill hit:

- the newest committed step is ``k`` or ``k + 1``, and restores (nothing skipped as
  damaged) bit for bit to that step's global arrays, replicated values and per-rank values;
- step ``k`` still restores bit for bit;
- ``safepoint.check`` finds no damage (no committed manifest names a missing or damaged
  shard), and after ``gc`` (min_age 0) nothing is left over but the young ``ranks-*``
  exchange files (``gc`` keeps those for an hour by design: a live launch may still read
  them).

At the end a new launch restores the newest step collectively, each rank into ``Shard``
targets of its own block. Pass or fail never depends on where the kills landed: the seed
is printed, and the counts of where they landed only with ``-s``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import select
import signal
import statistics
import time
import traceback
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from multirank_support import (
    B_ROWS,
    COLS,
    NAME,
    ROWS,
    TINY,
    assert_clean_after_gc,
    global_state,
    rank_state,
)

import child_processes
from child_processes import CONTEXT
from safepoint import (
    Checkpointer,
    CorruptCheckpointWarning,
    GroupTimeout,
    SaveFailed,
    Shard,
    StoreGroup,
)
from state_checks import assert_identical

KEEP = 2  # retention removes the step before k while ranks are killed
LONG = 60.0  # the group timeout when the test tears the job down itself
SHORT = 0.6  # the group timeout when the survivors give up on their own
EVENT_TIMEOUT = 60.0
TRIALS = {2: 24, 3: 28}  # 8 and 15 of them after named points

DONE, TIMED_OUT, FAILED = b"D", b"T", b"F"


# ------------------------------------------------------------------- ranks


def rank_main(store: Path, rank: int, world: int, run_id: str, step: int, timeout: float,
              events: Any, go: Any, error_file: Path) -> None:
    """One rank of one launch: get ready, wait for the go, save ``step``, say how it went."""
    fd = events.fileno()
    try:
        group = StoreGroup(rank, world, run_id, timeout=timeout, poll=0.002)
        ckpt = Checkpointer(NAME, location=store, group=group, keep=KEEP)
        state = rank_state(step, rank, world)
        os.write(fd, b"R")
        if os.read(go.fileno(), 1) != b"G":
            os._exit(4)  # the test went away
        try:
            ckpt.save(step, state)
            outcome = DONE
        except GroupTimeout as exc:
            outcome, detail = TIMED_OUT, str(exc)
        except SaveFailed as exc:
            outcome, detail = FAILED, str(exc)
        if outcome != DONE:
            error_file.write_text(detail)
        os.write(fd, outcome)
    except BaseException:
        error_file.write_text(traceback.format_exc())
        os._exit(3)
    os._exit(0)


def restore_main(store: Path, rank: int, world: int, run_id: str, step: int, events: Any,
                 error_file: Path) -> None:
    """One rank of a relaunch: restore the newest step collectively into its own blocks."""
    try:
        group = StoreGroup(rank, world, run_id, timeout=LONG, poll=0.002)
        ckpt = Checkpointer(NAME, location=store, group=group)
        target = {
            "w": Shard(np.zeros((ROWS, COLS), np.float32), (rank * ROWS, 0), (world * ROWS, COLS)),
            "b": Shard(np.zeros(B_ROWS, np.int64), (rank * B_ROWS,), (world * B_ROWS,)),
            "tiny": Shard(np.zeros(TINY, np.int16), (rank * TINY,), (world * TINY,)),
        }
        restored = ckpt.restore(into=target)
        assert restored.step == step, (restored.step, step)
        expected = rank_state(step, rank, world)
        for key in ("w", "b", "tiny"):
            assert restored.state[key] is target[key]  # filled in place
            assert_identical(restored.state[key], expected[key], key)
        assert restored.state["step"] == step and restored.state["meta"] == expected["meta"]
        assert restored.state["mine"] == expected["mine"].value  # this rank's own
        os.write(events.fileno(), DONE)
    except BaseException:
        error_file.write_text(traceback.format_exc())
        os._exit(3)
    os._exit(0)


# ------------------------------------------------------------------ launches


class Launch:
    """``world`` rank processes, each with a pipe for its events and one for the go."""

    def __init__(self, target: Any, world: int, folder: Path, *args: Any) -> None:
        self.run_id = uuid.uuid4().hex
        self.children: list[Any] = []
        self.events: list[Any] = []
        self.goes: list[Any] = []
        self.seen: list[bytes] = [b""] * world
        self.errors = [folder / f"rank-{r}.txt" for r in range(world)]
        for error in self.errors:
            error.unlink(missing_ok=True)
        for rank in range(world):
            reader, writer = CONTEXT.Pipe(duplex=False)
            go_reader, go_writer = CONTEXT.Pipe(duplex=False)
            extra = (go_reader,) if target is rank_main else ()
            self.children.append(child_processes.start(
                target, *args[:1], rank, world, self.run_id, *args[1:], writer, *extra,
                self.errors[rank]))
            writer.close()
            go_reader.close()
            self.events.append(reader)
            self.goes.append(go_writer)

    def wait_for(self, event: bytes, ranks: list[int] | None = None) -> None:
        """Until each of ``ranks`` (all) has sent ``event``; a rank that exits first fails."""
        ranks = list(range(len(self.children))) if ranks is None else ranks
        deadline = time.monotonic() + EVENT_TIMEOUT
        while True:
            waiting = [r for r in ranks if event not in self.seen[r]]
            if not waiting:
                return
            left = deadline - time.monotonic()
            assert left > 0, f"ranks {waiting} sent no {event!r} in {EVENT_TIMEOUT} s"
            ready, _, _ = select.select([self.events[r].fileno() for r in waiting], [], [], left)
            for fd in ready:
                rank = next(r for r in waiting if self.events[r].fileno() == fd)
                data = os.read(fd, 64)
                if not data:
                    self.join()
                    pytest.fail(f"rank {rank} exited ({self.children[rank].exitcode}) before "
                                f"{event!r}: {self.error(rank)}")
                self.seen[rank] += data

    def go(self) -> float:
        for pipe in self.goes:
            os.write(pipe.fileno(), b"G")
        return time.monotonic()

    def kill(self, rank: int) -> None:
        if self.children[rank].exitcode is None:
            with contextlib.suppress(ProcessLookupError):  # it has just ended by itself
                os.kill(self.children[rank].pid, signal.SIGKILL)

    def join(self, timeout: float = EVENT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for child in self.children:
            child.join(max(0.0, deadline - time.monotonic()))
        alive = [r for r, c in enumerate(self.children) if c.exitcode is None]
        for rank in alive:
            self.kill(rank)
            self.children[rank].join(EVENT_TIMEOUT)
        assert not alive, f"ranks {alive} still ran {timeout} s after they should have ended"

    def drain(self, rank: int) -> None:
        """Read what a dead rank sent (its pipe is closed: reads end)."""
        fd = self.events[rank].fileno()
        while select.select([fd], [], [], 0)[0]:
            data = os.read(fd, 64)
            if not data:
                return
            self.seen[rank] += data

    def close(self) -> None:
        for rank, child in enumerate(self.children):
            if child.exitcode is None:
                self.kill(rank)
                child.join(EVENT_TIMEOUT)
        for pipe in self.events + self.goes:
            pipe.close()

    def error(self, rank: int) -> str:
        return self.errors[rank].read_text() if self.errors[rank].exists() else "(no report)"

    def exchange_file(self, store: Path, seq: int, rank: int) -> Path:
        run = hashlib.sha256(self.run_id.encode()).hexdigest()[:12]
        return store / NAME / f"ranks-{run}" / f"{seq:08d}-{rank}.json"


def clean_save(store: Path, folder: Path, world: int, step: int) -> float:
    """A save with no kill; returns how long it took from the go to the last rank's return."""
    launch = Launch(rank_main, world, folder, store, step, LONG)
    try:
        launch.wait_for(b"R")
        started = launch.go()
        launch.wait_for(DONE)
        took = time.monotonic() - started
        launch.join()
    finally:
        launch.close()
    assert all(c.exitcode == 0 for c in launch.children)
    return took


# ------------------------------------------------------------------ one trial


def schedule(world: int, trials: int, rng: random.Random) -> list[tuple[int, str | None, bool]]:
    """(victim, named point or None for a uniform instant, whether the survivors give up on
    their own) of each trial: every victim after every named point once (the survivors
    time out by themselves after the commit points), then uniform instants, in a shuffled
    order."""
    points = [f"part {r}" for r in range(world)] + ["manifest", "outcome"]
    named = [(victim, point, point in ("manifest", "outcome"))
             for victim in range(world) for point in points]
    uniform: list[tuple[int, str | None, bool]] = [
        (rng.randrange(world), None, rng.random() < 0.15) for _ in range(trials - len(named))]
    plan = named + uniform
    rng.shuffle(plan)
    return plan


def kill_trial(store: Path, folder: Path, world: int, k: int, window: float,
               rng: random.Random, plan: tuple[int, str | None, bool], tally: Counter[str]) -> None:
    """Save step k + 1 in a new launch, kill one rank somewhere in it, tear the job down,
    check what every kill must leave."""
    victim, point, on_their_own = plan
    step = k + 1
    before = Checkpointer(NAME, location=store).steps()
    launch = Launch(rank_main, world, folder, store, step, SHORT if on_their_own else LONG)
    try:
        launch.wait_for(b"R")
        if point is None:
            delay = rng.uniform(0, 1.2 * window)
            started = launch.go()
            time.sleep(max(0.0, started + delay - time.monotonic()))
        else:
            if point.startswith("part"):  # rank r published its part of round 1
                mark = launch.exchange_file(store, 0, int(point.split()[1]))
            elif point == "manifest":  # the step is committed
                mark = store / NAME / f"{step:012d}.json"
            else:  # the coordinator published the outcome (round 2)
                mark = launch.exchange_file(store, 1, 0)
            started = launch.go()
            deadline = started + 10 * window + 5.0
            looks = 0
            while not mark.exists() and time.monotonic() < deadline:
                looks += 1
                if looks % 200 == 0 and all(c.exitcode is not None for c in launch.children):
                    break  # the save ended without it (a rank gave up early): kill anyway
                time.sleep(0.0002)
        launch.kill(victim)
        where = "uniform" if point is None else f"after {point.split()[0]}"
        tally[f"{where}, victim {'coordinator' if victim == 0 else 'rank'}"] += 1
        survivors = [r for r in range(world) if r != victim]
        if on_their_own:
            launch.join()  # each must give up by itself, and exit
            for rank in survivors:
                assert launch.children[rank].exitcode == 0, (
                    f"rank {rank} exited {launch.children[rank].exitcode}: {launch.error(rank)}")
                launch.drain(rank)
                assert launch.seen[rank][-1:] in (DONE, TIMED_OUT), (
                    f"rank {rank} said {launch.seen[rank]!r}: {launch.error(rank)}")
                tally["survivor returned" if DONE in launch.seen[rank] else "survivor timed out"] += 1
        else:
            time.sleep(rng.uniform(0, window / 2))
            for rank in survivors:
                launch.kill(rank)
            launch.join()
        for rank in range(world):
            launch.drain(rank)
    finally:
        launch.close()
    returned = [r for r in range(world) if DONE in launch.seen[r]]
    check_after_kill(store, world, k, before, returned)
    tally["committed" if Checkpointer(NAME, location=store).latest_step() == step else "not committed"] += 1


def check_after_kill(store: Path, world: int, k: int, before: list[int], returned: list[int]) -> None:
    """``before``: the committed steps before the trial (retention after a commit removes
    the older ones; a kill just after the commit can leave them, until a later commit)."""
    ckpt = Checkpointer(NAME, location=store)
    newest, steps = ckpt.latest_step(), ckpt.steps()
    assert newest in (k, k + 1), f"newest step {newest} after a save of {k + 1} from {k}"
    assert steps[-1] == newest and k in steps and set(steps) <= {*before, k + 1}, (before, steps)
    if newest == k:  # no commit: no retention either
        assert steps == before, (before, steps)
    if returned:  # a rank's save returned: the step was committed
        assert newest == k + 1, f"ranks {returned} returned from a save that did not commit"
    with warnings.catch_warnings():
        warnings.simplefilter("error", CorruptCheckpointWarning)  # nothing may be damaged
        restored = ckpt.restore()
    assert restored.step == newest
    assert_identical(restored.state, global_state(newest, world))
    if newest != k:
        assert_identical(ckpt.restore(step=k).state, global_state(k, world))
    assert_clean_after_gc(store)


# ------------------------------------------------------------------ the test


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", sorted(TRIALS))
def test_kill_9_of_any_rank_during_a_sharded_save(world: int, tmp_path: Path) -> None:
    seed = random.randrange(1 << 32)
    print(f"world {world}: seed {seed}")  # shown with a failure, to replay it
    rng = random.Random(seed)
    store = tmp_path / "store"
    windows = [clean_save(store, tmp_path, world, step) for step in (1, 2, 3)]
    window = statistics.median(windows)  # the save's duration, from the go to the last return
    assert Checkpointer(NAME, location=store).steps() == [2, 3]  # keep=2
    tally: Counter[str] = Counter()
    for plan in schedule(world, TRIALS[world], rng):
        k = Checkpointer(NAME, location=store).latest_step()
        assert k is not None
        kill_trial(store, tmp_path, world, k, window, rng, plan, tally)
    print(f"world {world}: save window {window * 1000:.0f} ms; {dict(tally)}")
    newest = Checkpointer(NAME, location=store).latest_step()
    assert newest is not None
    launch = Launch(restore_main, world, tmp_path, store, newest)
    try:
        launch.wait_for(DONE)
        launch.join()
    finally:
        launch.close()
    assert all(c.exitcode == 0 for c in launch.children), [launch.error(r) for r in range(world)]
    assert_clean_after_gc(store)
