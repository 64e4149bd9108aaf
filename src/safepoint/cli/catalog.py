"""What is in a store, gathered for the commands: names, runs, steps and leftovers.

Everything here reads manifests (and run journals) only, never the blobs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from safepoint.checkpointer import committed_steps, latest_manifest, list_names
from safepoint.errors import CheckpointNotFound, CorruptCheckpoint, InvalidName
from safepoint.format import Manifest, check_tree, iter_tree_summary, read_manifest
from safepoint.run import JOURNAL, describe_run
from safepoint.store import Store, check_name

# Manifest keys shown in their own place (by ``show``); the others came from
# ``save(..., extra=...)`` and are listed as they are. "run" is a run's record.
_KNOWN_KEYS = {"format", "version", "name", "step", "created", "save_id", "metadata",
               "pickled", "files", "blobs", "tree", "kind", "progress", "attempt", "table", "run"}


@dataclass
class NameSummary:
    """One row of ``safepoint ls``."""

    name: str
    kind: str
    steps: int
    latest_step: int | None
    progress: float | None
    attempt: int | None
    complete: bool | None
    updated: float | None  # seconds since the epoch
    nbytes: int
    damaged: int  # 1 for a damaged newest-step record, plus 1 for a damaged run record
    problem: str | None = None


def _describe_run(store: Store, name: str) -> tuple[Any, CorruptCheckpoint | None]:
    """The run info of ``name`` (None if it is not a run), or the damage that hides it."""
    try:
        return describe_run(store, name), None
    except CorruptCheckpoint as exc:
        return None, exc


def _number(value: Any, kind: type) -> Any:
    """``value`` if it is a number usable as ``kind`` (bools excluded), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return kind(value)


def summarize_name(store: Store, name: str) -> NameSummary | None:
    """What ``ls`` shows about ``name`` (one listing and the newest step's manifest), or
    None if it holds neither steps nor a run."""
    damaged = 0
    try:
        latest = latest_manifest(store, name)
    except CorruptCheckpoint:
        latest, damaged = None, 1
    steps = committed_steps(store, name, None if latest is None else latest.step)
    run, damage = _describe_run(store, name)
    if not steps and run is None and damage is None and not damaged:
        return None
    summary = NameSummary(name=name, kind="checkpoint", steps=len(steps),
                          latest_step=steps[-1] if steps else None, progress=None, attempt=None,
                          complete=None, updated=None, nbytes=0,
                          damaged=damaged + int(damage is not None))
    if latest is not None:
        body = latest.body
        summary.nbytes = latest.nbytes
        summary.kind = str(body.get("kind") or "checkpoint")
        summary.progress = _number(body.get("progress"), float)
        summary.attempt = _number(body.get("attempt"), int)
        summary.updated = latest.created
    if run is not None or damage is not None:
        summary.kind = "run"
    if run is not None:
        for field in ("progress", "attempt", "complete", "updated"):
            value = getattr(run, field, None)
            if value is not None:
                setattr(summary, field, value)
        summary.nbytes = max(summary.nbytes, int(getattr(run, "nbytes", 0) or 0))
    return summary


def summarize_store(store: Store) -> list[NameSummary]:
    """Every checkpoint name and run in ``store``, by name."""
    summaries = []
    for name in list_names(store):
        try:
            summary = summarize_name(store, name)
        except CorruptCheckpoint as exc:  # one bad name never hides the others
            summary = NameSummary(name=name, kind="?", steps=0, latest_step=None, progress=None,
                                  attempt=None, complete=None, updated=None, nbytes=0, damaged=1)
            summary.problem = str(exc)
        if summary is not None:
            summaries.append(summary)
    return summaries


def valid_name(entry: str) -> bool:
    """Whether a store entry can be a name (hidden and temporary entries cannot)."""
    try:
        check_name(entry)
    except InvalidName:
        return False
    return True


def find_name(store: Store, name: str) -> tuple[list[int], Any, str | None]:
    """The committed steps of ``name``, its run info (None if not a run) and what is wrong
    with its run record; raises :class:`CheckpointNotFound` if it holds neither."""
    check_name(name)
    steps = committed_steps(store, name)
    run, damage = _describe_run(store, name)
    if not steps and damage is not None:
        raise damage
    if not steps and run is None:
        raise not_found(store, name)
    return steps, run, None if damage is None else str(damage)


def not_found(store: Store, name: str) -> CheckpointNotFound:
    """The error for a name that holds neither checkpoint steps nor a run."""
    return CheckpointNotFound(
        f"no checkpoint named {name!r} in {store.url}; `safepoint ls {store.url}` lists "
        "what is there", name=name)


def verify_journal(store: Store, name: str) -> dict[str, Any] | None:
    """``verify``'s result for the journal of run ``name`` (None when it has none).

    The journal is read as a resume reads it: its header, and its newest intact record
    (checksum, then contents), must check out. A damaged last record looks like a commit cut
    short by a crash: the record before it is what resume reads, and nothing is reported.
    """
    key = f"{name}/{JOURNAL}"
    if not store.exists(key):
        return None
    problems: list[str] = []
    try:
        from safepoint.store.journal import read_journal

        scan, _ = read_journal(store, key)  # type: ignore[arg-type]
        if scan is not None:
            problems += scan.damage
    except CorruptCheckpoint as exc:
        problems.append(str(exc))
    _, damage = _describe_run(store, name)
    if damage is not None and str(damage) not in problems:
        problems.append(str(damage))
    return {"name": name, "step": None, "ok": not problems,
            "checked_bytes": store.stat(key).size, "problems": problems}


def _tree_rows(manifest: Manifest) -> list[dict[str, Any]]:
    rows = iter_tree_summary(manifest.body["tree"], blobs=manifest.blobs)
    return [{"path": p, "type": t, "dtype": d, "shape": s, "nbytes": n} for p, t, d, s, n in rows]


def _flow_table(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    table = body.get("table")
    if isinstance(table, list) and all(isinstance(row, dict) for row in table):
        return table
    return None


def describe_step(store: Store, name: str, step: int | None) -> dict[str, Any]:
    """Everything ``show`` prints about one step (the newest if ``step`` is None)."""
    steps, run, run_damage = find_name(store, name)
    run_info = None if run is None else asdict(run)
    if not steps and step is None:  # a run whose commits are all in its journal
        return {"name": name, "location": store.url, "kind": "run", "steps": [], "run": run_info}
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointNotFound(
            f"{name!r} has no step {step} in {store.url}; its steps are "
            f"{', '.join(map(str, steps)) or 'none'}", name=name, step=step)
    manifest = read_manifest(store, name, step)
    body = manifest.body
    check_tree(manifest, store)
    tree = _tree_rows(manifest)
    return {
        "name": name,
        "location": store.url,
        "step": step,
        "steps": steps,
        "kind": str(body.get("kind") or "checkpoint"),
        "progress": _number(body.get("progress"), float),
        "attempt": _number(body.get("attempt"), int),
        "created": manifest.created,
        "nbytes": manifest.nbytes,
        "format_version": body.get("version"),
        "metadata": manifest.metadata,
        "extra": {k: v for k, v in body.items() if k not in _KNOWN_KEYS},
        "pickled": list(body.get("pickled") or []),
        "tree": tree,
        "table": _flow_table(body),
        "run": run_info,
        "run_damage": run_damage,
    }
