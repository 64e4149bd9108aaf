"""What ``safepoint ls`` and ``watch`` show about a run, a task or a flow: :func:`describe_run`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from safepoint.errors import CorruptCheckpoint
from safepoint.lease import holder
from safepoint.run.log import read_log, segments
from safepoint.store import Store


@dataclass(frozen=True)
class RunInfo:
    """The newest checkpoint of an execution, and who writes it now."""

    name: str
    position: int
    """Items completed in the loop the execution is in."""
    total: int | None
    """Items of that loop, when known (not for lines: their fraction is by bytes)."""
    progress: float | None
    """Fraction done, when known."""
    attempt: int
    complete: bool
    updated: float
    """When the newest record was committed (seconds since the epoch)."""
    nbytes: int
    """Bytes the execution's log occupies."""
    loop: int = 0
    """The ordinal of the innermost loop it is in."""
    kind: str = "run"
    liveness: str = "idle"
    """``running`` (a writer's heartbeat is fresh), ``stale`` (its heartbeat expired),
    ``complete``, or ``idle`` (no writer: stopped, killed, or between attempts)."""
    owner: dict[str, Any] = field(default_factory=dict)
    """The current or last writer: host, pid, kind, started."""
    message: str | None = None
    error: str | None = None
    """The error of the newest failed step, if any."""
    steps: list[dict[str, Any]] = field(default_factory=list)
    """The durable steps recorded (name, status, duration, error), for flows and tasks."""


def _size(store: Store, key: str) -> int:
    try:
        info = store.stat(key)
    except (FileNotFoundError, CorruptCheckpoint):
        return 0
    if info.kind != "dir":
        return info.size
    return sum(_size(store, f"{key}/{e.name}") for e in store.scan(key))


def describe_run(store: Store, name: str) -> RunInfo | None:
    """The newest checkpoint of the execution ``name`` in ``store``; None if ``name`` holds
    none. Damage raises :class:`CorruptCheckpoint`."""
    replay = read_log(store, name)
    state = replay.state
    if not replay.records:
        return None
    found = segments(store, name)
    nbytes = _size(store, f"{name}/{found[-1][1]}") if found else 0
    lease = holder(store, name)
    complete = state is not None and state.complete
    if complete:
        liveness = "complete"
    elif lease is not None and lease.state in ("running", "stale"):
        liveness = lease.state
    else:
        liveness = "idle"
    steps = replay.steps()
    failed = [r for r in steps.values() if r.status == "failed"]
    newest = max(replay.records, key=lambda r: r.seq)
    frames = state.frames if state is not None else []
    extra = (state.extra if state is not None else newest.extra)
    position, total = (frames[-1].position, frames[-1].total) if frames else (0, None)
    if not frames and isinstance(extra.get("total"), int):  # a flow: its steps
        position, total = int(extra.get("done") or 0), int(extra["total"])
    return RunInfo(
        name=name, position=position, total=total,
        progress=1.0 if complete else (state.fraction if state is not None else None),
        attempt=max((lease.generation if lease is not None else 0), newest.attempt),
        complete=complete, updated=newest.time, nbytes=nbytes,
        loop=frames[-1].loop if frames else 0,
        kind=str(extra.get("kind", "run")),
        liveness=liveness, owner=dict((lease.info.get("holder") if lease is not None else None) or {}),
        message=state.message if state is not None else None,
        error=failed[-1].error if failed else None,
        steps=[{"name": r.name, "status": r.status, "duration": r.duration, "error": r.error}
               for r in sorted(steps.values(), key=lambda r: r.seq)])


__all__ = ["RunInfo", "describe_run"]
