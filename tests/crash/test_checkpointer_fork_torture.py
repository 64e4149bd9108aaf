"""Copy-on-write snapshots (``snapshot="fork"``) under kill -9: the snapshot process killed
while it writes, and the saving process killed while its snapshot process writes.

A saving process (a child of the tests' fork server, with its lease heartbeat and committer
threads: a multi-threaded process) saves step after step with ``save(blocking=False)`` in
fork mode, scribbles over its arrays the moment ``save`` returns (the snapshot must not see
that), and logs a step with fsync once ``wait()`` confirmed it. Every blob write of a
snapshot process announces itself and its pid on a pipe, so the test decides where each kill
lands: at a random offset after the k-th blob write began, in the snapshot process or in the
saving process. After each cycle, once every process is gone (the pipe reaches its end only
when the orphaned snapshot process has exited too), the store must hold:

- the newest confirmed step or a newer one that was in flight, restored bit for bit (every
  value is a function of the step), with nothing damaged skipped;
- every committed step intact, ``safepoint.check`` finding no damage, and clean once its
  ``fix=True`` removed the leftovers of killed saves;
- a killed snapshot process reported to the saving process as a ``SaveFailed`` that names
  the SIGKILL (unless the kill came after its report).
"""

from __future__ import annotations

import os
import random
import select
import signal
import time
import traceback
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import child_processes
import safepoint
from child_processes import CONTEXT
from safepoint import Checkpointer, CorruptCheckpointWarning
from safepoint.errors import SaveFailed
from safepoint.store import LocalStore
from safepoint.store.base import Buffer

NAME = "forked"
CYCLES = 40
CHILD_LIFETIME_LIMIT = 20.0  # seconds; a saving process the test forgot stops by itself
EVENT_TIMEOUT = 30.0
N_F32 = 1_100_000  # 4.4 MB: a data file of its own
N_I64 = 600_000  # 4.8 MB: another one
N_U8 = 100_000  # packed with the small leaves


def make_state(step: int) -> dict[str, Any]:
    state: dict[str, Any] = {"f32": np.empty(N_F32, np.float32), "i64": np.empty(N_I64, np.int64),
                             "u8": np.empty(N_U8, np.uint8)}
    fill(state, step)
    return state


def fill(state: dict[str, Any], step: int) -> None:
    """Set every value of the state to the one of ``step``, in place."""
    np.multiply(np.arange(N_F32, dtype=np.float32), np.float32(0.5), out=state["f32"])
    state["f32"] += np.float32(step)
    np.bitwise_xor(np.arange(N_I64, dtype=np.int64), step, out=state["i64"])
    state["u8"][:] = step % 251
    state["step"] = step
    state["label"] = f"step {step}"


def scribble(state: dict[str, Any]) -> None:
    """Overwrite every array and field: a snapshot taken before must not see it."""
    for key in ("f32", "i64", "u8"):
        state[key].view(np.uint8)[...] = 0xA5
    state["step"], state["label"] = -1, "scribbled"


def assert_state_of(actual: Any, step: int) -> None:
    expected = make_state(step)
    assert list(actual) == list(expected)
    for key, value in expected.items():
        if isinstance(value, np.ndarray):
            assert actual[key].dtype == value.dtype and actual[key].tobytes() == value.tobytes(), key
        else:
            assert actual[key] == value, key


# ------------------------------------------------------------ saving process


class Announcing(LocalStore):
    """Each blob write of a snapshot process (any process but the one that made the store)
    first says ``W <pid>`` on the events pipe."""

    def __init__(self, root: Path, events_fd: int) -> None:
        super().__init__(root)
        self.events_fd, self.owner = events_fd, os.getpid()

    def write_blob(self, key: str, chunks: Iterable[Buffer], *, durable: bool) -> None:
        if os.getpid() != self.owner:
            os.write(self.events_fd, f"W {os.getpid()}\n".encode())
        super().write_blob(key, chunks, durable=durable)


def saver_main(store: Path, log: Path, events: Any, error_file: Path) -> None:
    """Restore, then save step after step in fork mode until killed; log confirmed steps."""
    fd = events.fileno()  # the write end of a pipe

    def say(line: str) -> None:
        os.write(fd, (line[:400] + "\n").encode())  # one write under PIPE_BUF: atomic

    try:
        deadline = time.monotonic() + CHILD_LIFETIME_LIMIT
        ckpt = Checkpointer(NAME, location=Announcing(store, fd), keep=2, snapshot="fork")
        latest = ckpt.latest_step()
        step = 0 if latest is None else ckpt.restore().step + 1
        state = make_state(step)
        log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        say("R")
        while time.monotonic() < deadline:
            say(f"S {step}")
            pending = ckpt.save(step, state, blocking=False)
            scribble(state)
            try:
                pending.wait()
            except SaveFailed as exc:
                say(f"F {step} {str(exc).splitlines()[0]}")
                try:
                    ckpt.wait()  # the error is raised by the next call too: once
                except SaveFailed:
                    pass
            else:
                os.write(log_fd, f"{step}\n".encode())  # only now is the step confirmed
                os.fsync(log_fd)
                say(f"C {step}")
            step += 1
            fill(state, step)
        error_file.write_text("the saving process was never killed")
    except BaseException:
        error_file.write_text(traceback.format_exc())
    os._exit(3)


# --------------------------------------------------------------------- test


class Events:
    """Lines from the saving process and its snapshot processes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lines: list[list[str]] = []
        self.times: list[float] = []  # when each line came (monotonic)
        self._partial = b""

    def wait_for(self, kind: str, count: int = 1) -> list[str]:
        """The ``count``-th line of ``kind``, once it came."""
        deadline = time.monotonic() + EVENT_TIMEOUT
        while len(found := [line for line in self.lines if line[0] == kind]) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"no event {kind!r} #{count} in {EVENT_TIMEOUT} s: {self.lines[-5:]}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready and not self._read():
                raise AssertionError(f"the pipe closed before event {kind!r}: {self.lines[-5:]}")
        return found[count - 1]

    def drain(self) -> None:
        """Read until every writer is gone: the saving process and any snapshot process."""
        deadline = time.monotonic() + EVENT_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "a snapshot process outlived its parent by 30 s"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready and not self._read():
                return

    def _read(self) -> bool:
        data = os.read(self.fd, 65536)
        text = self._partial + data
        *complete, self._partial = text.split(b"\n")
        self.lines.extend(line.decode().split(" ", 2) for line in complete)
        self.times.extend(time.monotonic() for _ in complete)
        return bool(data)

    def durations(self) -> list[float]:
        """Seconds from each confirmed save's start to its confirmation."""
        started = {line[1]: t for line, t in zip(self.lines, self.times, strict=True)
                   if line[0] == "S"}
        return [t - started[line[1]] for line, t in zip(self.lines, self.times, strict=True)
                if line[0] == "C" and line[1] in started]

    def steps(self, kind: str) -> list[int]:
        return [int(line[1]) for line in self.lines if line[0] == kind]


def confirmed_steps(log: Path) -> list[int]:
    if not log.exists():
        return []
    return [int(line) for line in log.read_text().split("\n")[:-1]]


def check_after_cycle(store: Path, log: Path, newest_started: int | None) -> int | None:
    """The invariants once every process of the cycle is gone; the restored step."""
    newest = max(confirmed_steps(log), default=None)
    ckpt = Checkpointer(NAME, location=store)
    steps = ckpt.steps()
    if not steps:
        assert newest is None, f"step {newest} was confirmed, but nothing is committed"
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("error", CorruptCheckpointWarning)  # nothing may be damaged
        restored = ckpt.restore()
    assert newest is None or restored.step >= newest, (restored.step, newest, steps)
    assert newest_started is not None and restored.step <= newest_started, (restored.step, steps)
    for step in steps:  # every committed step intact, as saved when save() returned
        assert_state_of(ckpt.restore(step=step).state, step)
    report = safepoint.check(store)
    assert report.ok, report.findings
    safepoint.check(store, fix=True)
    report = safepoint.check(store)
    assert report.clean, report.findings
    assert ckpt.steps() == steps
    return restored.step


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill_9_of_the_snapshot_process_or_its_parent_never_loses_a_confirmed_step(
        tmp_path: Path) -> None:
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    print(f"seed {seed}")  # shown with a failure, to replay it
    store, log, error_file = tmp_path / "store", tmp_path / "confirmed.log", tmp_path / "error.txt"
    write_time = 0.02  # seconds from a save's start to its confirmation, learned as we go
    newest_started: int | None = None
    restored: list[int | None] = []
    kills = {"snapshot process": 0, "saving process": 0}
    failed = 0  # saves reported failed
    ahead = {"snapshot process": 0, "saving process": 0}  # cycles that ended past the confirmed step
    for cycle in range(CYCLES):
        reader, writer = CONTEXT.Pipe(duplex=False)
        saver = child_processes.start(saver_main, store, log, writer, error_file)
        writer.close()
        events = Events(reader.fileno())
        try:
            events.wait_for("R")
            target = "snapshot process" if cycle % 2 else "saving process"
            _, pid = events.wait_for("W", rng.randint(1, 6))  # inside the k-th blob write
            time.sleep(rng.uniform(0, write_time / 3))  # a save writes three data files
            if target == "snapshot process":
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass  # it finished already: its save is confirmed
                # the saving process reports that save, then goes on with the next one
                killed_step = max(events.steps("S"))
                events.wait_for("S", len(events.steps("S")) + 1)
                for _, step, *message in (line for line in events.lines if line[0] == "F"):
                    assert int(step) == killed_step, (step, killed_step)
                    assert "killed by SIGKILL" in message[0], message
                time.sleep(rng.uniform(0, write_time))  # and inside (or around) the next one
            os.kill(saver.pid, signal.SIGKILL)
            kills[target] += 1
            saver.join(EVENT_TIMEOUT)
            events.drain()  # the orphaned snapshot process, if any, has exited now
        finally:
            if saver.exitcode is None:
                os.kill(saver.pid, signal.SIGKILL)
            saver.join(EVENT_TIMEOUT)
            reader.close()
        if saver.exitcode != -signal.SIGKILL:
            detail = error_file.read_text() if error_file.exists() else "(no report)"
            pytest.fail(f"the saving process exited with {saver.exitcode}:\n{detail}")
        newest_started = max([*events.steps("S"), -1 if newest_started is None else newest_started])
        durations = sorted(events.durations())
        if durations:
            write_time = 0.8 * write_time + 0.2 * durations[len(durations) // 2]
        failed += len(events.steps("F"))
        restored.append(check_after_cycle(store, log, newest_started))
        if restored[-1] is not None and restored[-1] > max(confirmed_steps(log), default=-1):
            ahead[target] += 1
    print(f"kills {kills}; failed saves {failed}; committed but unconfirmed {ahead}")
    confirmed = confirmed_steps(log)
    assert confirmed == sorted(set(confirmed))  # no step was ever confirmed twice
    progressed = [step for step in restored if step is not None]
    assert progressed == sorted(progressed)  # restarts moved forward, never back
    assert not confirmed or progressed[-1] >= confirmed[-1]
    assert kills == {"snapshot process": CYCLES // 2, "saving process": CYCLES - CYCLES // 2}
