"""Numbered checkpoints of one name: save, restore, retention, asynchronous save.

Layout in the store (see :mod:`safepoint.format.layout`)::

    <name>/latest.json                  the newest step's manifest: its commit point
    <name>/<step, 12 digits>.json       one manifest per committed step
    <name>/<step, 12 digits>/<...>.bin  the step's data files (packs and large blobs)

A step is visible only once ``latest.json`` names it (or, for an older step rewritten with
``overwrite=True``, once its manifest is in place). Lookups of the newest step cost one
read whatever the number of steps; ``steps()`` is one listing. Files that no manifest names
are leftovers of crashed saves: reads never see them; ``gc`` removes them, and so does a
background sweep that the first save of a Checkpointer starts (for those older than
``knobs.LEFTOVER_MIN_AGE``; a listing of the name, so off the save's path; ``close()`` waits
for it).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from safepoint import knobs
from safepoint.checkpointer.distributed import (
    restore_distributed,
    save_distributed,
    should_save_together,
)
from safepoint.checkpointer.group import Group
from safepoint.checkpointer.snapshot import (
    Snapshot,
    check_snapshot,
    fork_save,
    parent_alive,
    shared_blobs,
)
from safepoint.checkpointer.steps import (
    Cleanup,
    collect_garbage,
    committed_steps,
    remove_name,
    remove_step,
)
from safepoint.committer import Committer, Pending
from safepoint.errors import (
    CheckpointNotFound,
    CorruptCheckpoint,
    InvalidName,
    SafepointError,
    SaveFailed,
    StaleAttempt,
    StepExists,
    WriteConflict,
    logger,
    warn_caller,
)
from safepoint.format import (
    CHUNKS,
    ChunkIndex,
    Manifest,
    Prepared,
    data_folder,
    json_copy,
    latest_key,
    load_tree,
    manifest_key,
    plain_json,
    prepare,
    read_manifest,
    write_checkpoint,
)
from safepoint.format.chunks import Place, Seen, quick_places, unchanged_share
from safepoint.format.collector import collector_paused
from safepoint.format.copying import copy_into
from safepoint.format.shards import Part
from safepoint.lease import Lease, release_when_dropped
from safepoint.policy import Policy, PolicyLike, Tick, as_policy, every
from safepoint.retention import Retention, keep_all, keep_best, keep_every, keep_last
from safepoint.signals import PREEMPT_SIGNALS, SignalGuard
from safepoint.stateful import capture, restore_into
from safepoint.store import ABSENT, Location, Store, check_name, open_store

log = logger("checkpointer")

_RETRIES = 1000
"""Times a reader starts over when the step it read was removed by retention meanwhile."""


class CorruptCheckpointWarning(UserWarning):
    """``restore()`` skipped a damaged checkpoint and fell back to an older one."""


@dataclass(frozen=True)
class Restored:
    """What :meth:`Checkpointer.restore` returns."""

    step: int
    state: Any
    metadata: dict[str, Any]


def split_location(name: str, location: Location) -> tuple[str, Location]:
    """Accept ``Checkpointer("runs/exp1")`` as name ``exp1`` in the store ``runs``.

    The store part never holds ``..``: a shorthand cannot climb out of the working folder.
    """
    if location is None and isinstance(name, str) and ("/" in name or "://" in name):
        root, _, base = name.rstrip("/").rpartition("/")
        if root.endswith(":/"):  # "s3://bucket" has no name part
            raise InvalidName(f"{name!r}: give a name after the bucket, e.g. {name.rstrip('/')}/job", name=name)
        if ".." in root.split("/"):
            raise InvalidName(
                f"{name!r}: the store part of a 'store/name' shorthand may not contain '..'; "
                "pass location= explicitly", name=name)
        if not root:  # "/exp1" is exp1 in "/", "exp1/" is just exp1
            return base, "/" if name.startswith("/") else None
        return base, root
    return name, location


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise InvalidName(f"step must be a non-negative int, not {step!r}", name=repr(step))
    return int(step)


def _sweep(store: Store, name: str) -> None:
    """Remove leftovers of crashed saves older than ``knobs.LEFTOVER_MIN_AGE`` (housekeeping
    in a thread of its own: it lists the name, and a failure is never the save's)."""
    with contextlib.suppress(Exception):
        collect_garbage(store, name, min_age=knobs.LEFTOVER_MIN_AGE, deep=False, writer=True)


def _retention(keep: int | Retention | None, keep_every_: int | None, keep_best_: int | None,
               best_metric: str | None, best_mode: Literal["min", "max"]) -> Retention:
    rules: list[Retention] = []
    if isinstance(keep, Retention):
        rules.append(keep)
    elif keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive int, a retention rule or None, not {keep!r}")
        rules.append(keep_last(keep))
    if keep_every_ is not None:
        rules.append(keep_every(keep_every_))
    if keep_best_ is not None:
        if not best_metric:
            raise ValueError("keep_best needs best_metric: the metadata key to rank steps by")
        rules.append(keep_best(best_metric, keep_best_, best_mode))
    elif best_mode not in ("min", "max"):
        raise ValueError(f"best_mode must be 'min' or 'max', not {best_mode!r}")
    if not rules:
        return keep_all()
    rule = rules[0]
    for other in rules[1:]:
        rule = rule | other
    return rule


class _SaveRequest:
    __slots__ = ("exchange", "manifest_extra", "metadata", "overwrite", "prepared", "step")

    def __init__(self, step: int, prepared: Any, metadata: Any, overwrite: bool, extra: Any) -> None:
        self.step, self.prepared, self.metadata = step, prepared, metadata
        self.overwrite, self.manifest_extra = overwrite, extra
        self.exchange: Callable[[Part], list[Part]] | None = None  # a distributed save's round 1


@dataclass(frozen=True)
class _Plan:
    """What a save looked at before writing: the newest step, whether this one becomes the
    newest, the manifest bytes an overwrite replaces, the expected newest-record version."""

    newest: int | None
    becomes_newest: bool
    previous: bytes | None
    expect: str | None


@dataclass(frozen=True)
class _Committed:
    """What a commit tells the bookkeeping (sent back by a forked snapshot process)."""

    becomes_newest: bool
    version: str | None
    manifest: Manifest
    seen: dict[Place, Seen] | None = None  # what a forked save saw at each chunk's place
    quick: dict[Place, int] | None = None  # incremental="auto": the XXH3 a full save took


class Checkpointer:
    """Numbered checkpoints of one name, in a local directory or at any fsspec URL.

    >>> ckpt = Checkpointer("train", keep=3)
    >>> ckpt.save(100, {"params": params, "step": 100}, metadata={"loss": 0.12})
    >>> restored = ckpt.restore()          # newest intact step
    >>> restored.step, restored.state, restored.metadata

    ``keep``: a retention rule (``keep_last(3) | keep_every(1000) | keep_best("loss", 2)``)
    or an int N for ``keep_last(N)``; ``keep_every``, ``keep_best``, ``best_metric`` and
    ``best_mode`` add rules to it. With none, every step is kept; the newest committed step
    is always kept, and retention runs only after a commit.

    ``policy``: when :meth:`should_save` says yes (``every(steps=500) | every(seconds=1800)``;
    ``save_interval_steps`` and ``save_interval_seconds`` are shorthands for those).
    ``handle_preemption=True``: SIGTERM or SIGUSR1 makes :meth:`should_save` say yes once
    and sets :attr:`preempted`. The first save takes the name's lease (one writer per
    name): a second writer is refused with :class:`~safepoint.errors.LeaseHeld` naming the
    first, unless ``takeover=True``. :meth:`close` lets it go.

    ``incremental=True``: large arrays and byte strings are cut into content-addressed
    chunks, and a chunk a kept step holds already is not written again (bytes written in
    proportion to bytes changed; see ``docs/format.md``). Retention then removes only the
    chunks no kept step names. ``incremental="auto"`` saves in full while much of the state
    changes between saves, and incrementally while most of it does not: each full save
    takes the XXH3 of the state's chunks (on a thread beside the writes) to see what
    changed since the last one (see :data:`~safepoint.knobs.AUTO_INCREMENTAL_ON`).

    ``snapshot``: how ``save(blocking=False)`` freezes the state before it returns.
    ``"copy"`` (the default) copies the large arrays into buffers reused across saves
    (blocks about one memory copy); ``"fork"`` forks a process that writes and commits the
    checkpoint from pages shared copy-on-write (blocks only for the ``fork()``; Linux, a
    local store, host memory only: see docs/checkpointer.md). Blocking saves write in the
    caller either way.
    """

    def __init__(
        self,
        name: str,
        *,
        location: Location = None,
        keep: int | Retention | None = None,
        keep_every: int | None = None,
        keep_best: int | None = None,
        best_metric: str | None = None,
        best_mode: Literal["min", "max"] = "min",
        durable: bool = True,
        allow_pickle: bool = False,
        policy: PolicyLike | None = None,
        save_interval_steps: int | None = None,
        save_interval_seconds: float | None = None,
        handle_preemption: bool = False,
        takeover: bool = False,
        fence: Callable[[], None] | None = None,
        lease: Lease | None = None,
        clock: Callable[[], float] = time.monotonic,
        storage_options: dict[str, Any] | None = None,
        incremental: bool | Literal["auto"] = False,
        snapshot: Snapshot = "copy",
        group: Group | None = None,
    ) -> None:
        name, location = split_location(name, location)
        self.name = check_name(name)
        self.store: Store = open_store(location, storage_options=storage_options)
        self.snapshot: Snapshot = check_snapshot(snapshot, self.store)
        self.retention = _retention(keep, keep_every, keep_best, best_metric, best_mode)
        self.durable = durable
        self.allow_pickle = allow_pickle
        self.policy: Policy | None = _save_policy(policy, save_interval_steps, save_interval_seconds)
        self.fence = fence
        self.takeover = takeover
        self.lease: Lease | None = lease
        self._own_lease = lease is None
        self._clock = clock
        self._last_save_time = clock()
        self._last_step: int | None = None
        self._buffers: dict[int, np.ndarray] = {}  # async snapshot buffers, by blob index
        self._committer = Committer(background=True, name=self.name, what="asynchronous save")
        self._lock = threading.Lock()
        self._sweep: threading.Thread | None = None  # the first save's sweep of old leftovers
        self._metrics: dict[int, dict[str, Any]] = {}
        self._latest: tuple[str | None, int | None] | None = None  # (version, step) seen last
        self._expect: str | None = None  # the newest-step record's version, as we wrote it
        self._deferred: list[str] = []  # data of removed steps, deleted a save later
        self._removal: threading.Thread | None = None  # deleting the data deferred until now
        self._removing: list[str] = []  # what it deletes
        self._chunks: ChunkIndex | None = None  # the kept steps' chunk files, once looked at
        self._chunks_known = False
        self._quick: dict[Place, int] = {}  # "auto": the XXH3 of each place at the last full save
        self._quick_seed = int.from_bytes(os.urandom(8), "little")
        self._chunked_run = 0  # "auto": incremental saves (that saw chunks) since it switched
        self._turns = 0  # "auto": the index's saves over at the last choice
        self.incremental = incremental
        self.group = group
        if group is not None:
            if incremental or snapshot != "copy":
                raise ValueError("a distributed Checkpointer (group=) saves neither "
                                 "incrementally nor with snapshot='fork' yet")
            group.bind(self.store, self.name)
        self._preempt_agreed = False
        self._preemption: SignalGuard | None = None
        if handle_preemption:
            if threading.current_thread() is not threading.main_thread():
                raise SafepointError("handle_preemption=True needs the main thread (signal handlers)")
            self._preemption = SignalGuard(lambda signum: True, PREEMPT_SIGNALS).install()
            weakref.finalize(self, self._preemption.restore)

    # ----------------------------------------------------------------- listing

    def _newest(self) -> tuple[int | None, Manifest | None]:
        """The newest committed step, and its manifest when it was read just now.

        One ``stat`` when nothing changed since the last look, one read when it did; a
        listing only when ``latest.json`` is missing or damaged (recovery).
        """
        version = self.store.version(latest_key(self.name))
        if version is not None and self._latest is not None and self._latest[0] == version:
            return self._latest[1], None
        manifest = None
        if version is not None:
            with contextlib.suppress(CorruptCheckpoint, CheckpointNotFound):
                manifest = read_manifest(self.store, self.name)
        if manifest is not None:
            self._latest = (version, manifest.step)
            return manifest.step, manifest
        steps = committed_steps(self.store, self.name, None)  # recovery: every manifest
        self._latest = (version, steps[-1] if steps else None)
        return self._latest[1], None

    def steps(self) -> list[int]:
        """Committed steps, ascending (one listing of the name's folder)."""
        newest, _ = self._newest()
        return committed_steps(self.store, self.name, newest)

    def latest_step(self) -> int | None:
        """The newest committed step, or None (one ``stat``, or one read, however many
        steps there are)."""
        return self._newest()[0]

    def manifest(self, step: int) -> Manifest:
        """The verified manifest of ``step`` (metadata, tree structure, blob list)."""
        return read_manifest(self.store, self.name, _check_step(step))

    # ------------------------------------------------------------------ saving

    def save(
        self,
        step: int,
        state: Any,
        *,
        metadata: dict[str, Any] | None = None,
        blocking: bool = True,
        overwrite: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> Pending:
        """Save ``state`` as ``step``; visible to readers only once fully committed.

        ``blocking=False`` returns as soon as the state is copied into buffers reused across
        saves (or, with ``snapshot="fork"``, as soon as a process is forked that shares the
        state's pages copy-on-write); writing and committing go on in the background (one
        save in flight at a time; an error there is raised by the returned handle's
        ``wait()``, by the next call or by :meth:`wait`). A step that exists, or one older
        than the newest, is refused unless ``overwrite=True``. Returns a handle to the save (done at once when blocking).
        """
        step = _check_step(step)
        self._committer.flush()  # the removal of old data may go on meanwhile
        if self.group is not None:
            return save_distributed(self, self.group, step, state, metadata=metadata,
                                    blocking=blocking, overwrite=overwrite, extra=extra)
        latest = None if overwrite else self.latest_step()
        if latest is not None and step <= latest:
            if self.lease is not None:  # taken over: say so, rather than advise overwrite=True
                self.lease.check(fresh=True)
            exists = step == latest or self.store.exists(manifest_key(self.name, step))
            what = "already exists" if exists else f"is older than the newest step {latest}"
            raise StepExists(
                f"{self.name!r} step {step} {what} in {self.store.url}; pass overwrite=True to "
                "replace it, or save a newer step", name=self.name, step=step)
        if blocking:  # the whole save: nothing it makes is cyclic garbage (see format.collector)
            with collector_paused():
                return self._save(step, state, latest, metadata, True, overwrite, extra)
        return self._save(step, state, latest, metadata, False, overwrite, extra)

    def _save(self, step: int, state: Any, latest: int | None, metadata: dict[str, Any] | None,
              blocking: bool, overwrite: bool, extra: dict[str, Any] | None) -> Pending:
        plain = plain_json(state)  # plain JSON values only: nothing to capture, its text made in C
        tree = state if plain is not None else capture(state)
        forked = not blocking and self.snapshot == "fork"
        # An asynchronous save copies what the caller may change (arrays, bytearrays, plain
        # containers) into buffers reused across saves; bytes and pickles are immutable already.
        # A forked one shares the pages copy-on-write instead (host memory only).
        snapshot = None if blocking or forked else self._snapshot
        prepared = prepare(tree, allow_pickle=self.allow_pickle, snapshot=snapshot,
                           share=blocking or forked, plain=plain, host_only=forked)
        metadata, extra = json_copy(metadata, "metadata"), json_copy(extra, "extra")
        request = _SaveRequest(step, prepared, metadata, overwrite, extra)
        self._last_save_time, self._last_step = self._clock(), step
        # a holder looked at the newest step just now: no second look
        seen = (latest,) if self.lease is not None and not overwrite else None
        if forked:
            return self._save_forked(request, seen)
        if blocking:
            self._write(request, seen=seen)
            done = Pending(step)
            done._finish()
            return done
        return self._committer.submit(lambda: self._write(request), tag=step)

    def _snapshot(self, index: int, array: np.ndarray) -> np.ndarray:
        buffer = self._buffers.get(index)
        if buffer is None or buffer.shape != array.shape or buffer.dtype != array.dtype:
            buffer = np.empty_like(array, order="C")
            self._buffers[index] = buffer
        copy_into(buffer, array)
        return buffer

    def _take_lease(self) -> Lease:
        """The name's lease, taken at the first write (one writer per name)."""
        if self.lease is None:
            self.lease = Lease.acquire(self.store, self.name, kind="checkpointer",
                                       takeover=self.takeover, durable=self.durable)
            weakref.finalize(self, release_when_dropped, self.lease)
            self._expect = None  # others may have written since this object last held it
            self._chunks_known = False
            previous = self.lease.previous
            if self.store.conditional and previous is not None and previous.state != "released":
                # fence a writer that may still hold the newest-step record's version
                with contextlib.suppress(FileNotFoundError):
                    self.store.delete(latest_key(self.name))
                self._expect = ABSENT
        return self.lease

    def _fence(self) -> None:
        if self.lease is not None:
            self.lease.check()
        if self.fence is not None:
            self.fence()

    def _write(self, request: _SaveRequest, *, seen: tuple[int | None] | None = None) -> None:
        """Write and commit ``request``; ``seen``: the newest step, looked at just now
        under the lease held already (else it is looked at here)."""
        with self._lock:
            self._take_lease()
            self._start_sweep()
            self._claim_folder(request.step)
            chunks = self._chunk_index()
            plan = self._plan(request, seen)
            try:
                committed = self._commit(request, plan, self._fence, chunks=chunks)
            except BaseException:
                self._expect = None  # a failed commit may have rolled the record back
                self._chunks_known = False  # ... or left its step visible: read them again
                raise
            self._committed(request.step, committed, chunks)

    def _start_sweep(self) -> None:
        """At the first save, start the sweep of old crash leftovers (in this process)."""
        if self._sweep is None:
            self._sweep = threading.Thread(target=_sweep, args=(self.store, self.name),
                                           name=f"safepoint-sweep-{self.name}", daemon=True)
            self._sweep.start()

    def _plan(self, request: _SaveRequest, seen: tuple[int | None] | None) -> _Plan:
        step = request.step
        newest = seen[0] if seen is not None else self._newest()[0]
        becomes_newest = newest is None or step >= newest
        previous = None
        if request.overwrite and self.store.exists(manifest_key(self.name, step)):
            with contextlib.suppress(FileNotFoundError, CorruptCheckpoint):
                previous = self.store.read(manifest_key(self.name, step),
                                           limit=knobs.MAX_MANIFEST_BYTES)
        expect = self._expect if self.store.conditional and becomes_newest else None
        if expect is None and self.store.conditional and becomes_newest:
            expect = self.store.version(latest_key(self.name)) or ABSENT
        return _Plan(newest, becomes_newest, previous, expect)

    def _commit(self, request: _SaveRequest, plan: _Plan, fence: Callable[[], None], *,
                chunks: ChunkIndex | None = None, parallel: bool | None = None) -> _Committed:
        """Write the data files and publish the manifest (``fence`` runs just before); an
        overwrite then removes the files of the step it replaced. Takes no lock and logs
        nothing: a forked snapshot process runs it too."""
        step = request.step
        expect, exclusive = plan.expect, True  # a new step's manifest is created, never replaced
        measured: list[dict[Place, int] | None] = [None]
        scan = None
        if self.incremental == "auto" and not self._chunking:  # see what changed, beside the writes
            blobs = request.prepared.blobs
            measured[0] = {}
            if any(blob.data.nbytes >= knobs.CHUNK_BYTES for blob in blobs):
                scan = threading.Thread(target=self._scan, args=(blobs, measured),
                                        name=f"safepoint-scan-{self.name}", daemon=True)
                scan.start()
        while True:
            try:
                manifest, version = write_checkpoint(
                    self.store, self.name, step, request.prepared,
                    metadata=request.metadata, durable=self.durable,
                    extra=request.manifest_extra, before_commit=fence,
                    newest=plan.becomes_newest, previous=plan.previous,
                    previous_latest=plan.newest, expect=expect, exclusive=exclusive,
                    chunks=chunks if self._chunking else None, parallel=parallel,
                    exchange=request.exchange)
                break
            except WriteConflict as exc:  # someone else published: fenced, or a rogue writer
                self._expect = None
                self._take_lease().check(fresh=True)
                if exclusive and exc.key == manifest_key(self.name, step):
                    # Still the holder: the manifest is a leftover of a writer of this
                    # name that died before publishing it, so it may be replaced.
                    exclusive = False
                    continue
                raise SaveFailed(
                    f"{self.name!r} step {step}: another writer changed the newest step of "
                    f"{self.store.url}/{self.name} meanwhile; this save did not happen",
                    name=self.name, step=step) from exc
            finally:
                if scan is not None:
                    scan.join()
        if request.overwrite:
            referenced = {rel.rsplit("/", 1)[-1] for rel, _ in manifest.files}
            folder = f"{self.name}/{step:012d}"
            for entry in self.store.list(folder):
                if entry not in referenced and not entry.startswith("."):
                    with contextlib.suppress(OSError):
                        self.store.delete(f"{folder}/{entry}")
        return _Committed(plan.becomes_newest, version, manifest, quick=measured[0])

    def _scan(self, blobs: list[Any], into: list[dict[Place, int] | None]) -> None:
        """The XXH3 of the state's chunk places (``incremental="auto"``), into ``into[0]``;
        None there if it failed: that save's measure is lost, never the save."""
        try:
            into[0] = quick_places(blobs, self._quick_seed)
        except Exception as exc:
            into[0] = None
            log.debug("safepoint: %r: measuring what changed failed: %s", self.name, exc)

    def _committed(self, step: int, committed: _Committed, chunks: ChunkIndex | None) -> None:
        """The bookkeeping after a commit, in the saving process (after a forked commit
        too): the newest-step record as we wrote it, the step's metrics, retention."""
        log.debug("safepoint: %r committed step %d in %s", self.name, step, self.store.url)
        if committed.becomes_newest:
            self._latest = (committed.version, step)
            self._expect = committed.version if self.store.conditional else None
        self._metrics[step] = committed.manifest.metadata
        if chunks is not None:  # chunks only the replaced manifest named: a save later
            self._deferred += [f"{self.name}/{rel}" for rel in chunks.add(committed.manifest)]
        if self.incremental == "auto":
            self._choose(committed, chunks)
        try:
            self._apply_retention(step)
        except OSError as exc:
            raise SaveFailed(
                f"{self.name!r} step {step} was committed, but removing old steps "
                f"failed: {exc}; run `safepoint gc` later", name=self.name, step=step,
            ) from exc

    def _save_forked(self, request: _SaveRequest, seen: tuple[int | None] | None) -> Pending:
        """Fork a process that writes and commits ``request`` from pages shared
        copy-on-write; the bookkeeping waits for it on the committer (one save in flight)."""
        step = request.step
        with self._lock:
            self._take_lease().check()  # the parent holds the lease and its heartbeat
            self._start_sweep()
            self._claim_folder(step)
            chunks = self._chunk_index()  # the child reads it (its lock is free: no save runs)
            for index in shared_blobs(request.prepared):  # not copy-on-write: copy them now
                _copy_blob(request.prepared, index, self._snapshot)
            alive = parent_alive(os.getpid())

            def fence() -> None:  # in the child, at its commit point
                self._fence()
                alive()

            def in_child() -> _Committed:  # runs in the forked process only
                turns = chunks.turns if chunks is not None else 0
                committed = self._commit(request, self._plan(request, seen), fence,
                                         chunks=chunks, parallel=False)
                if chunks is None or chunks.turns == turns:  # it saw no chunk
                    return committed
                return replace(committed, seen=chunks.seen())  # for the parent

            child = fork_save(in_child, f"{self.name!r} step {step}")
        request.prepared = None  # the child has the pages; let the caller's arrays go

        def finish() -> None:
            with self._lock:
                try:
                    committed = child.wait()
                except BaseException:
                    self._latest, self._expect = None, None  # look again at the next save
                    self._chunks_known = False  # and at the kept steps' chunks
                    raise
                if chunks is not None and committed.seen is not None:
                    chunks.adopt(committed.seen)
                self._committed(step, committed, chunks)

        return self._committer.submit(finish, tag=step)

    def _chunk_index(self) -> ChunkIndex | None:
        """The chunk files of the kept steps (read once per lease, from their manifests),
        or None when this name has none and this Checkpointer does not write any now."""
        if not self._chunks_known:
            self._chunks = None
            if self._chunking or self.store.exists(f"{self.name}/{CHUNKS}"):
                self._chunks = ChunkIndex.load(self.store, self.name, self.steps())
            self._chunks_known, self._turns = True, 0
        return self._chunks

    @property
    def incremental(self) -> bool | Literal["auto"]:
        """Whether saves are incremental: True, False or "auto" (chosen save by save)."""
        return self._incremental

    @incremental.setter
    def incremental(self, value: bool | Literal["auto"]) -> None:
        if isinstance(value, str) and value != "auto":
            raise ValueError(f"incremental must be True, False or 'auto', not {value!r}")
        self._incremental: bool | Literal["auto"] = value if value == "auto" else bool(value)
        self._chunking = self._incremental is True  # whether the next save is incremental

    def _choose(self, committed: _Committed, chunks: ChunkIndex | None) -> None:
        """``incremental="auto"``: whether the next save is incremental, from what this one
        saw. A full save compares the XXH3 of each chunk's place with the last full
        save's; an incremental one counts the bytes it wrote (the first of a run writes
        all, no kept step holding chunks yet, and so does not count)."""
        if not self._chunking:  # a full save; quick is None where its scan failed
            if committed.quick is None:
                return
            share = unchanged_share(self._quick, committed.quick)
            self._quick = committed.quick
            if share is not None and share >= knobs.AUTO_INCREMENTAL_ON:
                log.debug("safepoint: %r: %.0f%% unchanged, saving incrementally", self.name,
                          100 * share)
                self._chunking, self._chunked_run = True, 0
                if self._chunks is None:
                    self._chunks_known = False  # read the kept steps' chunks at the next save
        elif chunks is not None and chunks.turns != self._turns:  # it saw chunks
            self._turns = chunks.turns
            self._chunked_run += 1
            share = chunks.reused()
            if self._chunked_run > 1 and share is not None and share < knobs.AUTO_INCREMENTAL_OFF:
                log.debug("safepoint: %r: %.0f%% reused, saving in full", self.name, 100 * share)
                self._chunking = False
                self._quick = {place: seen.quick for place, seen in chunks.seen().items()
                               if seen.quick}
                self._quick_seed = chunks.seed

    def wait(self) -> None:
        """Wait for the save in flight, if any, and for the removal of old steps' data that
        the last save started; raise the save's error if it failed."""
        self._committer.flush()
        self._join_removal()

    # --------------------------------------------------------------- retention

    def _metric(self, step: int, key: str) -> float | None:
        if step not in self._metrics:
            try:
                self._metrics[step] = self.manifest(step).metadata
            except (CorruptCheckpoint, CheckpointNotFound):
                return None
        value = self._metrics[step].get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value)

    def kept_steps(self, steps: list[int]) -> set[int]:
        """Which of ``steps`` (ascending) the retention rule keeps (always the newest)."""
        if not steps:
            return set()
        return self.retention.keep(steps, self._metric) | {steps[-1]}

    def _apply_retention(self, newest: int) -> None:
        deferred, self._deferred = self._deferred, []
        self._remove_later(deferred)
        if self.retention.keeps_everything:
            return  # keep everything: no need to list
        steps = self.steps()
        if newest not in steps:  # never delete anything unless the new step is committed
            return
        kept = self.kept_steps(steps)
        for step in steps:
            if step not in kept:
                # The manifest goes now (the step vanishes); its data a save later, so that
                # a reader that already holds the manifest can still read it.
                self._deferred += remove_step(self.store, self.name, step)
                self._deferred += self._forget_chunks(step)
                self._metrics.pop(step, None)

    def _remove_later(self, keys: list[str]) -> None:
        """Delete the data of steps removed a save ago (no reader needs it now) in a thread
        of its own: it is housekeeping that no save waits for (an incremental save that
        changed every chunk leaves hundreds of chunk files), and gc removes whatever it
        leaves. The one before it is joined first; a fenced writer deletes nothing."""
        self._join_removal()
        if not keys:
            return
        lease = self.lease

        def remove() -> None:
            try:
                if lease is not None:
                    lease.check()
                for key in keys:
                    with contextlib.suppress(OSError):
                        self.store.delete(key)
            except StaleAttempt:
                pass
            except Exception as exc:  # housekeeping, never a save's failure: gc removes the rest
                log.debug("safepoint: %r: removing old data failed: %s", self.name, exc)

        if self.group is not None:  # the other ranks may write into these folders as soon
            remove()                 # as they next save: the coordinator cannot claim them
            return
        # not a daemon: a process that exits without close() still finishes the deletion
        self._removal = threading.Thread(target=remove, name=f"safepoint-remove-{self.name}")
        self._removing = keys
        self._removal.start()

    def _join_removal(self) -> None:
        if self._removal is not None:
            self._removal.join()
            self._removal = None
            self._removing = []

    def _claim_folder(self, step: int) -> None:
        """A save is about to write into ``step``'s data folder: the data of a removed
        step of that number must not be deleted from under it (``overwrite=True`` saves
        again a step removed a save ago)."""
        folder = data_folder(self.name, step)
        self._deferred = [key for key in self._deferred if key != folder]
        if folder in self._removing:
            self._join_removal()

    def _forget_chunks(self, step: int) -> list[str]:
        """The chunk files only the removed ``step`` named (to delete)."""
        if self._chunks is None:
            return []
        return [f"{self.name}/{rel}" for rel in self._chunks.forget(step)]

    def delete(self, step: int) -> None:
        """Remove one step (its manifest first, so it vanishes atomically)."""
        step = _check_step(step)
        self.wait()
        self._take_lease().check(fresh=True)  # deleting is writing: one writer per name
        steps = self.steps()
        if step not in steps:
            raise CheckpointNotFound(f"{self.name!r} has no step {step} in {self.store.url}",
                                     name=self.name, step=step)
        if step == steps[-1]:  # the newest: the record of the newest moves back first
            earlier = [s for s in steps if s < step]
            if earlier:
                data = self.store.read(manifest_key(self.name, earlier[-1]),
                                       limit=knobs.MAX_MANIFEST_BYTES)
                self.store.commit(latest_key(self.name), data, durable=self.durable)
            else:
                self.store.delete(latest_key(self.name))
            self._latest, self._expect = None, None  # the record moved: look again
        self._chunk_index()
        for folder in remove_step(self.store, self.name, step) + self._forget_chunks(step):
            with contextlib.suppress(FileNotFoundError):
                self.store.delete(folder)
        self._metrics.pop(step, None)

    def delete_all(self) -> Cleanup:
        """Remove every step and leftover of this name (entries safepoint did not write are
        kept and reported)."""
        self.wait()
        self._latest, self._expect = None, None
        self._chunks_known = False
        lease = self._take_lease()
        lease.check(fresh=True)
        try:
            return remove_name(self.store, self.name)
        finally:  # the lease went with the name; a later save takes a new one
            lease.forget()
            if self._own_lease:
                self.lease = None

    def gc(self, *, min_age: float = 0.0) -> list[str]:
        """Remove leftovers of crashed saves under this name; returns the removed keys."""
        self.wait()
        removed = collect_garbage(self.store, self.name, min_age=min_age, writer=self.lease is not None).removed
        return [key for key, _ in removed]

    def _keep_only(self, referenced: set[int]) -> None:
        """Remove the steps not in ``referenced`` and crash leftovers (an execution's log
        knows which of its checkpoints are alive); the newest-step record may move."""
        self.wait()
        collect_garbage(self.store, self.name, referenced=referenced, deep=False, writer=True)
        self._latest, self._expect = None, None
        self._chunks_known = False

    # --------------------------------------------------------------- restoring

    def restore(
        self,
        step: int | None = None,
        *,
        into: Any = None,
        mmap: bool = False,
        allow_pickle: bool | None = None,
    ) -> Restored:
        """The newest intact step (or ``step``), verified against its checksums.

        Without ``step``, a damaged newest checkpoint is skipped with a
        :class:`CorruptCheckpointWarning` and the next older intact one is returned; a step
        removed by retention while it was being read is not damage: the newest is read
        again. With ``step``, damage raises :class:`CorruptCheckpoint`. ``into``: a live
        tree (modules, iterators, RNGs, arrays) to load the state into in place, all or
        nothing; it is returned as ``state``. ``mmap=True`` maps large arrays read-only
        instead of reading them.
        """
        self.wait()
        with collector_paused():  # nothing a restore makes is cyclic garbage
            return self._restore(step, into, mmap, allow_pickle)

    def _restore(self, step: int | None, into: Any, mmap: bool, allow_pickle: bool | None) -> Restored:
        pickle_ok = self.allow_pickle if allow_pickle is None else allow_pickle
        if self.group is not None:
            return restore_distributed(self, self.group, None if step is None else _check_step(step),
                                       into, mmap, pickle_ok)
        if step is not None:
            restored = self._restore_step(_check_step(step), into, mmap, pickle_ok)
            log.debug("safepoint: %r restored step %d from %s", self.name, restored.step,
                      self.store.url)
            return restored
        restored, fell_back = self._restore_newest(into, mmap, pickle_ok)
        log.info("safepoint: %r restored step %d from %s%s", self.name, restored.step,
                 self.store.url, " (a fallback: the newer steps are damaged)" if fell_back else "")
        return restored

    def _restore_newest(self, into: Any, mmap: bool, pickle_ok: bool) -> tuple[Restored, bool]:
        """The newest intact step, and whether a damaged newer one was skipped for it."""
        for _ in range(_RETRIES):
            try:
                newest = read_manifest(self.store, self.name)
            except CheckpointNotFound:
                newest = None
            except CorruptCheckpoint:  # the listing finds the steps; each damaged one warns
                return self._restore_fallback(None, into, mmap, pickle_ok)
            if newest is None:
                return self._restore_fallback(None, into, mmap, pickle_ok)
            try:
                return self._restore_step(newest.step, into, mmap, pickle_ok, newest), False
            except CorruptCheckpoint as exc:
                if self._removed_meanwhile(newest.step):
                    continue
                warn_caller(f"skipping damaged checkpoint {self.name!r} step {newest.step}: {exc}",
                            CorruptCheckpointWarning, log=log)
                restored, _ = self._restore_fallback(newest.step, into, mmap, pickle_ok)
                return restored, True
        raise SafepointError(
            f"{self.name!r} in {self.store.url}: every step read was removed by retention "
            f"before it could be read, {_RETRIES} times; the writer saves faster than this "
            "reader reads")

    def _removed_meanwhile(self, step: int) -> bool:
        """Whether ``step`` was removed (by retention) since it was read, rather than damaged."""
        return not self.store.exists(manifest_key(self.name, step))

    def _restore_fallback(self, below: int | None, into: Any, mmap: bool,
                          allow_pickle: bool) -> tuple[Restored, bool]:
        steps = committed_steps(self.store, self.name, None)
        if below is not None:
            steps = [s for s in steps if s < below]
        elif not steps:
            raise CheckpointNotFound(
                f"no checkpoint named {self.name!r} in {self.store.url}", name=self.name)
        skipped = False
        for candidate in reversed(steps):
            try:
                return self._restore_step(candidate, into, mmap, allow_pickle), skipped
            except CheckpointNotFound:
                continue  # removed meanwhile
            except CorruptCheckpoint as exc:
                if self._removed_meanwhile(candidate):
                    continue
                skipped = True
                warn_caller(f"skipping damaged checkpoint {self.name!r} step {candidate}: {exc}",
                            CorruptCheckpointWarning, log=log)
        raise CorruptCheckpoint(
            f"every checkpoint of {self.name!r} in {self.store.url} is damaged; "
            "`safepoint verify` lists the problems")

    def _restore_step(self, step: int, into: Any, mmap: bool, allow_pickle: bool,
                      manifest: Manifest | None = None, *,
                      rank: tuple[int, int] | None = None) -> Restored:
        if manifest is None:
            try:
                manifest = read_manifest(self.store, self.name, step)
            except CheckpointNotFound as exc:
                raise CheckpointNotFound(f"{self.name!r} has no step {step} in {self.store.url}",
                                         name=self.name, step=step) from exc
            except CorruptCheckpoint as exc:
                exc.step = step
                raise
        target = capture(into) if into is not None else None
        # the manifest was read for this restore alone: its plain subtrees become the state
        loaded = load_tree(self.store, manifest, allow_pickle=allow_pickle, mmap=mmap, target=target,
                           share=True, rank=rank)
        if into is None:
            return Restored(step=step, state=loaded.tree, metadata=manifest.metadata)
        state = restore_into(into, loaded.tree, before_load=loaded.fill)
        return Restored(step=step, state=state, metadata=manifest.metadata)

    # ------------------------------------------------------- training helpers

    @property
    def preempted(self) -> bool:
        """A preemption signal (SIGTERM, SIGUSR1) arrived: save, and stop. With a group:
        one arrived at any rank, as agreed by the last :meth:`should_save`."""
        if self.group is not None:
            return self._preempt_agreed
        return self._preemption is not None and self._preemption.pending is not None

    def should_save(self, step: int) -> bool:
        """Whether the policy says ``step`` is due (``save_interval_steps``: steps divisible
        by it; ``save_interval_seconds``: that long since the last save), or a preemption
        signal arrived (then save, and stop: check :attr:`preempted`).

        With a group and ``handle_preemption=True`` it is a collective call: the ranks vote,
        so that a signal at any rank makes every rank save the same step. The policy is
        asked of the coordinator only, and its answer is every rank's."""
        if self.group is not None:
            return should_save_together(self, self.group, step)
        if self.preempted:
            return True
        if self.policy is None:
            return False
        since = step - self._last_step if self._last_step is not None else step
        return self.policy(Tick(items=since, last_checkpoint_at=self._last_save_time, step=step,
                                clock=self._clock))

    # ---------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Wait for the save in flight and let go of the name's lease (a later save takes
        it again); the checkpointer stays usable."""
        self.wait()
        if self._sweep is not None:
            self._sweep.join()
        if self._own_lease and self.lease is not None:
            self.lease.release()
            self.lease = None
        if self._preemption is not None:
            self._preemption.restore()
        if self.group is not None:
            self.group.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[int]:
        return iter(self.steps())

    def __repr__(self) -> str:
        return f"Checkpointer({self.name!r}, location={self.store.url!r})"


def _copy_blob(prepared: Prepared, index: int,
               snapshot: Callable[[int, np.ndarray], np.ndarray]) -> None:
    """Point blob ``index`` at a copy of its bytes (a snapshot buffer)."""
    blob = prepared.blobs[index]
    blob.data = snapshot(index, np.frombuffer(blob.data, np.uint8)).data


def _save_policy(policy: PolicyLike | None, steps: int | None, seconds: float | None) -> Policy | None:
    parts = [as_policy(policy)] if policy is not None else []
    if steps is not None:
        parts.append(every(steps=steps))
    if seconds is not None:
        parts.append(every(seconds=seconds))
    if not parts:
        return None
    rule = parts[0]
    for other in parts[1:]:
        rule = rule | other
    return rule
