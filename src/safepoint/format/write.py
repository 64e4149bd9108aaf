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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from safepoint import knobs
from safepoint.errors import SaveFailed, WriteConflict
from safepoint.format.chunk_writer import ChunkWriter
from safepoint.format.chunks import CHUNKS, ChunkIndex, content_cuts, is_chunk_key
from safepoint.format.collector import collector_paused
from safepoint.format.layout import data_folder, latest_key, manifest_key, step_text
from safepoint.format.manifest import (
    BASE_VERSION,
    BODY_KEYS,
    CHUNK_VERSION,
    FORMAT,
    PACKED_CHUNK_VERSION,
    SHARD_VERSION,
    Manifest,
    checksum,
    describe_os_error,
    encode_manifest,
    json_copy,
)
from safepoint.format.plain import loads
from safepoint.format.shards import Part, merge_parts
from safepoint.format.tree import BlobRef, Encoder
from safepoint.store import Store


@dataclass
class Prepared:
    """A state tree encoded and ready to write: nothing of the caller's is needed after this
    except the memory the blobs point at (the live arrays, or snapshot buffers)."""

    node: Any
    blobs: list[BlobRef]
    pickled: list[str]
    shards: list[list[Any]] = field(default_factory=list)  # [tree path, node] of each Shard
    per_rank: list[list[Any]] = field(default_factory=list)  # [tree path, node] of each PerRank
    parts: tuple[list[list[Any]], list[list[Any]]] = ([], [])
    """Copies of ``shards`` and ``per_rank`` as encoded, for this process's part (a merge
    changes the tree's own nodes in place, and a retried commit merges again)."""
    text: memoryview | None = None
    """The JSON text of ``node`` when the whole tree is plain (:func:`plain_json`)."""

    @property
    def nbytes(self) -> int:
        return sum(b.data.nbytes for b in self.blobs)


def prepare(
    tree: Any,
    *,
    allow_pickle: bool = False,
    snapshot: Callable[[int, np.ndarray], np.ndarray] | None = None,
    share: bool = False,
    plain: memoryview | None = None,
    host_only: bool = False,
    shards_only: bool = False,
) -> Prepared:
    """Encode ``tree``; raise ``UnsupportedType`` naming the path of a value it cannot store
    (``host_only``: also of a framework array held in device memory).

    ``share=True``: plain subtrees are their own nodes, not copies (the node is written
    before the tree may change); ``plain``: what ``plain_json(tree)`` found (its text; a
    copy of the tree is read back from it unless ``share``).
    ``shards_only``: a distributed save's other ranks encode only their shards and
    per-rank values (the coordinator saves the replicated rest).
    """
    encoder = Encoder(allow_pickle=allow_pickle, snapshot=snapshot, share=share,
                      host_only=host_only, shards_only=shards_only)
    with collector_paused():
        if plain is not None:
            node = None if shards_only else tree if share else loads(plain.tobytes())
            return Prepared(node=node, blobs=[], pickled=[], text=None if shards_only else plain)
        return Prepared(node=encoder.encode(tree), blobs=encoder.blobs, pickled=encoder.pickled,
                        shards=encoder.shards, per_rank=encoder.per_rank,
                        parts=(Part.nodes(encoder.shards), Part.nodes(encoder.per_rank)))


@dataclass
class _DataFile:
    parts: list[memoryview]
    size: int
    blobs: list[tuple[int, int]]  # (blob index, offset)


_PAD = memoryview(bytes(knobs.ALIGN))


def layout(blobs: list[BlobRef], skip: frozenset[int] = frozenset()) -> list[_DataFile]:
    """Assign every blob (but those in ``skip``: chunked) a data file and an offset: large
    ones alone, small ones packed."""
    files: list[_DataFile] = []
    pack: _DataFile | None = None
    for index, blob in enumerate(blobs):
        if index in skip:
            continue
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
    chunks: ChunkIndex | None = None,
    parallel: bool | None = None,
    exchange: Callable[[Part], list[Part]] | None = None,
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

    ``chunks``: an incremental save (:mod:`safepoint.format.chunks`): blobs of at least
    :data:`~safepoint.knobs.CHUNK_BYTES` are cut into chunks; a chunk whose bytes a kept
    step's chunk file holds is named, not written; the others are written to new chunk
    files, durable before the manifest names them. Hashing runs on the writing threads.
    ``parallel``: write on several threads (None: above :data:`~safepoint.knobs.PARALLEL_BYTES`;
    a forked snapshot process passes False).

    ``exchange``: a distributed save's coordinator: given this process's part once its data
    is durable, it returns every rank's (this one's first), which the manifest merges
    (:func:`~safepoint.format.shards.merge_parts`); raising there publishes nothing.
    """
    meta_json = json_copy(metadata, "metadata")
    extra_json = json_copy(extra, "extra")
    clash = sorted(set(extra_json) & BODY_KEYS)
    if clash:
        raise ValueError(f"extra may not set the manifest's own keys {clash}")
    written: list[str] = []  # data files this save created (or began to)
    published = False
    sharded = exchange is not None or bool(prepared.shards or prepared.per_rank)

    def manifest_of(parts: list[Part]) -> tuple[dict[str, Any], bytes]:
        with collector_paused():
            if sharded:
                table, blobs, pickled = merge_parts(parts, prepared.shards, prepared.per_rank)
            else:
                table, blobs, pickled = parts[0].files, parts[0].blobs, parts[0].pickled
            chunked = any(is_chunk_key(rel) for rel, _ in table)
            packed = chunked and any(len(r) > 4 for blob in blobs for r in blob["ranges"])
            body = {
                "format": FORMAT,
                "version": (PACKED_CHUNK_VERSION if packed else SHARD_VERSION if sharded
                            else CHUNK_VERSION if chunked else BASE_VERSION),
                "name": name,
                "step": step,
                "created": time.time(),
                "save_id": parts[0].save_id,
                "metadata": meta_json,
                **extra_json,
                "pickled": pickled,
                "files": table,
                "blobs": blobs,
                "tree": prepared.node,
            }
            return body, encode_manifest(body, tree=None if sharded else prepared.text)

    made: list[tuple[dict[str, Any], bytes]] = []  # made while the data was written
    try:
        own = write_part(store, name, step, prepared, durable=durable, chunks=chunks,
                         parallel=parallel, written=written,
                         ready=None if sharded else lambda part: made.append(manifest_of([part])))
        body, data = made[0] if made else manifest_of(exchange(own) if exchange is not None else [own])
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
            remove_files(store, written)
        if isinstance(exc, OSError) and not isinstance(exc, SaveFailed):
            raise SaveFailed(
                f"could not save {name!r} step {step} to {store.url}: {describe_os_error(exc)}. "
                + ("The step was committed but may not be durable." if published else
                   "The previous checkpoints are untouched."),
                name=name, step=step, errno=exc.errno) from exc
        raise
    return Manifest(key=manifest_key(name, step), body=body, size=len(data)), version


def remove_files(store: Store, keys: list[str]) -> None:
    """Remove the data files of a save that did not happen (best effort: gc does the rest)."""
    for key in keys:
        with contextlib.suppress(OSError):
            store.delete(key)


def write_part(
    store: Store,
    name: str,
    step: int,
    prepared: Prepared,
    *,
    durable: bool = True,
    chunks: ChunkIndex | None = None,
    parallel: bool | None = None,
    written: list[str],
    rank: int = 0,
    ready: Callable[[Part], None] | None = None,
) -> Part:
    """Write (and make durable) the data files of one process's part of a save: blobs,
    packed or alone, into ``<step>/<save id>-<k>.bin``, and new chunks; returns the part
    (its file table and byte ranges). Every key it creates is appended to ``written``
    first, so that a caller can remove them after a failure.

    ``ready(part)``: called on the calling thread as soon as the part is known, which,
    without new chunks, is before the writes end (the manifest is made meanwhile): they
    are not durable yet then."""
    save_id = uuid.uuid4().hex[:12]
    with collector_paused():
        chunked = _chunk_plan(prepared.blobs) if chunks is not None else {}
        files = layout(prepared.blobs, frozenset(chunked))
    folder = data_folder(name, step)
    keys = [f"{folder}/{save_id}-{i}.bin" for i in range(len(files))]
    ranges: list[list[Any]] = [[] for _ in prepared.blobs]
    writer = None
    if chunks is not None and chunked:
        writer = ChunkWriter(store, name, save_id, prepared.blobs, chunked, chunks,
                             durable=durable, written=written)

    def write_one(i: int) -> None:
        if i >= len(files):
            assert writer is not None
            writer.write(i - len(files))
            return
        written.append(keys[i])
        store.write_blob(keys[i], files[i].parts, durable=durable)

    def part() -> Part:
        with collector_paused():
            table = [[f"{step_text(step)}/{save_id}-{i}.bin", f.size] for i, f in enumerate(files)]
            if writer is not None:
                file_of: dict[str, int] = {}
                for index, spans in chunked.items():
                    for start, _ in spans:
                        chunk = writer.named[(index, start)]
                        if chunk.rel not in file_of:
                            file_of[chunk.rel] = len(table)
                            table.append([chunk.rel, chunk.file_size])
                        ranges[index].append(chunk.range(file_of[chunk.rel]))
            blobs = [{"size": b.data.nbytes, "path": b.tree_path, "ranges": ranges[i]}
                     for i, b in enumerate(prepared.blobs)]
        return Part(rank, table, blobs, *prepared.parts, prepared.pickled, save_id=save_id)

    known: list[Part] = []

    def beside() -> None:  # on the calling thread, beside the writes (they free the GIL)
        with collector_paused():
            for i, file in enumerate(files):
                for index, offset in file.blobs:
                    ranges[index] = _ranges(i, offset, prepared.blobs[index])
        if writer is None:  # nothing more to learn from the writes
            known.append(part())
            if ready is not None:
                ready(known[0])

    if parallel is None:
        parallel = prepared.nbytes >= knobs.PARALLEL_BYTES
    try:
        _run_all(write_one, len(files) + (len(writer.segments) if writer else 0),
                 parallel=parallel, beside=beside)
    finally:
        if writer is not None:
            writer.close()
    if files and durable:
        store.sync_folder(folder)
    if writer is not None:
        writer.finish()
        if writer.wrote and durable:
            store.sync_folder(f"{name}/{CHUNKS}")
        return part()
    return known[0]


def _ranges(file: int, offset: int, blob: BlobRef) -> list[list[Any]]:
    """The byte ranges ``[file, offset, length, crc32c]`` of a blob written at ``offset`` of
    data file ``file``: one, or for a shard one per
    :attr:`~safepoint.format.tree.BlobRef.ranged` bytes."""
    data, step = blob.data, blob.ranged
    size = data.nbytes
    if not step or size <= step:  # (the GIL is freed for the writing threads)
        return [[file, offset, size, checksum(data, free_gil=True)]]
    return [[file, offset + at, min(step, size - at), checksum(data[at : at + step], free_gil=True)]
            for at in range(0, size, step)]


def _chunk_plan(blobs: list[BlobRef]) -> dict[int, list[tuple[int, int]]]:
    """The chunks ``(start, stop)`` of each blob of at least a chunk: arrays at fixed
    offsets (an array's bytes change in place), byte strings at content-defined ones
    (insertions are likely there)."""
    size = knobs.CHUNK_BYTES
    plan = {}
    for index, blob in enumerate(blobs):
        total = blob.data.nbytes
        if total < size:
            continue
        starts = content_cuts(blob.data, size) if blob.stream else list(range(0, total, size))
        plan[index] = list(zip(starts, [*starts[1:], total], strict=True))
    return plan


def _run_all(work: Callable[[int], None], count: int, *, parallel: bool,
             beside: Callable[[], None]) -> None:
    """``work(i)`` for every index, on threads if ``parallel``; ``beside()`` on the calling
    thread meanwhile (before the work, when not on threads)."""
    if not parallel or count < 2:
        beside()
        for index in range(count):
            work(index)
        return
    with ThreadPoolExecutor(min(knobs.WRITE_THREADS, count)) as pool:
        futures = [pool.submit(work, index) for index in range(count)]
        try:
            beside()
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


__all__ = ["Prepared", "layout", "prepare", "remove_files", "write_checkpoint", "write_part"]
