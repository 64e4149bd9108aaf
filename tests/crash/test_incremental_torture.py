"""Incremental saves under kill -9: a child saves (with retention) and collects garbage in a
loop; the parent kills it at random instants and checks what every kill must leave.

The child's state is a function of the step whose chunks change a few at a time and come
back to earlier contents (so that saves reuse chunks, retention frees them, and a later
save needs bytes a removed step held). After each ``save`` returns, the child logs the step
with fsync and reports ``C``; every fourth step it runs ``gc`` (``G``). The parent kills it
either at a random time or a random moment after the k-th commit or gc report (a third of
the children save with ``incremental="auto"``, so full steps come among chunked ones), then
checks:

- ``restore()`` warns of no damage and returns the newest confirmed step or the next one,
  bit for bit; every committed step restores bit for bit;
- every chunk a committed step names exists; ``safepoint.check`` finds no damage, and after
  ``check(fix=True)`` nothing at all.

It never asserts how many kills landed inside a save: only what each kill must leave.
A second test runs a saving child and two collecting processes at once (the parent and a
child, each ``check(fix=True, min_age=...)`` in a loop, as ``safepoint gc`` in other
processes would) and then checks that no committed step lost a chunk.
"""

from __future__ import annotations

import os
import random
import signal
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_checkpointer_torture import ChildDied, Events, confirmed_steps

import child_processes
import safepoint
from child_processes import CONTEXT
from safepoint import Checkpointer, CorruptCheckpointWarning, knobs
from safepoint.format import read_manifest
from safepoint.format.chunks import chunk_entries
from safepoint.store import LocalStore

NAME = "inc"
KEEP = 3
CHUNK = 16 << 10
PIECES = 24
KILLS = 100
CHILD_LIFETIME_LIMIT = 20.0
EVENT_TIMEOUT = 30.0


PER_FILE = 4
"""knobs.CHUNKS_PER_FILE in the children: ``hot`` is one segment."""


def state_of(step: int) -> dict[str, Any]:
    """Chunk ``i`` of ``big`` holds one of three contents, chosen by the step: a few change
    per step, and earlier contents come back. ``hot`` (one segment of four chunks) changes
    whole at every step for six steps, so that its chunks share a file, then for six steps
    its last chunk only every other step, so that a step names part of such a file."""
    words = CHUNK // 8
    big = np.empty(PIECES * words, np.float64)
    for i in range(PIECES):
        version = (step // (i % 7 + 1)) % 3
        big[i * words : (i + 1) * words] = np.arange(words) * 1e-3 + i * 10 + version
    hot = np.empty(PER_FILE * words, np.float64)
    for i in range(PER_FILE):
        version = step // 2 if i == PER_FILE - 1 and (step // 6) % 2 else step
        hot[i * words : (i + 1) * words] = np.arange(words) * 1e-3 + i * 10 + version
    return {"big": big, "hot": hot, "tail": bytes([step % 256]) * (CHUNK + 100), "step": step}


def assert_state(actual: dict[str, Any], step: int) -> None:
    expected = state_of(step)
    assert list(actual) == list(expected)
    assert actual["big"].tobytes() == expected["big"].tobytes(), f"step {step}: big differs"
    assert actual["hot"].tobytes() == expected["hot"].tobytes(), f"step {step}: hot differs"
    assert actual["tail"] == expected["tail"] and actual["step"] == step


def child_main(store: Path, log: Path, events: Any, error_file: Path) -> None:
    """Continue from the newest step; save, confirm, collect garbage, until killed."""
    events_fd = events.fileno()
    try:
        knobs.CHUNK_BYTES, knobs.CHUNKS_PER_FILE = CHUNK, PER_FILE
        deadline = time.monotonic() + CHILD_LIFETIME_LIMIT
        latest = Checkpointer(NAME, location=store).latest_step()
        step = 0 if latest is None else latest + 1
        # a third of the children save with "auto": full saves at first (among chunked
        # steps of other children), incremental ones once a full save finds half of the
        # state unchanged since the one before
        mode = "auto" if step % 3 == 2 else True
        ckpt = Checkpointer(NAME, location=store, keep=KEEP, incremental=mode)  # type: ignore[arg-type]
        log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(events_fd, b"R")
        while time.monotonic() < deadline:
            with open(f"{log}.started", "a") as started:  # the steps a save was begun for
                started.write(f"{step}\n")
                started.flush()
                os.fsync(started.fileno())
            ckpt.save(step, state_of(step))
            os.write(log_fd, f"{step}\n".encode())
            os.fsync(log_fd)
            os.write(events_fd, b"C")
            if step % 4 == 3:
                ckpt.gc()  # no save in flight: every leftover may go
                os.write(events_fd, b"G")
            step += 1
        error_file.write_text("the child was never killed")
    except BaseException:
        error_file.write_text(traceback.format_exc())
    os._exit(3)


def check_after_kill(store: Path, log: Path) -> None:
    newest = max(confirmed_steps(log), default=None)
    local = LocalStore(store)
    ckpt = Checkpointer(NAME, location=local)
    steps = ckpt.steps()
    if newest is None and not steps:
        return
    assert newest is not None and newest in steps, (newest, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CorruptCheckpointWarning)
        restored = ckpt.restore()
    # the newest confirmed step, or a later one whose save began (a kill between a commit
    # and its confirmation, perhaps in several children in a row)
    begun = max(int(line) for line in Path(f"{log}.started").read_text().split())
    assert newest <= restored.step <= begun, (restored.step, newest, begun)
    for step in steps:
        for rel in chunk_entries(read_manifest(local, NAME, step)):
            assert local.exists(f"{NAME}/{rel}"), f"step {step} lost {rel}"
        assert_state(ckpt.restore(step).state, step)
    report = safepoint.check(local)
    assert report.ok, report.findings
    safepoint.check(local, fix=True)
    report = safepoint.check(local)
    assert report.clean, report.findings
    assert ckpt.steps() == steps


def test_the_states_share_chunk_files_and_name_parts_of_them(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """What the kills below land in: steps whose chunks share a file, and steps that name
    only part of such a file, while retention removes the steps that named all of it."""
    monkeypatch.setattr(knobs, "CHUNK_BYTES", CHUNK)
    monkeypatch.setattr(knobs, "CHUNKS_PER_FILE", PER_FILE)
    store = LocalStore(tmp_path / "s")
    ckpt = Checkpointer(NAME, location=store, keep=KEEP, incremental=True)
    shared, partly = set(), set()
    for step in range(14):
        ckpt.save(step, state_of(step))
        for _, (_, chunks) in chunk_entries(read_manifest(store, NAME, step)).items():
            (shared if len(chunks) == PER_FILE else partly if any(c.offset for c in chunks) else set()).add(step)
    assert shared and partly - shared
    ckpt.gc()  # the files of the step removed last (deleted a save later, for readers)
    ckpt.close()
    for step in ckpt.steps():
        assert_state(ckpt.restore(step).state, step)
    report = safepoint.check(store)
    assert report.clean, report.findings


@pytest.mark.timeout(240)
def test_kill_9_during_incremental_saves_retention_and_gc(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knobs, "CHUNK_BYTES", CHUNK)  # the parent reads what the child wrote
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    print(f"seed {seed}")
    store, log, error_file = tmp_path / "store", tmp_path / "confirmed.log", tmp_path / "error.txt"
    cycle = 0.01  # seconds per save, learned as we go
    for _ in range(KILLS):
        reader, writer = CONTEXT.Pipe(duplex=False)
        child = child_processes.start(child_main, store, log, writer, error_file)
        writer.close()
        events = Events(reader.fileno())
        try:
            events.wait_for(b"R")
            started = time.monotonic()
            where = rng.random()
            if where < 0.3:
                time.sleep(rng.uniform(0, 0.1))
            else:  # right after a commit (retention, the next save) or a gc
                mark = b"G" if where > 0.8 else b"C"
                events.wait_for(mark, rng.randint(1, 2))
                time.sleep(rng.uniform(0, cycle))
            os.kill(child.pid, signal.SIGKILL)
            lifetime = time.monotonic() - started
            child.join(EVENT_TIMEOUT)
            events.drain()
        except ChildDied:
            lifetime = 0.0
        finally:
            if child.exitcode is None:
                os.kill(child.pid, signal.SIGKILL)
            child.join(EVENT_TIMEOUT)
            reader.close()
        if child.exitcode != -signal.SIGKILL:
            detail = error_file.read_text() if error_file.exists() else "(no report)"
            pytest.fail(f"the child exited with {child.exitcode}:\n{detail}")
        saves = events.seen.count(b"C")
        if saves > 1:
            cycle = 0.8 * cycle + 0.2 * lifetime / saves
        check_after_kill(store, log)
    confirmed = confirmed_steps(log)
    assert confirmed == sorted(set(confirmed))


SLOW = 10
"""The concurrent test saves ``state_of(step // SLOW)``: chunks live long enough (hundreds
of milliseconds) to be older than the collectors' ``min_age`` when retention frees them, so
that only the running writer's lease keeps the collectors from them."""


def saver_main(store: Path, stop: Path, log: Path, error_file: Path) -> None:
    """Save until ``stop`` exists, then exit normally."""
    try:
        knobs.CHUNK_BYTES, knobs.CHUNKS_PER_FILE = CHUNK, PER_FILE
        ckpt = Checkpointer(NAME, location=store, keep=2, incremental=True)
        step = 0
        deadline = time.monotonic() + CHILD_LIFETIME_LIMIT
        while not stop.exists() and time.monotonic() < deadline:
            ckpt.save(step, state_of(step // SLOW))
            with open(log, "a") as out:
                out.write(f"{step}\n")
            step += 1
        ckpt.close()
    except BaseException:
        error_file.write_text(traceback.format_exc())
        os._exit(3)
    os._exit(0)


def collector_main(store: Path, stop: Path, error_file: Path) -> None:
    """Collect garbage as ``safepoint gc`` would, until ``stop`` exists."""
    try:
        knobs.CHUNK_BYTES, knobs.CHUNKS_PER_FILE = CHUNK, PER_FILE
        local = LocalStore(store)
        while not stop.exists():
            if store.exists():
                safepoint.check(local, fix=True, data=False, min_age=0.2)
            time.sleep(0.003)
    except BaseException:
        error_file.write_text(traceback.format_exc())
        os._exit(3)
    os._exit(0)


@pytest.mark.timeout(120)
def test_gc_in_another_process_never_takes_a_chunk_a_save_needs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knobs, "CHUNK_BYTES", CHUNK)
    store, stop = tmp_path / "store", tmp_path / "stop"
    log, error_file = tmp_path / "saved.log", tmp_path / "error.txt"
    child = child_processes.start(saver_main, store, stop, log, error_file)
    other = child_processes.start(collector_main, store, stop, tmp_path / "collector-error.txt")
    local = LocalStore(store)
    removed = 0
    try:
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            if store.exists():
                # min_age: a save's own new chunks are younger; the ones it reuses a kept
                # step names, so the stable pass sees them whatever their age.
                report = safepoint.check(local, fix=True, data=False, min_age=0.2)
                removed += sum("/chunks/" in f.key for f in report.removed)
            time.sleep(0.005)
    finally:
        stop.touch()
        for process in (child, other):
            process.join(EVENT_TIMEOUT)
            if process.exitcode is None:
                os.kill(process.pid, signal.SIGKILL)
                process.join(EVENT_TIMEOUT)
    assert child.exitcode == 0, error_file.read_text() if error_file.exists() else child.exitcode
    collector_error = tmp_path / "collector-error.txt"
    assert other.exitcode == 0, collector_error.read_text() if collector_error.exists() else other.exitcode
    saved = [int(line) for line in log.read_text().split()]
    assert len(saved) > 10
    # the writer was running all along: another process's gc leaves its leftovers alone
    assert removed == 0, f"{removed} chunk files removed while their writer was running"
    ckpt = Checkpointer(NAME, location=local)
    steps = ckpt.steps()
    assert steps == saved[-2:]
    for step in steps:
        for rel in chunk_entries(read_manifest(local, NAME, step)):
            assert local.exists(f"{NAME}/{rel}"), f"step {step} lost {rel}"
        restored = ckpt.restore(step).state
        assert_state(restored, restored["step"])
        assert restored["step"] == step // SLOW
    assert safepoint.check(local).ok
    safepoint.check(local, fix=True)
    assert safepoint.check(local).clean
