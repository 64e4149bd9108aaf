"""What is in a store, gathered for the commands: names, runs, steps and leftovers.

Everything here reads manifests (and run journals) only, never the blobs.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any

from safepoint.checkpointer import committed_steps, latest_manifest, list_names
from safepoint.cli.tree import tree_rows
from safepoint.errors import CheckpointNotFound, CorruptCheckpoint, InvalidName
from safepoint.format import Manifest, check_tree, read_manifest
from safepoint.format.chunks import shared_bytes
from safepoint.lease import holder
from safepoint.run import describe_run
from safepoint.run.log import read_log
from safepoint.store import Store, check_name

# Manifest keys shown in their own place (by ``show``); the others came from
# ``save(..., extra=...)`` and are listed as they are.
_KNOWN_KEYS = {"format", "version", "name", "step", "created", "save_id", "metadata",
               "pickled", "files", "blobs", "tree"}


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
    status: str = "-"
    """The writer: ``running`` (its heartbeat is fresh), ``stale`` (its heartbeat expired),
    ``complete``, ``idle`` (an execution nobody writes now), ``-`` (checkpoints, no writer)."""
    owner: dict[str, Any] | None = None
    """The current or last writer: host, pid, kind, started."""
    position: int | None = None
    """An execution's items done in the loop it is in."""
    total: int | None = None
    """The items of that loop, when known."""
    error: str | None = None
    """An execution's newest failed step's error."""
    message: str | None = None
    """An execution's newest progress message."""
    shared: int = 0
    """Bytes of the newest step's chunk files that other steps share (incremental saves)."""


def _describe_run(store: Store, name: str) -> tuple[Any, CorruptCheckpoint | None]:
    """The run info of ``name`` (None if it is not a run), or the damage that hides it."""
    try:
        return describe_run(store, name), None
    except CorruptCheckpoint as exc:
        return None, exc


def summarize_name(store: Store, name: str) -> NameSummary | None:
    """What ``ls`` shows about ``name`` (one listing and the newest step's manifest), or
    None if it holds neither steps nor a run."""
    damaged = 0
    run, damage = _describe_run(store, name)
    if run is not None or damage is not None:  # an execution: its log says it all
        summary = NameSummary(name=name, kind=run.kind if run is not None else "run",
                              steps=len(run.steps) if run is not None else 0, latest_step=None,
                              progress=None, attempt=None, complete=None, updated=None, nbytes=0,
                              damaged=int(damage is not None))
        if run is not None:
            summary.progress, summary.attempt = run.progress, run.attempt
            summary.complete, summary.updated, summary.nbytes = run.complete, run.updated, run.nbytes
            summary.status, summary.owner = run.liveness, run.owner or None
            summary.position, summary.total = run.position, run.total
            summary.error, summary.message = run.error, run.message
        else:
            summary.problem = str(damage)
        return summary
    try:
        latest = latest_manifest(store, name)
    except CorruptCheckpoint:
        latest, damaged = None, 1
    steps = committed_steps(store, name, None if latest is None else latest.step)
    if not steps and not damaged:
        return None
    summary = NameSummary(name=name, kind="checkpoint", steps=len(steps),
                          latest_step=steps[-1] if steps else None, progress=None, attempt=None,
                          complete=None, updated=None, nbytes=0,
                          damaged=damaged + int(damage is not None))
    if latest is not None:
        summary.nbytes, summary.updated = latest.nbytes, latest.created
        summary.shared = shared_bytes(store, latest, steps)
    writer = holder(store, name)
    if writer is not None:
        summary.attempt = writer.generation
        summary.owner = dict(writer.info.get("holder") or {}) or None
        if writer.state in ("running", "stale"):
            summary.status = writer.state
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


def _tree_rows(manifest: Manifest, full: bool) -> list[dict[str, Any]]:
    return tree_rows(manifest.body["tree"], blobs=manifest.blobs, full=full)


def describe_execution(store: Store, name: str, run: Any, *, full: bool = False
                       ) -> dict[str, Any]:
    """Everything ``show`` prints about a run, task or flow: who writes it, where it is,
    its durable steps and the structure of its newest state (reads no array data)."""
    replay = read_log(store, name)
    tree: list[dict[str, Any]] = []
    saved = replay.state.tree if replay.state is not None else None
    if saved is not None and "node" in saved:
        tree = tree_rows(saved["node"], full=full)
    elif saved is not None and "checkpoint" in saved:
        with contextlib.suppress(CheckpointNotFound, CorruptCheckpoint):
            manifest = read_manifest(store, name, int(saved["checkpoint"]))
            tree = _tree_rows(manifest, full)
    return {"name": name, "location": store.url, "kind": run.kind, "run": asdict(run),
            "steps": committed_steps(store, name), "table": run.steps, "tree": tree,
            "damage": list(replay.damage)}


def describe_step(store: Store, name: str, step: int | None, *, full: bool = False
                  ) -> dict[str, Any]:
    """Everything ``show`` prints about one step (the newest if ``step`` is None); for a
    run, task or flow without ``step``: :func:`describe_execution`. ``full``: a row for
    every leaf, long containers too."""
    steps, run, run_damage = find_name(store, name)
    if run is not None and step is None:
        return describe_execution(store, name, run, full=full)
    if not steps and step is None:
        raise CorruptCheckpoint(f"{name!r} in {store.url}: {run_damage}", path=f"{store.url}/{name}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointNotFound(
            f"{name!r} has no step {step} in {store.url}; its steps are "
            f"{', '.join(map(str, steps)) or 'none'}", name=name, step=step)
    manifest = read_manifest(store, name, step)
    body = manifest.body
    check_tree(manifest, store)
    return {
        "name": name,
        "location": store.url,
        "step": step,
        "steps": steps,
        "kind": "checkpoint" if run is None else run.kind,
        "created": manifest.created,
        "nbytes": manifest.nbytes,
        "shared_bytes": shared_bytes(store, manifest, steps),
        "format_version": body.get("version"),
        "metadata": manifest.metadata,
        "extra": {k: v for k, v in body.items() if k not in _KNOWN_KEYS},
        "pickled": list(body.get("pickled") or []),
        "tree": _tree_rows(manifest, full),
        "run_damage": run_damage,
    }
