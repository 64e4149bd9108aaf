"""Numbered checkpoints of one name: save, restore, retention, asynchronous save.

Layout in the store::

    <name>/<step, 12 digits>/manifest.json     committed last, atomically
    <name>/<step, 12 digits>/<save id>-<i>.bin one raw blob per large array

A step is visible only once its manifest is committed. Folders and blobs that no manifest
names are leftovers of crashed saves: reads never see them; ``gc`` removes them, and so does
the first save of a Checkpointer for those older than :data:`LEFTOVER_MIN_AGE`.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import signal
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from safepoint.errors import (
    CheckpointNotFound,
    CorruptCheckpoint,
    InvalidName,
    SafepointError,
    SaveFailed,
    StepExists,
)
from safepoint.format import (
    MANIFEST,
    Manifest,
    json_copy,
    load_tree,
    prepare,
    read_manifest,
    step_key,
    write_checkpoint,
)
from safepoint.stateful import capture, restore_into
from safepoint.store import Location, Store, check_name, open_store

LEFTOVER_MIN_AGE = 3600.0
"""Seconds after which the first save of a Checkpointer removes crash leftovers by itself.

Younger ones may belong to a save in flight in another process (a job attempt being taken
over), so only an explicit ``gc()`` removes them.
"""


class CorruptCheckpointWarning(UserWarning):
    """``restore()`` skipped a damaged checkpoint and fell back to an older one."""


@dataclass(frozen=True)
class Restored:
    """What :meth:`Checkpointer.restore` returns."""

    step: int
    state: Any
    metadata: dict[str, Any]


def split_location(name: str, location: Location) -> tuple[str, Location]:
    """Accept ``Checkpointer("runs/exp1")`` as name ``exp1`` in the store ``runs``."""
    if location is None and isinstance(name, str) and ("/" in name or "://" in name):
        root, _, base = name.rstrip("/").rpartition("/")
        if root.endswith(":/"):  # "s3://bucket" has no name part
            raise InvalidName(f"{name!r}: give a name after the bucket, e.g. {name.rstrip('/')}/job", name=name)
        if not root:  # "/exp1" is exp1 in "/", "exp1/" is just exp1
            return base, "/" if name.startswith("/") else None
        return base, root
    return name, location


def _is_step_folder(entry: str) -> bool:
    return entry.isascii() and entry.isdigit()


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise InvalidName(f"step must be a non-negative int, not {step!r}", name=repr(step))
    return int(step)


def list_steps(store: Store, name: str) -> list[int]:
    """Committed steps of ``name`` (folders with a manifest), ascending."""
    steps = []
    for entry in store.list(name):
        if _is_step_folder(entry) and store.exists(f"{name}/{entry}/{MANIFEST}"):
            steps.append(int(entry))
    return sorted(steps)


def list_names(store: Store) -> list[str]:
    """Names in a store that hold at least one step folder."""
    names = []
    for entry in store.list(""):
        if entry.startswith("."):
            continue
        try:
            check_name(entry)
        except InvalidName:
            continue
        if any(_is_step_folder(e) for e in store.list(entry)):
            names.append(entry)
    return names


def collect_garbage(store: Store, name: str, *, min_age: float = 0.0, now: float | None = None) -> list[str]:
    """Remove leftovers of crashed saves under ``name``; returns the removed keys.

    Leftovers are step folders without a manifest, blobs no manifest names, and temporary
    files. Only those at least ``min_age`` seconds old are removed, so that a save still in
    progress in another process is left alone.
    """
    now = time.time() if now is None else now
    removed: list[str] = []

    def old(key: str) -> bool:
        if min_age <= 0:
            return True
        try:
            mtime = store.stat(key).mtime
        except FileNotFoundError:
            return False
        return mtime is None or now - mtime >= min_age

    for entry in store.list(name):
        if not _is_step_folder(entry):
            continue
        folder = f"{name}/{entry}"
        files = store.list(folder)
        if MANIFEST not in files:
            if old(folder) and all(old(f"{folder}/{f}") for f in files):
                store.delete(folder)
                removed.append(folder)
            continue
        try:
            referenced = {b["file"] for b in read_manifest(store, folder).blobs}
        except CorruptCheckpoint:
            continue  # never delete evidence; `verify` reports it and `rm` removes it
        for f in files:
            key = f"{folder}/{f}"
            if f != MANIFEST and f not in referenced and old(key):
                store.delete(key)
                removed.append(key)
    return removed


class _SaveRequest:
    __slots__ = ("manifest_extra", "metadata", "overwrite", "prepared", "step")

    def __init__(self, step: int, prepared: Any, metadata: Any, overwrite: bool, extra: Any) -> None:
        self.step, self.prepared, self.metadata = step, prepared, metadata
        self.overwrite, self.manifest_extra = overwrite, extra


class Checkpointer:
    """Numbered checkpoints of one name, in a local directory or at any fsspec URL.

    >>> ckpt = Checkpointer("train", keep=3)
    >>> ckpt.save(100, {"params": params, "step": 100}, metadata={"loss": 0.12})
    >>> restored = ckpt.restore()          # newest intact step
    >>> restored.step, restored.state, restored.metadata

    Retention keeps the union of: the newest ``keep`` steps, every step divisible by
    ``keep_every``, and the ``keep_best`` best steps by ``metadata[best_metric]``
    (``best_mode`` "min" or "max"). With none of them set, every step is kept; the newest
    committed step is always kept, and retention runs only after a commit.
    """

    def __init__(
        self,
        name: str,
        *,
        location: Location = None,
        keep: int | None = None,
        keep_every: int | None = None,
        keep_best: int | None = None,
        best_metric: str | None = None,
        best_mode: Literal["min", "max"] = "min",
        durable: bool = True,
        allow_pickle: bool = False,
        save_interval_steps: int | None = None,
        save_interval_seconds: float | None = None,
        handle_preemption: bool = False,
        fence: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        name, location = split_location(name, location)
        self.name = check_name(name)
        self.store = open_store(location, storage_options=storage_options)
        for label, value in (("keep", keep), ("keep_every", keep_every), ("keep_best", keep_best)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{label} must be a positive int or None, not {value!r}")
        if keep_best is not None and not best_metric:
            raise ValueError("keep_best needs best_metric: the metadata key to rank steps by")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', not {best_mode!r}")
        self.keep, self.keep_every, self.keep_best = keep, keep_every, keep_best
        self.best_metric, self.best_mode = best_metric, best_mode
        self.durable = durable
        self.allow_pickle = allow_pickle
        self.save_interval_steps = save_interval_steps
        self.save_interval_seconds = save_interval_seconds
        self.fence = fence
        self._clock = clock
        self._last_save_time = clock()
        self._buffers: dict[int, np.ndarray] = {}  # async snapshot buffers, by blob index
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._cleaned = False
        self._metrics: dict[int, float] = {}
        self.preempted = False
        if handle_preemption:
            self._install_preemption_handler()
        _live.add(self)

    # ----------------------------------------------------------------- listing

    def steps(self) -> list[int]:
        """Committed steps, ascending."""
        return list_steps(self.store, self.name)

    def latest_step(self) -> int | None:
        """The newest committed step, or None (stats manifests from the newest down only)."""
        folders = sorted((e for e in self.store.list(self.name) if _is_step_folder(e)), key=int)
        for entry in reversed(folders):
            if self.store.exists(f"{self.name}/{entry}/{MANIFEST}"):
                return int(entry)
        return None

    def manifest(self, step: int) -> Manifest:
        """The verified manifest of ``step`` (metadata, tree structure, blob list)."""
        return read_manifest(self.store, step_key(self.name, _check_step(step)))

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
    ) -> None:
        """Save ``state`` as ``step``; visible to readers only once fully committed.

        ``blocking=False`` returns as soon as the state is copied into buffers reused across
        saves; writing and committing go on in a background thread (one save in flight at a
        time; an error there is raised by the next call or by :meth:`wait`). A step that
        exists, or one older than the newest, is refused unless ``overwrite=True``.
        """
        step = _check_step(step)
        self.wait()
        latest = None if overwrite else self.latest_step()
        if latest is not None and step <= latest:
            exists = step == latest or self.store.exists(f"{step_key(self.name, step)}/{MANIFEST}")
            what = "already exists" if exists else f"is older than the newest step {latest}"
            raise StepExists(
                f"{self.name!r} step {step} {what} in {self.store.url}; pass overwrite=True to "
                "replace it, or save a newer step", name=self.name, step=step)
        tree = capture(state)
        # An asynchronous save copies what the caller may change (arrays, bytearrays) into
        # buffers reused across saves; bytes and pickles are immutable already.
        snapshot = None if blocking else self._snapshot
        prepared = prepare(tree, allow_pickle=self.allow_pickle, snapshot=snapshot)
        metadata, extra = json_copy(metadata, "metadata"), json_copy(extra, "extra")
        request = _SaveRequest(step, prepared, metadata, overwrite, extra)
        self._last_save_time = self._clock()
        if blocking:
            self._write(request)
            return
        _report_lost_errors_at_exit()
        self._thread = threading.Thread(
            target=self._write_in_background, args=(request,), name=f"safepoint-save-{self.name}")
        self._thread.start()

    def _snapshot(self, index: int, array: np.ndarray) -> np.ndarray:
        buffer = self._buffers.get(index)
        if buffer is None or buffer.shape != array.shape or buffer.dtype != array.dtype:
            buffer = np.empty_like(array, order="C")
            self._buffers[index] = buffer
        np.copyto(buffer, array, casting="no")
        return buffer

    def _write_in_background(self, request: _SaveRequest) -> None:
        try:
            self._write(request)
        except BaseException as exc:  # surfaced to the caller by the next call or wait()
            self._error = exc

    def _write(self, request: _SaveRequest) -> None:
        with self._lock:
            if not self._cleaned:  # housekeeping: never a reason to fail the save
                with contextlib.suppress(OSError, CorruptCheckpoint):
                    collect_garbage(self.store, self.name, min_age=LEFTOVER_MIN_AGE)
                    self._cleaned = True
            folder = step_key(self.name, request.step)
            manifest = write_checkpoint(
                self.store, folder, request.prepared, name=self.name, step=request.step,
                metadata=request.metadata, durable=self.durable, extra=request.manifest_extra,
                before_commit=self.fence, replaces=request.overwrite)
            if request.overwrite:
                referenced = {b["file"] for b in manifest.blobs} | {MANIFEST}
                for f in self.store.list(folder):
                    if f not in referenced and not f.startswith("."):
                        self.store.delete(f"{folder}/{f}")
            self._remember_metric(request.step, manifest.metadata)
            try:
                self._apply_retention(request.step)
            except OSError as exc:
                raise SaveFailed(
                    f"{self.name!r} step {request.step} was committed, but removing old steps "
                    f"failed: {exc}; run `safepoint gc` later", name=self.name, step=request.step,
                ) from exc

    def wait(self) -> None:
        """Wait for the save in flight, if any; raise its error if it failed."""
        thread = self._thread
        if thread is not None:
            thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    # --------------------------------------------------------------- retention

    def _remember_metric(self, step: int, metadata: dict[str, Any]) -> None:
        self._metrics.pop(step, None)  # an overwritten step may no longer have the metric
        if self.best_metric and self.best_metric in metadata:
            try:
                self._metrics[step] = float(metadata[self.best_metric])
            except (TypeError, ValueError):
                pass

    def _metric(self, step: int) -> float | None:
        if step not in self._metrics:
            try:
                self._remember_metric(step, self.manifest(step).metadata)
            except (CorruptCheckpoint, CheckpointNotFound):
                return None
        return self._metrics.get(step)

    def kept_steps(self, steps: list[int]) -> set[int]:
        """Which of ``steps`` the retention rules keep."""
        if not steps:
            return set()
        if self.keep is None and self.keep_every is None and self.keep_best is None:
            return set(steps)
        kept = {steps[-1]}
        if self.keep is not None:
            kept.update(steps[-self.keep :])
        if self.keep_every is not None:
            kept.update(s for s in steps if s % self.keep_every == 0)
        if self.keep_best is not None:
            scored = [(m, s) for s in steps if (m := self._metric(s)) is not None and m == m]
            scored.sort(reverse=self.best_mode == "max")
            kept.update(s for _, s in scored[: self.keep_best])
        return kept

    def _apply_retention(self, newest: int) -> None:
        if self.keep is None and self.keep_every is None and self.keep_best is None:
            return  # keep everything: no need to list
        steps = self.steps()
        if newest not in steps:  # never delete anything unless the new step is committed
            return
        kept = self.kept_steps(steps)
        for step in steps:
            if step not in kept:
                self.store.delete(step_key(self.name, step))
                self._metrics.pop(step, None)

    def delete(self, step: int) -> None:
        """Remove one step (its manifest first, so it vanishes atomically)."""
        step = _check_step(step)
        self.wait()
        if step not in self.steps():
            raise CheckpointNotFound(f"{self.name!r} has no step {step} in {self.store.url}",
                                     name=self.name, step=step)
        self.store.delete(step_key(self.name, step))
        self._metrics.pop(step, None)

    def delete_all(self) -> None:
        """Remove every step and leftover of this name."""
        self.wait()
        self.store.delete(self.name)

    def gc(self, *, min_age: float = 0.0) -> list[str]:
        """Remove leftovers of crashed saves under this name; returns the removed keys."""
        self.wait()
        return collect_garbage(self.store, self.name, min_age=min_age)

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
        :class:`CorruptCheckpointWarning` and the next older intact one is returned; with
        ``step``, damage raises :class:`CorruptCheckpoint`. ``into``: a live tree (modules,
        iterators, RNGs, arrays) to load the state into in place; it is returned as
        ``state``. ``mmap=True`` maps large arrays read-only instead of reading them.
        """
        self.wait()
        pickle_ok = self.allow_pickle if allow_pickle is None else allow_pickle
        if step is not None:
            return self._restore_step(_check_step(step), into, mmap, pickle_ok)
        steps = self.steps()
        if not steps:
            raise CheckpointNotFound(
                f"no checkpoint named {self.name!r} in {self.store.url}", name=self.name)
        for candidate in reversed(steps):
            try:
                return self._restore_step(candidate, into, mmap, pickle_ok)
            except CorruptCheckpoint as exc:
                warnings.warn(
                    f"skipping damaged checkpoint {self.name!r} step {candidate}: {exc}",
                    CorruptCheckpointWarning, stacklevel=2)
        raise CorruptCheckpoint(
            f"every checkpoint of {self.name!r} in {self.store.url} is damaged; "
            "`safepoint verify` lists the problems")

    def _restore_step(self, step: int, into: Any, mmap: bool, allow_pickle: bool) -> Restored:
        folder = step_key(self.name, step)
        try:
            manifest = read_manifest(self.store, folder)
        except CheckpointNotFound as exc:
            raise CheckpointNotFound(f"{self.name!r} has no step {step} in {self.store.url}",
                                     name=self.name, step=step) from exc
        except CorruptCheckpoint as exc:
            exc.step = step
            raise
        target = capture(into) if into is not None else None
        tree = load_tree(self.store, manifest, allow_pickle=allow_pickle, mmap=mmap, target=target)
        state = restore_into(into, tree) if into is not None else tree
        return Restored(step=step, state=state, metadata=manifest.metadata)

    # ------------------------------------------------------- training helpers

    def should_save(self, step: int) -> bool:
        """True when ``step`` is due by ``save_interval_steps`` or ``save_interval_seconds``,
        or a preemption signal arrived (then save, and stop: check :attr:`preempted`)."""
        if self.preempted:
            return True
        if self.save_interval_steps and step % self.save_interval_steps == 0:
            return True
        if self.save_interval_seconds is not None:
            return self._clock() - self._last_save_time >= self.save_interval_seconds
        return False

    def _install_preemption_handler(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise SafepointError("handle_preemption=True needs the main thread (signal handlers)")
        previous = signal.getsignal(signal.SIGTERM)
        ref = weakref.ref(self)

        def on_sigterm(signum: int, frame: Any) -> None:
            checkpointer = ref()
            if checkpointer is not None and not checkpointer.preempted:
                checkpointer.preempted = True
                return
            signal.signal(signal.SIGTERM, previous if callable(previous) else signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_sigterm)

    # ---------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Wait for the save in flight; the checkpointer stays usable."""
        self.wait()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[int]:
        return iter(self.steps())

    def __repr__(self) -> str:
        return f"Checkpointer({self.name!r}, location={self.store.url!r})"


_live: weakref.WeakSet[Checkpointer] = weakref.WeakSet()


@functools.cache
def _report_lost_errors_at_exit() -> None:
    """Once per process, at the first asynchronous save: register the exit report."""
    atexit.register(_report_lost_errors)


def _report_lost_errors() -> None:
    # Runs after the interpreter has joined the save threads (they are not daemons, so a
    # save in flight always completes). An error nobody collected with wait() is printed
    # rather than lost.
    for checkpointer in list(_live):
        error = checkpointer._error
        if error is not None:
            print(f"safepoint: the asynchronous save of {checkpointer.name!r} failed and "
                  f"nobody called wait() to see it: {error}", file=sys.stderr)
