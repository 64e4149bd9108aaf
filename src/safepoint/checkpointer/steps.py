"""The steps of a name in a store: listing, the newest, leftovers, removal.

Everything here acts only on entries whose names safepoint writes (see
:mod:`safepoint.format.layout`); anything else found in a name's folder is left alone and
reported, so ``gc`` and ``rm`` never delete a user's files, even in a store.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

from safepoint import knobs
from safepoint.errors import CheckpointNotFound, CorruptCheckpoint, InvalidName, NotAStore
from safepoint.format import (
    LATEST,
    LEASE,
    Manifest,
    data_folder,
    generation_of_segment,
    latest_key,
    manifest_key,
    read_manifest,
    step_of_folder,
    step_of_manifest,
)
from safepoint.format.chunks import CHUNKS, chunk_references, is_chunk_file
from safepoint.format.layout import LOCK, is_data_file, is_rank_file, is_rank_folder, is_temp
from safepoint.lease import holder, ticket_key, tickets
from safepoint.store import Store, check_name


def _is_record(entry: str) -> bool:
    """A newest-step record, a step manifest, or a run's log."""
    return (entry == LATEST or step_of_manifest(entry) is not None
            or generation_of_segment(entry) is not None)


def manifest_steps(store: Store, name: str) -> list[int]:
    """Steps that have a manifest file, committed or not (one listing, no stat), ascending."""
    return sorted(s for e in store.list(name) if (s := step_of_manifest(e)) is not None)


def latest_manifest(store: Store, name: str) -> Manifest | None:
    """The manifest in ``latest.json`` (validated), or None when there is none; damage
    raises :class:`CorruptCheckpoint`."""
    try:
        return read_manifest(store, name)
    except CheckpointNotFound:
        return None


def committed_steps(store: Store, name: str, latest: int | bool | None = False) -> list[int]:
    """Committed steps of ``name``, ascending: one listing, filtered by the newest step.

    A manifest of a step above the one ``latest.json`` names was written by a save that did
    not finish (the newest-step record is its commit point): it is a leftover, not a step.
    Without a readable ``latest.json`` every manifest counts (recovery). ``latest``: the
    newest step if the caller knows it (``False``: read it here).
    """
    steps = manifest_steps(store, name)
    if latest is False:
        try:
            manifest = latest_manifest(store, name)
            latest = None if manifest is None else manifest.step
        except CorruptCheckpoint:
            latest = None
    if latest is None or latest is True:
        return steps
    return [s for s in steps if s <= latest]


def latest_problem(store: Store, name: str) -> str | None:
    """What is wrong with the newest-step record of ``name`` (``latest.json``), or None:
    it must be readable and name a step whose manifest exists."""
    try:
        manifest = latest_manifest(store, name)
    except CorruptCheckpoint as exc:
        return str(exc)
    if manifest is not None and not store.exists(manifest_key(name, manifest.step)):
        return (f"{store.url}/{latest_key(name)} names step {manifest.step}, which has no "
                "manifest of its own")
    return None


def is_name(store: Store, name: str) -> bool:
    """Whether ``name`` holds something safepoint wrote (steps, a newest-step record, a
    run's journal, a task's records)."""
    try:
        entries = store.list(name)
    except CorruptCheckpoint:
        return True  # a name that is a link: reported as damage by the callers
    return any(_is_record(e) for e in entries)


def list_names(store: Store) -> list[str]:
    """Names in a store that hold something safepoint wrote, sorted."""
    names = []
    for entry in store.scan(""):
        if entry.kind not in ("dir", "link"):
            continue
        try:
            check_name(entry.name)
        except InvalidName:
            continue
        if entry.kind == "link" or is_name(store, entry.name):
            names.append(entry.name)
    return names


def require_store(store: Store) -> None:
    """Refuse a location that is not a safepoint store (for commands that delete)."""
    if not store.exists(""):
        raise NotAStore(f"{store.url} does not exist; check the location", location=store.url)
    if not store.is_store():
        raise NotAStore(
            f"{store.url} is not a safepoint store (it has no {'.safepoint-store'} marker, "
            "which safepoint writes with the first checkpoint); nothing was changed",
            location=store.url)


@dataclass
class Cleanup:
    """What :func:`collect_garbage` or :func:`remove_name` did."""

    removed: list[tuple[str, int]] = field(default_factory=list)
    """(key, bytes) of each entry removed."""
    kept: list[tuple[str, str]] = field(default_factory=list)
    """(key, why) of each entry left alone."""
    dry_run: bool = False
    """Only report what would be removed."""

    @property
    def freed(self) -> int:
        return sum(n for _, n in self.removed)


def _size(store: Store, key: str) -> int:
    total = 0
    try:
        info = store.stat(key)
    except (FileNotFoundError, CorruptCheckpoint):
        return 0
    if info.kind == "dir":
        for entry in store.scan(key):
            total += _size(store, f"{key}/{entry.name}")
        return total
    return info.size


def _age(store: Store, key: str, now: float) -> float:
    """Seconds since ``key`` (or the newest file in it) changed."""
    try:
        info = store.stat(key)
    except (FileNotFoundError, CorruptCheckpoint):
        return 0.0
    newest = info.mtime
    if info.kind == "dir":
        for entry in store.scan(key):
            child = _age(store, f"{key}/{entry.name}", now)
            newest = max(newest or 0.0, now - child)
    return now - newest if newest is not None else float("inf")


def _remove(store: Store, key: str, report: Cleanup) -> None:
    size = _size(store, key)
    if not report.dry_run:
        store.delete(key)
    report.removed.append((key, size))


def _own_age(store: Store, key: str, now: float) -> float:
    """Seconds since the entry ``key`` itself changed (a folder: an entry added or removed)."""
    try:
        mtime = store.stat(key).mtime
    except (FileNotFoundError, CorruptCheckpoint):
        return 0.0
    return now - mtime if mtime is not None else float("inf")


def _too_young(store: Store, key: str, now: float, min_age: float, *, itself: bool = False) -> bool:
    """Whether ``key`` is younger than ``min_age`` (``math.inf``: a running writer's, kept
    whatever its age); ``itself``: the entry's own age, not its newest file's."""
    if min_age == math.inf:
        return True
    return bool(min_age) and (_own_age if itself else _age)(store, key, now) < min_age


def _young(min_age: float) -> str:
    return f"younger than {min_age:g} s: a save may be in progress"


def _clear_folder(store: Store, folder: str, report: Cleanup, keep: set[str] = frozenset(),  # type: ignore[assignment]
                  *, min_age: float = 0.0, now: float = 0.0, why: str = "") -> bool:
    """Remove the data files and temporary files in a step's folder (not those in ``keep``),
    then the folder if that empties it (reported as one entry when it goes whole); True if
    the folder is gone."""
    removable, left = [], 0
    for entry in store.scan(folder):
        key = f"{folder}/{entry.name}"
        if entry.name in keep:
            left += 1
        elif entry.kind in ("file", "link") and (is_data_file(entry.name) or is_temp(entry.name)
                                                 or is_chunk_file(entry.name)
                                                 or is_rank_file(entry.name)):
            if _too_young(store, key, now, min_age):
                report.kept.append((key, why or _young(min_age)))
                left += 1
            else:
                removable.append(key)
        else:
            report.kept.append((key, "not written by safepoint"))
            left += 1
    if not left and not keep and not min_age:  # nothing may be writing: the folder at once
        _remove(store, folder, report)
        return True
    if not left and not keep and _too_young(store, folder, now, min_age, itself=True):
        report.kept.append((folder, why or _young(min_age)))
        return False  # created just now: a save's next step is a file in it
    if not left and not keep:  # one entry in the report, removed file by file
        sizes = {key: _size(store, key) for key in removable}
        if report.dry_run:
            report.removed.append((folder, sum(sizes.values())))
            return True
        for key in removable:
            store.delete(key)
        if store.remove_empty_folder(folder):  # a file a save created meanwhile stays
            report.removed.append((folder, sum(sizes.values())))
            return True
        report.removed += list(sizes.items())
        report.kept.append((folder, "a save wrote into it meanwhile"))
        return False
    for key in removable:
        _remove(store, key, report)
    if not left and not report.dry_run:
        return store.remove_empty_folder(folder)
    return False


def collect_garbage(store: Store, name: str, *, min_age: float = 0.0, now: float | None = None,
                    deep: bool = True, dry_run: bool = False,
                    referenced: set[int] | None = None, writer: bool = False) -> Cleanup:
    """Remove leftovers of crashed saves under ``name``.

    Leftovers are step folders without a committed manifest, manifests above the newest
    committed step (a save that did not finish), temporary files, and (``deep``) data files
    that no manifest names, and chunk files no manifest names (:func:`_collect_chunks`).
    Only those at least ``min_age`` seconds old are removed, so that a save still in
    progress in another process is left alone; and none while the name's writer is running
    (its lease has a fresh heartbeat and, on this host, its process lives), however old:
    a save of a large state may take longer than any age, and the writer removes its own
    leftovers. ``writer``: the caller is that writer. A step whose manifest is damaged is
    never touched: it is evidence (``verify`` reports it, ``rm`` removes it).
    """
    now = time.time() if now is None else now  # before the lease is read: see below
    report = Cleanup(dry_run=dry_run)
    why = _young(min_age)
    running = None if writer else holder(store, name)
    if running is not None and running.state == "running":
        # Whatever a writer that takes the lease after this writes is younger than ``now``.
        min_age, why = math.inf, f"its writer, {running.who}, is running: a save may be in progress"
    try:
        latest = latest_manifest(store, name)
    except CorruptCheckpoint:
        latest = None
    entries = store.scan(name)
    listed = {e.name for e in entries}
    committed = set(committed_steps(store, name, None if latest is None else latest.step))
    if referenced is not None:  # an execution's checkpoints: those no record refers to go
        committed &= referenced
        if latest is not None and latest.step not in committed:
            _remove(store, latest_key(name), report)
    def old(key: str) -> bool:  # asked of candidates only: a stat each
        return not _too_young(store, key, now, min_age)

    dropped: set[int] = set()  # manifests removed here: their chunks are not referenced
    for entry in entries:
        key = f"{name}/{entry.name}"
        step = step_of_manifest(entry.name)
        if step is not None:
            if step in committed:
                continue
            if old(key):
                _remove(store, key, report)
                dropped.add(step)
            else:
                report.kept.append((key, why))
            continue
        if is_temp(entry.name):
            if old(key):
                _remove(store, key, report)
            continue
        if entry.name == CHUNKS and entry.kind == "dir":
            _collect_chunks(store, name, report, dropped, min_age=min_age, why=why)
            continue
        if is_rank_folder(entry.name) and entry.kind == "dir":  # a live job may still read it
            exchange = Cleanup(dry_run=dry_run)  # a young one is not news: not reported
            _clear_folder(store, key, exchange, min_age=max(min_age, knobs.LEFTOVER_MIN_AGE),
                          now=now)
            report.removed += exchange.removed
            continue
        step = step_of_folder(entry.name)
        if step is None or entry.kind != "dir":
            if entry.kind == "link":
                report.kept.append((key, "a symbolic link (never followed)"))
            continue
        if step not in committed or f"{entry.name}.json" not in listed:
            _clear_folder(store, key, report, min_age=min_age, now=now, why=why)
        elif deep:
            try:
                manifest = read_manifest(store, name, step)
            except (CorruptCheckpoint, CheckpointNotFound):
                report.kept.append((key, "its manifest is damaged (evidence: see verify)"))
                continue
            named = {rel.rsplit("/", 1)[-1] for rel, _ in manifest.files}
            _clear_folder(store, key, report, keep=named | {LOCK}, min_age=min_age, now=now, why=why)
    if "lease" in listed:
        found = tickets(store, name)
        for generation in sorted(found)[:-1]:  # writers a newer one took over from: fenced
            key = ticket_key(name, generation) + (".released" if found[generation] else "")
            with contextlib.suppress(FileNotFoundError):
                _remove(store, key, report)
    return report


def _collect_chunks(store: Store, name: str, report: Cleanup, dropped: set[int], *,
                    min_age: float, why: str) -> None:
    """Remove the chunk files that no manifest of ``name`` names (read in one stable pass,
    after the clock is read) and that are at least ``min_age`` seconds old.

    Safe while the name's writer saves: a save names only chunk files that it wrote itself
    (younger than ``min_age`` while it is in flight) or that a kept manifest names, and
    a kept manifest is in the pass or newer than its listing (``format.chunks``).
    """
    now = time.time()  # before the listing: a chunk written after it is younger
    references = chunk_references(store, name, skip=dropped)
    folder = f"{name}/{CHUNKS}"
    for entry in store.scan(folder):
        key, rel = f"{folder}/{entry.name}", f"{CHUNKS}/{entry.name}"
        if entry.kind in ("file", "link") and (is_chunk_file(entry.name) or is_temp(entry.name)):
            if rel in references.files:
                continue
            if references.problem:
                report.kept.append((key, references.problem))
            elif _too_young(store, key, now, min_age):
                report.kept.append((key, why))
            else:
                _remove(store, key, report)
        else:
            report.kept.append((key, "not written by safepoint"))


def remove_step(store: Store, name: str, step: int) -> list[str]:
    """Remove one step's manifest (first, so it vanishes atomically); returns the keys of
    its data folder, for the caller to delete now or later."""
    store.delete(manifest_key(name, step))
    return [data_folder(name, step)]


def remove_steps(store: Store, name: str) -> None:
    """Remove every step of ``name`` (the newest-step record first), and nothing else."""
    store.delete(latest_key(name))
    for step in manifest_steps(store, name):
        store.delete(manifest_key(name, step))
    for entry in store.scan(name):
        if entry.kind == "dir" and (step_of_folder(entry.name) is not None or entry.name == CHUNKS):
            _clear_folder(store, f"{name}/{entry.name}", Cleanup())


def remove_name(store: Store, name: str) -> Cleanup:
    """Remove everything safepoint wrote under ``name`` (newest-step record and manifests
    first); entries it did not write are kept and reported."""
    report = Cleanup()
    with contextlib.suppress(FileNotFoundError):
        if store.stat(name).kind == "link":  # the link only, never what it points at
            _remove(store, name, report)
            return report
    with contextlib.suppress(FileNotFoundError):
        if store.exists(latest_key(name)):
            _remove(store, latest_key(name), report)
    entries = store.scan(name)
    for entry in sorted(entries, key=lambda e: not e.name.endswith(".json")):
        key = f"{name}/{entry.name}"
        if entry.kind == "link":
            _remove(store, key, report)  # the link only, never what it points at
        elif step_of_manifest(entry.name) is not None or entry.name == LOCK or is_temp(entry.name) \
                or generation_of_segment(entry.name) is not None or entry.name == LEASE:
            _remove(store, key, report)
        elif (step_of_folder(entry.name) is not None or entry.name == CHUNKS) and entry.kind == "dir":
            _clear_folder(store, key, report)
        else:
            report.kept.append((key, "not written by safepoint"))
    if not report.kept:
        store.delete(name)
    return report


__all__ = ["Cleanup", "collect_garbage", "committed_steps", "is_name", "latest_manifest",
           "latest_problem", "list_names", "manifest_steps", "remove_name", "remove_step",
           "remove_steps",
           "require_store"]
