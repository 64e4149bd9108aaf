"""What ``safepoint ls`` shows about a run: :func:`describe_run`."""

from __future__ import annotations

from dataclasses import dataclass

from safepoint.run.persist import peek
from safepoint.store import Store


@dataclass(frozen=True)
class RunInfo:
    """The newest checkpoint of a run, as listings show it."""

    name: str
    position: int
    """Items completed in the loop the run is in."""
    total: int | None
    """Items of that loop, when known (not for lines: their fraction is by bytes)."""
    progress: float | None
    """Fraction of that loop done, when known."""
    attempt: int
    complete: bool
    updated: float
    """When the checkpoint was committed (seconds since the epoch)."""
    nbytes: int
    """Bytes the run's checkpoints occupy."""
    loop: int = 0
    """Index of the loop (0 for a run's first loop)."""
    kind: str = "run"


def describe_run(store: Store, name: str) -> RunInfo | None:
    """The newest checkpoint of run ``name`` in ``store``; None if ``name`` holds no run."""
    found = peek(store, name)
    if found is None:
        return None
    record = found.record
    return RunInfo(name=name, position=record.position, total=record.total,
                   progress=record.fraction, attempt=record.attempt, complete=record.complete,
                   updated=record.time, nbytes=found.nbytes, loop=record.loop)


__all__ = ["RunInfo", "describe_run"]
