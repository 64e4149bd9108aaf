"""Writing a checkpoint: blobs into data files, then the manifest, published last.

Blobs are laid out as byte ranges (:mod:`safepoint.format.manifest`): each blob of at least
:data:`~safepoint.knobs.PACK_BELOW` bytes gets a data file of its own, and smaller ones are
packed together, aligned, into files of up to :data:`~safepoint.knobs.PACK_BYTES`, so that
10,000 small arrays cost a few writes and fsyncs rather than 10,000. Every blob keeps its
own range and checksum, so one can still be read (or memory-mapped) alone.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from safepoint import knobs
from safepoint.errors import SaveFailed, WriteConflict
from safepoint.format.layout import data_folder, latest_key, manifest_key, step_text
from safepoint.format.manifest import (
    BODY_KEYS,
    FORMAT,
    VERSION,
    Manifest,
    checksum,
    describe_os_error,
    encode_manifest,
    json_copy,
)
from safepoint.format.tree import BlobRef, Encoder, plain_copy
from safepoint.store import Store


@dataclass
class Prepared:
    """A state tree encoded and ready to write: nothing of the caller's is needed after this
    except the memory the blobs point at (the live arrays, or snapshot buffers)."""

    node: Any
    blobs: list[BlobRef]
    pickled: list[str]

    @property
    def nbytes(self) -> int:
        return sum(b.data.nbytes for b in self.blobs)


def prepare(
    tree: Any,
    *,
    allow_pickle: bool = False,
    snapshot: Callable[[int, np.ndarray], np.ndarray] | None = None,
    share: bool = False,
    plain: bool = False,
) -> Prepared:
    """Encode ``tree``; raise ``UnsupportedType`` naming the path of a value it cannot store.

    ``share=True``: plain subtrees are their own nodes, not copies (the node is written
    before the tree may change); ``plain=True``: the caller found ``is_plain(tree)``.
    """
    encoder = Encoder(allow_pickle=allow_pickle, snapshot=snapshot, share=share)
    node = (tree if share else plain_copy(tree)) if plain else encoder.encode(tree)
    return Prepared(node=node, blobs=encoder.blobs, pickled=encoder.pickled)


@dataclass
class _DataFile:
    parts: list[memoryview]
    size: int
    blobs: list[tuple[int, int]]  # (blob index, offset)


_PAD = memoryview(bytes(knobs.ALIGN))


def layout(blobs: list[BlobRef]) -> list[_DataFile]:
    """Assign every blob a data file and an offset: large ones alone, small ones packed."""
    files: list[_DataFile] = []
    pack: _DataFile | None = None
    for index, blob in enumerate(blobs):
        size = blob.data.nbytes
        if size >= knobs.PACK_BELOW:
            files.append(_DataFile([blob.data], size, [(index, 0)]))
            continue
        if pack is None or pack.size + size > knobs.PACK_BYTES:
            pack = _DataFile([], 0, [])
            files.append(pack)
        pad = -pack.size % knobs.ALIGN
        if pad:
            pack.parts.append(_PAD[:pad])
            pack.size += pad
        pack.blobs.append((index, pack.size))
        pack.parts.append(blob.data)
        pack.size += size
    return files


def write_checkpoint(
    store: Store,
    name: str,
    step: int,
    prepared: Prepared,
    *,
    metadata: dict[str, Any] | None,
    durable: bool = True,
    extra: dict[str, Any] | None = None,
    before_commit: Callable[[], None] | None = None,
    newest: bool = True,
    expect: str | None = None,
    previous: bytes | None = None,
    previous_latest: int | None = None,
    exclusive: bool = True,
) -> tuple[Manifest, str | None]:
    """Write data files, then publish the manifest (steps 1 and 2 of the store's protocol);
    returns the manifest and the new version of ``latest.json``.

    ``exclusive``: a new step's manifest (no ``previous``) is created only if absent, so
    that a late writer never replaces another writer's step of the same number
    (``WriteConflict`` on the manifest's key; only this save's own files are removed).
    ``newest``: the step becomes the name's newest (``latest.json`` is published with it,
    conditional on ``expect``, its version as the caller last saw it); else only its own
    manifest is written. ``before_commit`` runs after every data file is durable and before
    the manifest is written; raising there (a fencing check) leaves nothing visible. On any
    failure the files of this save are removed again (best effort) and what it may have
    published is rolled back (``previous``: the bytes of the manifest it replaces, for an
    overwrite; ``previous_latest``: the step ``latest.json`` named), so readers see the
    checkpoint as it was before; an ``OSError`` is raised as :class:`SaveFailed`.
    """
    meta_json = json_copy(metadata, "metadata")
    extra_json = json_copy(extra, "extra")
    clash = sorted(set(extra_json) & BODY_KEYS)
    if clash:
        raise ValueError(f"extra may not set the manifest's own keys {clash}")
    save_id = uuid.uuid4().hex[:12]
    files = layout(prepared.blobs)
    folder = data_folder(name, step)
    keys = [f"{folder}/{save_id}-{i}.bin" for i in range(len(files))]
    ranges: list[list[Any]] = [[]] * len(prepared.blobs)
    written: list[str] = []  # data files this save created (or began to)
    published = False

    def write_one(i: int) -> None:
        file = files[i]
        for index, offset in file.blobs:
            blob = prepared.blobs[index]
            ranges[index] = [i, offset, blob.data.nbytes, checksum(blob.data)]
        written.append(keys[i])
        store.write_blob(keys[i], file.parts, durable=durable)

    try:
        _run_all(write_one, len(files), parallel=prepared.nbytes >= knobs.PARALLEL_BYTES)
        if files and durable:
            store.sync_folder(folder)
        body = {
            "format": FORMAT,
            "version": VERSION,
            "name": name,
            "step": step,
            "created": time.time(),
            "save_id": save_id,
            "metadata": meta_json,
            **extra_json,
            "pickled": prepared.pickled,
            "files": [[f"{step_text(step)}/{save_id}-{i}.bin", f.size] for i, f in enumerate(files)],
            "blobs": [{"size": b.data.nbytes, "path": b.tree_path, "ranges": [ranges[i]]}
                      for i, b in enumerate(prepared.blobs)],
            "tree": prepared.node,
        }
        data = encode_manifest(body)
        if before_commit is not None:
            before_commit()
        published = True
        exclusive = exclusive and previous is None  # a new step never replaces another's
        if newest:
            version = store.publish(manifest_key(name, step), data, alias=latest_key(name),
                                    durable=durable, expect=expect, exclusive=exclusive)
        else:
            store.put_manifest(manifest_key(name, step), data, durable=durable,
                               exclusive=exclusive)
            version = None
    except BaseException as exc:
        if isinstance(exc, WriteConflict) and exc.key == manifest_key(name, step):
            published = False  # the step's manifest is someone else's: only our files go
        if published:
            published = _roll_back(store, name, step, data, previous, previous_latest, durable)
        if not published:
            for key in written:
                with contextlib.suppress(OSError):
                    store.delete(key)
        if isinstance(exc, OSError):
            raise SaveFailed(
                f"could not save {name!r} step {step} to {store.url}: {describe_os_error(exc)}. "
                + ("The step was committed but may not be durable." if published else
                   "The previous checkpoints are untouched."),
                name=name, step=step, errno=exc.errno) from exc
        raise
    return Manifest(key=manifest_key(name, step), body=body, size=len(data)), version


def _run_all(work: Callable[[int], None], count: int, *, parallel: bool) -> None:
    if not parallel or count < 2:
        for index in range(count):
            work(index)
        return
    with ThreadPoolExecutor(min(knobs.WRITE_THREADS, count)) as pool:
        futures = [pool.submit(work, index) for index in range(count)]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:  # the ones not started yet; the pool waits for the rest
                future.cancel()
            raise


def _read_if_exists(store: Store, key: str) -> bytes | None:
    try:
        return store.read(key, limit=knobs.MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        return None


def _roll_back(store: Store, name: str, step: int, ours: bytes, previous: bytes | None,
               previous_latest: int | None, durable: bool) -> bool:
    """Undo a publish that failed late (e.g. the folder fsync after the rename): put back
    what ``latest.json`` and the step's manifest held. Returns whether ours is still visible.
    Each part is tried on its own: a rename can succeed where the fsync after it fails."""
    with contextlib.suppress(OSError):
        if _read_if_exists(store, latest_key(name)) == ours:
            if previous_latest is None:
                store.delete(latest_key(name))
            elif previous_latest == step and previous is not None:
                store.commit(latest_key(name), previous, durable=durable)
            else:
                earlier = _read_if_exists(store, manifest_key(name, previous_latest))
                if earlier is not None:
                    store.commit(latest_key(name), earlier, durable=durable)
                else:
                    store.delete(latest_key(name))
    with contextlib.suppress(OSError):
        if _read_if_exists(store, manifest_key(name, step)) == ours:
            if previous is None:
                store.delete(manifest_key(name, step))
            else:
                store.commit(manifest_key(name, step), previous, durable=durable)
    try:
        return ours in (_read_if_exists(store, latest_key(name)),
                        _read_if_exists(store, manifest_key(name, step)))
    except OSError:
        return True  # cannot tell: keep its data files


__all__ = ["Prepared", "layout", "prepare", "write_checkpoint"]
