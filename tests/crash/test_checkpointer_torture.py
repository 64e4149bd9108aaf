"""The Checkpointer under kill -9: hundreds of SIGKILLs at random instants, many inside saves.

A child process saves a growing sequence of states; after each ``save`` returns (for an
asynchronous save: after ``wait()`` confirms it) it appends the step to a log with fsync.
The parent kills it with SIGKILL, then checks that:

- ``restore()`` succeeds without skipping anything damaged, and returns the newest step the
  log confirms, or the one after it (committed just before the kill, not yet logged);
- the restored state is bit for bit the state of that step (every value is a function of
  the step, so it can be rebuilt and compared);
- every remaining step passes ``verify_checkpoint``, and ``gc`` removes only leftovers.

Then it starts a new child, which continues from the restored step, as a restarted job
would. Children are forked by the tests' fork server (child_processes.py: no interpreter
start-up per kill, no thread of pytest's inherited), and each is a real process killed by a
real SIGKILL.
"""

from __future__ import annotations

import os
import random
import select
import signal
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import child_processes
import safepoint
from child_processes import CONTEXT
from safepoint import Checkpointer, CorruptCheckpointWarning
from safepoint.checkpointer import collect_garbage
from safepoint.format import read_manifest, step_of_folder, step_of_manifest, verify_checkpoint
from safepoint.store import LocalStore
from state_checks import assert_identical

NAME = "torture"
KEEP = 2  # retention deletes old steps while the child may be killed
CHILD_LIFETIME_LIMIT = 20.0  # seconds; a child the parent forgot stops by itself
EVENT_TIMEOUT = 30.0
N_LARGE = 1_500_000  # the large state: 6 + 12 + 6 + 12 MB in four arrays


@dataclass(frozen=True)
class Variant:
    label: str
    large: bool
    blocking: bool
    kills: int


VARIANTS = [
    Variant("small-sync", large=False, blocking=True, kills=80),
    Variant("small-async", large=False, blocking=False, kills=40),
    Variant("large-sync", large=True, blocking=True, kills=45),
    Variant("large-async", large=True, blocking=False, kills=45),
]


# ----------------------------------------------------------- states by step


def small_state(step: int) -> dict[str, Any]:
    """A small tree whose shape and content change with ``step``; ``blob`` is large enough
    to be stored as a separate file, ``vec`` is inline in the manifest."""
    return {
        "step": step,
        "label": f"step {step}",
        "history": list(range(step % 13)),
        "pair": (step, -step, float(step) / 3),
        "vec": np.arange(step % 50 + 1, dtype=np.int64) * step,
        "blob": np.full(600 + step % 7, step, dtype=np.float64),
        "raw": bytes([step % 256]) * (step % 5),
    }


def large_arrays() -> dict[str, np.ndarray]:
    return {
        "f32": np.empty(N_LARGE, np.float32),
        "f64": np.empty((1500, N_LARGE // 1500), np.float64),
        "i32": np.empty(N_LARGE, np.int32),
        "u8": np.empty(8 * N_LARGE, np.uint8),
    }


def fill_large(state: dict[str, Any], step: int) -> None:
    """Set every value of a large state to the one of ``step``, in place."""
    arrays = state["arrays"]
    index = np.arange(N_LARGE)
    np.multiply(index.astype(np.float32), np.float32(0.5), out=arrays["f32"])
    arrays["f32"] += np.float32(step)
    np.add(index.reshape(arrays["f64"].shape) * 0.25, step, out=arrays["f64"])
    np.bitwise_xor(index.astype(np.int32), np.int32(step), out=arrays["i32"])
    arrays["u8"][:] = np.uint8(step % 251)
    arrays["u8"][step % arrays["u8"].size] = 255
    state["step"] = step
    state["label"] = f"large {step}"


def large_state(step: int) -> dict[str, Any]:
    state: dict[str, Any] = {"arrays": large_arrays()}
    fill_large(state, step)
    return state


def expected_state(variant: Variant, step: int) -> dict[str, Any]:
    return large_state(step) if variant.large else small_state(step)


# ------------------------------------------------------------------- child


def scribble(state: Any) -> None:
    """Overwrite every array of ``state``: an asynchronous save must have copied them."""
    if isinstance(state, dict):
        for value in state.values():
            scribble(value)
    elif isinstance(state, np.ndarray) and state.size:
        state.view(np.uint8)[...] = 0xA5


def child_main(store: Path, log: Path, variant: Variant, events: Any, error_file: Path) -> None:
    """Restore, then save step after step until killed; log each confirmed step."""
    events_fd = events.fileno()  # the write end of a pipe
    try:
        deadline = time.monotonic() + CHILD_LIFETIME_LIMIT
        ckpt = Checkpointer(NAME, location=store, keep=KEEP)
        if ckpt.latest_step() is None:
            step = 0
            state = expected_state(variant, 0)
        else:
            restored = ckpt.restore()
            step = restored.step + 1
            state = restored.state
            if variant.large:
                fill_large(state, step)  # continue from the restored arrays, in place
            else:
                state = small_state(step)
        log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(events_fd, b"R")
        while time.monotonic() < deadline:
            os.write(events_fd, b"S")
            ckpt.save(step, state, blocking=variant.blocking)
            if not variant.blocking:
                scribble(state)
                ckpt.wait()
            os.write(log_fd, f"{step}\n".encode())  # only now is the step confirmed
            os.fsync(log_fd)
            step += 1
            if variant.large:
                fill_large(state, step)
            else:
                state = small_state(step)
        error_file.write_text("the child was never killed")
    except BaseException:
        error_file.write_text(traceback.format_exc())
    os._exit(3)


# ------------------------------------------------------------------ parent


class Events:
    """Bytes the child writes to a pipe: R (ready), S (a save starts)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.seen: list[bytes] = []

    def wait_for(self, event: bytes, count: int = 1) -> None:
        deadline = time.monotonic() + EVENT_TIMEOUT
        while self.seen.count(event) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"no event {event!r} from the child in {EVENT_TIMEOUT} s"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready and not self._read():
                raise ChildDied

    def drain(self) -> None:
        """Read what is left once the child is dead."""
        while self._read():
            pass

    def _read(self) -> bool:
        data = os.read(self.fd, 4096)
        self.seen.extend(bytes([b]) for b in data)
        return bool(data)


class ChildDied(Exception):
    """The child closed the pipe: it exited by itself."""


def confirmed_steps(log: Path) -> list[int]:
    if not log.exists():
        return []
    lines = log.read_text().split("\n")
    return [int(line) for line in lines[:-1]]  # the last entry lacks its newline if cut


def check_store(store: Path, steps: list[int]) -> None:
    """After gc, the store holds exactly the committed steps, each intact, and no leftover."""
    local = LocalStore(store)
    for entry in (store / NAME).iterdir():
        if entry.name in ("latest.json", "lease", ".lock"):
            continue  # the newest-step record; the writer's lease and its commit lock
        step = step_of_manifest(entry.name) if entry.is_file() else step_of_folder(entry.name)
        assert step is not None and step in steps, f"gc left {entry}"
        report = verify_checkpoint(local, NAME, step)
        assert report.ok, f"{entry}: {report.problems}"
        if entry.is_dir():
            files = {rel.rsplit("/", 1)[1] for rel, _ in read_manifest(local, NAME, step).files}
            assert {f.name for f in entry.iterdir()} == files, f"gc left files in {entry}"


def check_after_kill(variant: Variant, store: Path, log: Path, previous: int | None) -> int | None:
    """The invariants after a kill; returns the restored step (``previous``: the one the
    killed child started from)."""
    newest = max(confirmed_steps(log), default=None)
    ckpt = Checkpointer(NAME, location=store)
    steps = ckpt.steps()
    if not steps:
        assert newest is None, f"step {newest} was confirmed, but nothing is committed"
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("error", CorruptCheckpointWarning)  # nothing may be damaged
        restored = ckpt.restore()
    # At least the newest confirmed step; at most the step the child was saving when killed
    # (each save starts only after the previous one was confirmed).
    floor = max(-1 if newest is None else newest, -1 if previous is None else previous)
    assert floor <= restored.step <= floor + 1, (
        f"restored step {restored.step}, newest confirmed {newest}, the child started after "
        f"{previous}, committed {steps}")
    assert_identical(restored.state, expected_state(variant, restored.step))
    collect_garbage(ckpt.store, NAME)  # the child is dead: every leftover may go
    assert ckpt.steps() == steps
    check_store(store, steps)
    report = safepoint.check(store)
    assert report.ok and report.clean, report.findings
    return restored.step


def torture(variant: Variant, folder: Path, rng: random.Random) -> tuple[list[int | None], int]:
    """Kill a saving child ``variant.kills`` times. Returns the restored step after each
    kill, and how many saves were certainly confirmed before their child was killed."""
    store, log, error_file = folder / "store", folder / "confirmed.log", folder / "child-error.txt"
    cycle = 0.005 if not variant.large else 0.05  # seconds per save, learned as we go
    restored: list[int | None] = [None]
    certain = 0
    for _ in range(variant.kills):
        reader, writer = CONTEXT.Pipe(duplex=False)  # raw bytes through its file descriptors
        child = child_processes.start(child_main, store, log, variant, writer, error_file)
        writer.close()
        read_fd = reader.fileno()
        events = Events(read_fd)
        try:
            events.wait_for(b"R")
            started = time.monotonic()
            if rng.random() < 0.5:  # anywhere
                time.sleep(rng.uniform(0, 0.15))
            else:  # inside (or right around) a save
                count = rng.randint(1, 3)
                events.wait_for(b"S", count)
                certain += count - 1  # a save starts once the one before it is confirmed
                time.sleep(rng.uniform(0, cycle))
            os.kill(child.pid, signal.SIGKILL)
            lifetime = time.monotonic() - started
            child.join(EVENT_TIMEOUT)
            events.drain()
        except ChildDied:
            lifetime = 0.0
        finally:
            if child.exitcode is None:  # a failed wait: never leave a child behind
                os.kill(child.pid, signal.SIGKILL)
            child.join(EVENT_TIMEOUT)
            reader.close()
        if child.exitcode != -signal.SIGKILL:
            detail = error_file.read_text() if error_file.exists() else "(no report)"
            pytest.fail(f"{variant.label}: the child exited with {child.exitcode}:\n{detail}")
        saves = events.seen.count(b"S")
        if saves > 1:
            cycle = 0.8 * cycle + 0.2 * lifetime / saves
        restored.append(check_after_kill(variant, store, log, restored[-1]))
    return restored[1:], certain


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("variant", VARIANTS, ids=[v.label for v in VARIANTS])
def test_kill_9_during_saves_never_loses_a_confirmed_step(variant: Variant, tmp_path: Path) -> None:
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    print(f"{variant.label}: seed {seed}")  # shown with a failure, to replay it
    restored, certain = torture(variant, tmp_path, rng)
    assert len(restored) == variant.kills
    confirmed = confirmed_steps(tmp_path / "confirmed.log")
    assert len(confirmed) >= certain
    assert confirmed == sorted(set(confirmed))  # no step was ever saved twice
    progressed = [step for step in restored if step is not None]
    assert progressed == sorted(progressed)  # restarts moved forward, never back
    assert not confirmed or progressed[-1] >= confirmed[-1]
