"""Writers of every kind (Checkpointer, run, task, flow), run by the lease tests in child
processes, and what the tests read back.

Each writer does ``n`` *units* of work (a Checkpointer step, a run item, a task sub-step, a
flow step), each one committed, and appends an event to a shared log once its commit has
returned (``commit <units durable>``), fsynced, so that a commit reported there was
acknowledged. Only the holder of the name's lease writes events, so the log is the
history of the name: who started where, executed what, committed what, and how it ended.

Children are forked from the tests' fork server (child_processes.py), which has imported
this module (fast, and safe whatever threads the pytest process runs); they get all their
settings from a :class:`Spec`, never from the environment of the pytest process.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import safepoint
from child_processes import CONTEXT
from safepoint import Checkpointer, Flow, knobs, lease
from safepoint.errors import LeaseHeld, StaleAttempt, StepExists
from safepoint.format.tree import decode_inline
from safepoint.policy import manual
from safepoint.run.log import read_log
from safepoint.store import open_store
from safepoint.tasks import TaskContext, task

HERE = str(Path(__file__).resolve().parent)
SRC = str(Path(safepoint.__file__).resolve().parents[1])
KINDS = ("checkpointer", "run", "task", "flow")
WIDTH = 600
"""Elements of the array a Checkpointer step holds (4800 bytes: a blob, not inline)."""
STALE_EXIT, REFUSED_EXIT, ERROR_EXIT = 4, 5, 6
EVENTS_ENV = "LEASE_TEST_EVENTS"
DELAY_ENV = "LEASE_TEST_DELAY"


@dataclass
class Spec:
    """What one writer process does."""

    kind: str
    location: str
    name: str
    n: int
    events: str
    takeover: bool = False
    wait: float = 0.0
    retry: bool = False
    """On ``LeaseHeld``, try again until the lease is free (flows and Checkpointers have
    no ``wait=``)."""
    ttl: float = 30.0
    os_locks: bool = True
    host: str | None = None
    """Claim to run on this host (a writer on another machine)."""
    pause_at: int | None = None
    """After the commit of this many units, report ``paused`` and wait for ``go``."""
    go: str | None = None
    gate: str | None = None
    """Report ``ready`` and wait for this file before starting (start writers together)."""
    delay: float = 0.0
    output: str | None = None
    storage_options: dict[str, Any] | None = None
    poll: float = 0.02
    """Seconds between looks at a busy name, while waiting for it (``knobs.LEASE_POLL``)."""
    env: dict[str, str] = field(default_factory=dict)


SPEC: Spec | None = None
"""The spec of the writer running in this process (tasks read it: their arguments are
recorded with the job, so they carry none of it)."""


# ------------------------------------------------------------------ events


def emit(event: str, value: Any = "") -> None:
    """Append ``<pid> <event> <value>`` to the event log, durably."""
    path = SPEC.events if SPEC is not None else os.environ.get(EVENTS_ENV)
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{os.getpid()} {event} {value}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Event:
    pid: int
    event: str
    value: str

    @property
    def number(self) -> int:
        return int(self.value.split()[0])


def events(path: str | Path) -> list[Event]:
    """The events logged so far, in order."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    found = []
    for line in text.splitlines():
        pid, event, *rest = line.split(" ", 2)
        found.append(Event(int(pid), event, rest[0] if rest else ""))
    return found


def _delay() -> float:
    return SPEC.delay if SPEC is not None else float(os.environ.get(DELAY_ENV, "0"))


def _committed(units: int) -> None:
    """Report that ``units`` are durable; pause there if the spec says so."""
    emit("commit", units)
    if SPEC is not None and SPEC.pause_at == units:
        emit("paused", units)
        assert SPEC.go is not None
        wait_for_file(SPEC.go, 120)
    time.sleep(_delay())


def wait_for_file(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.005)


# ------------------------------------------------------------------ what each writer computes


def checkpoint_state(step: int) -> dict[str, Any]:
    """What Checkpointer step ``step`` must hold (each step is made from the one before)."""
    return {"step": step, "total": step * (step + 1) // 2, "w": np.full(WIDTH, float(step))}


def square(k: int) -> int:
    emit("exec", k)
    return k * k


def expected_result(kind: str, n: int) -> Any:
    squares = [k * k for k in range(n)]
    if kind == "task":
        return {"total": sum(squares), "values": squares}
    if kind == "flow":
        return {"total": sum(squares), "values": squares}
    if kind == "run":
        return {"total": sum(squares)}
    return checkpoint_state(n)


# ------------------------------------------------------------------ the writers


def _checkpointer(spec: Spec) -> Any:
    ckpt = Checkpointer(spec.name, location=spec.location, takeover=spec.takeover,
                        storage_options=spec.storage_options)
    held = False
    state: dict[str, Any] = {}
    have = 0
    while True:
        if not held:  # before the lease is ours: what the newest step is now
            newest = ckpt.latest_step()
            have = newest or 0
            state = ckpt.restore().state if newest is not None else {"total": 0, "w": np.zeros(WIDTH)}
        if have >= spec.n:
            break
        step = have + 1
        new = {"step": step, "total": state["total"] + step, "w": state["w"] + 1.0}
        if held:
            emit("exec", step)
        try:
            ckpt.save(step, new, metadata={"step": step})
        except (LeaseHeld, StepExists):
            if not spec.retry or held:
                raise
            time.sleep(0.01)
            continue
        if not held:  # the first save took the lease
            emit("start", have)
            emit("exec", step)
            held = True
        state, have = new, step
        _committed(step)
    ckpt.close()
    return {"step": have}


def _run(spec: Spec) -> Any:
    with safepoint.resume(spec.name, location=spec.location, policy=manual(), keep_completed=True,
                          takeover=spec.takeover, wait=spec.wait) as run:
        emit("start", run.position)
        run.state.setdefault("total", 0)
        sink = run.open_output(spec.output) if spec.output else None
        for i in run.range(spec.n):
            emit("exec", i)
            run.state["total"] += i * i
            if sink is not None:
                sink.write(f"{i} {run.attempt}\n")  # which writer wrote it
            run.checkpoint()
            _committed(i + 1)
        return dict(run.state)


@task
def squares(ctx: TaskContext, n: int) -> dict[str, Any]:
    """Sub-step k computes k*k; the result is their list and sum."""
    done = 0
    while done < n and ctx.completed(f"s{done}"):
        done += 1
    emit("start", done)
    values = []
    for k in range(n):
        values.append(ctx.step(f"s{k}", square, k))
        if k >= done:
            _committed(k + 1)
    return {"total": sum(values), "values": values}


@task
def chaos_job(ctx: TaskContext, job: str, n: int) -> int:
    """``n`` sub-steps, each logging ``exec <job> <k>`` when its function runs and
    ``commit <job> <k>`` once ``ctx.step`` returned (its record is durable)."""
    total = 0
    for k in range(n):
        total += ctx.step(f"s{k}", chaos_step, job, k)
        emit("commit", f"{job} {k}")
    return total


def chaos_step(job: str, k: int) -> int:
    emit("exec", f"{job} {k}")
    time.sleep(_delay())
    return k * k


def _task(spec: Spec) -> Any:
    return squares.run((spec.n,), {}, job_id=spec.name, location=spec.location,
                       wait=spec.wait, takeover=spec.takeover)


def make_flow(name: str, location: str, n: int) -> Flow:
    """A flow of ``n`` steps; step k appends k*k to the state's values."""
    flow = Flow(name, location=location, keep_completed=True)
    first = [True]

    def make_step(k: int) -> Callable[[dict[str, Any], Any], None]:
        def step(state: dict[str, Any], data: Any) -> None:
            if first[0]:
                first[0] = False
                emit("start", k)
            else:
                _committed(k)  # the step before this one is recorded
            emit("exec", k)
            state.setdefault("values", []).append(k * k)
            state["total"] = state.get("total", 0) + k * k

        step.__name__ = step.__qualname__ = f"s{k}"
        return step

    for k in range(n):
        flow.step(make_step(k))
    return flow


def _flow(spec: Spec) -> Any:
    flow = make_flow(spec.name, spec.location, spec.n)
    while True:
        try:
            final = flow.run({"total": 0, "values": []})
            break
        except LeaseHeld:
            if not spec.retry:
                raise
            time.sleep(0.01)
    emit("commit", spec.n)
    return final


WRITERS: dict[str, Callable[[Spec], Any]] = {
    "checkpointer": _checkpointer, "run": _run, "task": _task, "flow": _flow}


def child(spec: Spec) -> None:
    """A writer process: run ``spec``; report how it ended, by event and exit status."""
    global SPEC
    SPEC = spec
    os.environ.update(spec.env)
    os.environ["SAFEPOINT_OS_LOCKS"] = "1" if spec.os_locks else "0"
    knobs.LEASE_TTL, knobs.LEASE_POLL = spec.ttl, spec.poll
    if spec.host is not None:
        lease.HOST = spec.host
    if spec.gate is not None:
        emit("ready")
        wait_for_file(spec.gate, 60)
    try:
        result = WRITERS[spec.kind](spec)
    except StaleAttempt as exc:
        emit("stale", f"{exc.attempt} {exc.current} {json.dumps(str(exc))}")
        sys.exit(STALE_EXIT)
    except LeaseHeld as exc:
        emit("refused", json.dumps(str(exc)))
        sys.exit(REFUSED_EXIT)
    except BaseException as exc:
        emit("error", json.dumps(f"{type(exc).__name__}: {exc}"))
        sys.exit(ERROR_EXIT)
    emit("done", json.dumps(_plain(result)))


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------------ starting writers


def start(spec: Spec) -> Any:
    """Start a writer process (a ``multiprocessing.Process``; ``.pid``, ``.exitcode``)."""
    process = CONTEXT.Process(target=child, args=(spec,), daemon=True)
    process.start()
    return process


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll ``condition`` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def event_of(path: str | Path, pid: int, event: str, at_least: int | None = None) -> Event | None:
    """The first event ``event`` of ``pid`` (with a number of at least ``at_least``)."""
    for found in events(path):
        if found.pid == pid and found.event == event and (at_least is None or found.number >= at_least):
            return found
    return None


def finish(process: Any, timeout: float = 60.0) -> int:
    """Wait for ``process`` to end; its exit code (negative: killed by that signal)."""
    process.join(timeout)
    if process.exitcode is None:
        os.kill(process.pid, signal.SIGCONT)
        process.kill()
        process.join(10)
        raise AssertionError(f"writer {process.pid} did not finish within {timeout} s")
    return int(process.exitcode)


def stop_all(processes: list[Any]) -> None:
    """Kill what is left of ``processes`` (a failed test's cleanup)."""
    for process in processes:
        if process.exitcode is None:
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
            process.join(10)


# ------------------------------------------------------------------ reading back


def run_state(location: str, name: str) -> tuple[Any, dict[str, Any]]:
    """The newest state record of run ``name`` and its state (small states are inline)."""
    record = read_log(open_store(location), name).state
    assert record is not None, f"{name} has no state record"
    tree = record.tree or {"node": {}}
    return record, decode_inline(tree["node"])


def store_files(location: str | Path) -> dict[str, bytes]:
    """Every file of a local store with its bytes (to compare before and after)."""
    root = Path(location)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_checkpoints_exact(location: str, name: str, n: int,
                             storage_options: dict[str, Any] | None = None) -> None:
    """Steps 1..n of Checkpointer ``name`` exist, each holding exactly its state."""
    reader = Checkpointer(name, location=location, storage_options=storage_options)
    assert reader.steps() == list(range(1, n + 1))
    for step in range(1, n + 1):
        restored = reader.restore(step)
        expected = checkpoint_state(step)
        assert restored.metadata == {"step": step}
        assert restored.state["step"] == step and restored.state["total"] == expected["total"]
        np.testing.assert_array_equal(restored.state["w"], expected["w"])
    assert reader.restore().step == n


def assert_result_exact(kind: str, location: str, name: str, n: int, output: str | None = None) -> None:
    """What writer ``kind`` left of ``name`` is exactly the result of all ``n`` units, and a
    writer that comes now runs nothing."""
    if kind == "checkpointer":
        assert_checkpoints_exact(location, name, n)
        return
    if kind == "run":
        record, state = run_state(location, name)
        assert record.complete and state == expected_result("run", n)
        if output is not None:
            lines = Path(output).read_text().splitlines()
            assert [int(line.split()[0]) for line in lines] == list(range(n))  # each once
        return
    global SPEC
    probe = Path(location).parent / f"probe-{name}.events"
    saved, SPEC = SPEC, Spec(kind, location, name, n, str(probe))
    try:
        if kind == "task":
            result = squares.run((n,), {}, job_id=name, location=location, wait=0)
        else:
            result = make_flow(name, location, n).run({"total": 0, "values": []})
    finally:
        SPEC = saved
    assert result == expected_result(kind, n)
    assert not events(probe), "a completed job ran again"  # the recorded result, no step ran


def iter_writers(log: list[Event]) -> Iterator[tuple[int, int, list[Event]]]:
    """(pid, start, events) of each writer that started, in the order they held the lease."""
    order = [e.pid for e in log if e.event == "start"]
    for pid in order:
        mine = [e for e in log if e.pid == pid]
        start = next(e.number for e in mine if e.event == "start")
        yield pid, start, mine


def assert_consistent(location: Any, *, crash_leftovers: bool = False,
                      leftovers: Collection[str] = ()) -> None:
    """``safepoint.check`` finds no damage and nothing left over.

    ``crash_leftovers``: writers were killed at random instants, so files of a save that
    never committed may be left (they are leftovers, never damage): each finding must be
    one, and once ``fix=True`` removed them the store is clean. ``leftovers``: the keys of
    the only leftovers allowed (known and explained by the test).
    """
    report = safepoint.check(location)
    assert report.ok, report.findings
    if (crash_leftovers or leftovers) and not report.clean:
        assert all(f.what == "leftover" for f in report.findings), report.findings
        if not crash_leftovers:
            assert {f.key for f in report.findings} <= set(leftovers), report.findings
        safepoint.check(location, fix=True)
        report = safepoint.check(location)
    assert report.ok and report.clean, report.findings


# ------------------------------------------------------------------ crash windows


def killed_before_release(location: str, name: str, events_path: str) -> None:
    """A run that checkpoints a large state, then a newer one, and is SIGKILLed between
    committing the newer record and removing the older one's checkpoint step."""
    from safepoint.run import log as run_log

    os.environ[EVENTS_ENV] = events_path

    def die(self: Any, record: Any) -> None:
        emit("dying", record.seq)
        os.kill(os.getpid(), signal.SIGKILL)

    with safepoint.resume(name, location=location, policy=manual()) as run:
        run.state["big"] = np.arange(10_000.0)
        run.checkpoint()
        run_log.RunLog.release = die  # type: ignore[method-assign]
        run.state["big"] = np.arange(10_000.0) + 1
        run.checkpoint()


def attempt_here(spec: Spec) -> Any:
    """Run ``spec``'s writer in this process (its events go to ``spec.events``)."""
    global SPEC
    saved, SPEC = SPEC, spec
    try:
        return WRITERS[spec.kind](spec)
    finally:
        SPEC = saved


def ticket(location: str, name: str, generation: int) -> dict[str, Any]:
    """The contents of a lease ticket (live or released)."""
    folder = Path(location) / name / "lease"
    for path in (folder / f"{generation:08d}", folder / f"{generation:08d}.released"):
        if path.exists():
            return dict(json.loads(path.read_text()))
    raise AssertionError(f"{name} has no ticket {generation}")
