"""Content-addressed chunks: incremental saves write only the bytes that changed.

With ``Checkpointer(..., incremental=True)`` every blob of at least
:data:`~safepoint.knobs.CHUNK_BYTES` is cut into chunks (arrays at fixed offsets, byte
strings at content-defined ones, :func:`content_cuts`), each identified by the BLAKE3 hash of
its bytes. A chunk is stored in a chunk file of the name, shared by every step that holds
the same bytes: a file of its own, or a file of the consecutive chunks of a segment that
the save rewrote (:mod:`safepoint.format.chunk_writer`), named by its first chunk::

    <name>/chunks/<BLAKE3, 64 hex>-<save id, 12 hex>.bin

A step's manifest lists its chunk files in ``files`` like any other data file, and each
chunked blob as one byte range per chunk (the one model of large leaves), each range with
its CRC-32C, verified on every read. So a damaged chunk damages every step that names it,
and ``restore()`` falls back to the newest step that does not.

**Reuse only through a kept step.** A save reuses a chunk file only when a committed step
that the writer keeps names it (:class:`ChunkIndex`, built from the manifests under the
name's lease); any other bytes are written to a file of a new name (the save id makes it
unique), never over an existing one. Hence the gc rule: a chunk file no manifest names
(read in one stable pass, :func:`chunk_references`) and at least ``min_age`` seconds old
can be deleted, because no save can start to rely on it: a save relies only on files that
a kept manifest names, and such a manifest was in the pass or is newer than its listing
(and then names only files it wrote after the listing, or that a kept manifest named).

**Unchanged bytes are known without their BLAKE3.** The index remembers, for each place a
chunk was cut at (blob path and byte offsets), a 128-bit XXH3 of its bytes (seeded at random
per index) and the name of the chunk. A save first takes the XXH3, several times as fast;
where it matches the remembered one at that place, the bytes are the same (the odds against
are 2**-128 for any change a program makes; only crafted bytes could collide, and they would
be the caller's own; :data:`~safepoint.knobs.QUICK_UNCHANGED` turns this off) and the
remembered chunk is named, if a kept step still holds it. Any other chunk is hashed with
BLAKE3 as above, except where the bytes at its place changed at the last save too: such
bytes are never shared, and the chunk is named from its XXH3 (:func:`rewritten_name`).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash
from blake3 import blake3

from safepoint import knobs
from safepoint.errors import CheckpointNotFound, CorruptCheckpoint
from safepoint.format.layout import step_of_manifest
from safepoint.format.manifest import Manifest, read_manifest
from safepoint.store import Store

CHUNKS = "chunks"
"""The folder of a name's chunk files."""
_CHUNK_FILE = re.compile(r"([0-9a-f]{64})-[0-9a-f]{12}\.bin")
_STABLE_TRIES = 8


def digest(data: Any) -> str:
    """The content hash that names a chunk: BLAKE3-256 (a cryptographic hash, about twice
    as fast as SHA-256 with SHA extensions on one core, and it releases the GIL), as 64 hex
    digits."""
    return blake3(data).hexdigest()


def quick_digest(data: Any, seed: int) -> int:
    """The 128-bit XXH3 of ``data`` that tells a chunk unchanged at its place (several
    times as fast as :func:`digest`)."""
    return xxhash.xxh3_128_intdigest(data, seed=seed)


_REWRITTEN = "safepoint 2026-12 chunk of a place rewritten at every save"


def rewritten_name(quick: int, seed: int) -> str:
    """The name of a chunk at a place whose bytes change at every save (weights in
    training), taken from its XXH3 instead of a BLAKE3 of its bytes: BLAKE3 in key
    derivation mode (its own domain: no hash of any bytes equals it) of the XXH3 and the
    writer's seed. Only that writer can find the chunk by it (at its place, or as the
    same bytes elsewhere in its saves); nobody else would find bytes that change at every
    save anyway."""
    key = quick.to_bytes(16, "little") + seed.to_bytes(8, "little")
    return blake3(key, derive_key_context=_REWRITTEN).hexdigest()


Place = tuple[str, int, int]
"""Where a chunk was cut: its blob's tree path and its byte offsets in the blob."""


def quick_places(blobs: Iterable[Any], seed: int) -> dict[Place, int]:
    """The XXH3 of every chunk-sized piece, at fixed offsets, of each blob (a
    :class:`~safepoint.format.tree.BlobRef`) of at least a chunk: what a full save takes
    to tell how much of the state changed since the last one (``incremental="auto"``).
    Fixed offsets for byte strings too (cutting them by content costs more): bytes
    inserted into one then count as a change of everything after them."""
    size = knobs.CHUNK_BYTES
    places = {}
    for blob in blobs:
        data, total = blob.data, blob.data.nbytes
        if total >= size:
            for start in range(0, total, size):
                stop = min(start + size, total)
                places[(blob.tree_path, start, stop)] = quick_digest(data[start:stop], seed)
    return places


def unchanged_share(before: dict[Place, int], now: dict[Place, int]) -> float | None:
    """The share of the bytes at the places in ``now`` whose XXH3 is the one ``before``
    has there, or None when ``before`` has none of them (nothing to compare)."""
    total = same = 0
    known = False
    for place, value in now.items():
        size = place[2] - place[1]
        total += size
        if place in before:
            known = True
            same += size if before[place] == value else 0
    return same / total if known and total else None


@dataclass(frozen=True)
class Seen:
    """What a save saw at a :data:`Place`: the XXH3 (None when it was not taken) and BLAKE3
    of the bytes there, whether it wrote them (no kept step held them), and whether they
    differed from those the save before saw there."""

    quick: int | None
    content: str
    new: bool
    changed: bool = False


_WINDOW = 48  # bytes: the rolling hash's window
_BASE = 0x01000193  # odd, so that it has an inverse modulo 2**32
_SEGMENT = 4 << 20  # bytes hashed per numpy pass (bounds the temporary arrays)
_POWERS: tuple[np.ndarray, np.ndarray] | None = None


def _powers() -> tuple[np.ndarray, np.ndarray]:
    """``BASE**j`` and ``BASE**-j`` modulo 2**32 for j below a segment and a window."""
    global _POWERS
    if _POWERS is None:
        count = _SEGMENT + _WINDOW
        up = np.full(count, _BASE, np.uint32)
        down = np.full(count, pow(_BASE, -1, 1 << 32), np.uint32)
        up[0] = down[0] = 1
        with np.errstate(over="ignore"):
            _POWERS = np.cumprod(up, dtype=np.uint32), np.cumprod(down, dtype=np.uint32)
    return _POWERS


def content_cuts(data: memoryview, average: int) -> list[int]:
    """Chunk starts for ``data`` at content-defined boundaries, chunks between a quarter of
    and four times ``average`` bytes: a cut follows each position where a Rabin-Karp hash
    of the 48 bytes before it (modulo 2**32, computed with numpy over whole segments) has
    its top bits zero. Bytes inserted or removed move only the cuts near them, so the
    chunks after them keep their contents and stay shared."""
    size = data.nbytes
    low, high = average // 4, average * 4
    if size <= low:
        return [0]
    shift = np.uint32(32 - min(31, max(1, (average - low).bit_length() - 1)))
    up, down = _powers()
    raw = np.frombuffer(data, np.uint8)
    found: list[np.ndarray] = []
    with np.errstate(over="ignore"):
        for start in range(0, size, _SEGMENT):
            first = max(0, start - _WINDOW)
            values = raw[first : start + _SEGMENT].astype(np.uint32)
            count = values.size
            values += np.uint32(1)  # zeros count too
            values *= down[:count]
            prefix = np.empty(count + 1, np.uint32)
            prefix[0] = 0
            np.cumsum(values, out=prefix[1:])
            # the window ending at i (exclusive): sum of x[k] * BASE**(i-1-k), k in [i-48, i)
            window = prefix[_WINDOW:] - prefix[:-_WINDOW]
            window *= up[_WINDOW - 1 : count]
            window >>= shift
            hits = np.flatnonzero(window == 0) + (first + _WINDOW)
            found.append(hits[hits > start] if start else hits)
    cuts, last = [0], 0
    for at in (int(x) for x in np.concatenate(found)):
        if at - last < low or at >= size:
            continue
        while at - last > high:
            last += high
            cuts.append(last)
        if at - last >= low:
            cuts.append(at)
            last = at
    while size - last > high:
        last += high
        cuts.append(last)
    return cuts


def chunk_file(content: str, save_id: str) -> str:
    """A chunk's key relative to the name's folder."""
    return f"{CHUNKS}/{content}-{save_id}.bin"


def is_chunk_file(entry: str) -> bool:
    """Whether an entry of ``chunks/`` has the name of a chunk file safepoint writes."""
    return _CHUNK_FILE.fullmatch(entry) is not None


def is_chunk_key(rel: str) -> bool:
    """Whether a manifest's file entry (relative to the name's folder) is a chunk file."""
    folder, _, entry = rel.partition("/")
    return folder == CHUNKS and is_chunk_file(entry)


def content_of(rel: str) -> str:
    """The content hash in a chunk file's name."""
    match = _CHUNK_FILE.fullmatch(rel.rpartition("/")[2])
    if match is None:
        raise ValueError(f"{rel!r} is not a chunk file")
    return match.group(1)


@dataclass(frozen=True)
class Chunk:
    """A chunk that a save can name instead of writing its bytes again: ``size`` bytes of
    BLAKE3 ``content`` at ``offset`` of the chunk file ``rel`` (``file_size`` bytes)."""

    content: str
    rel: str
    offset: int
    size: int
    crc: str
    file_size: int

    def range(self, file: int) -> list[Any]:
        """Its byte range in a manifest whose file table has it at index ``file``: a chunk
        of a file of several names its content (version 5); a chunk file's only chunk is
        named by the file."""
        entry: list[Any] = [file, self.offset, self.size, self.crc]
        if self.offset or self.size != self.file_size:
            entry.append(self.content)
        return entry


def chunk_entries(manifest: Manifest) -> dict[str, tuple[int, list[Chunk]]]:
    """The chunk files a manifest names: ``{rel: (file size, the chunks its ranges name
    there)}``; a file named by no range has none, and still counts as referenced."""
    files = manifest.files
    found: dict[str, tuple[int, dict[str, Chunk]]] = {}
    for blob in manifest.blobs:
        for fi, offset, length, crc, *named in blob["ranges"]:
            rel, size = files[fi]
            if not is_chunk_key(rel):
                continue
            if named:
                content = named[0]
            elif offset == 0 and length == size:
                content = content_of(rel)
            else:
                continue
            chunks = found.setdefault(rel, (size, {}))[1]
            chunks.setdefault(content, Chunk(content, rel, offset, length, crc, size))
    for rel, size in files:
        if is_chunk_key(rel) and rel not in found:
            found[rel] = (size, {})
    return {rel: (size, list(chunks.values())) for rel, (size, chunks) in found.items()}


@dataclass
class ChunkIndex:
    """The chunk files named by the kept committed steps of one name, as its writer knows
    them: which bytes a save can reuse, and which files a removed step leaves unreferenced.

    Only the name's writer (the lease holder) changes it: it adds each step it commits and
    forgets each step it removes.
    """

    steps: dict[int, dict[str, tuple[int, list[Chunk]]]] = field(default_factory=dict)
    _count: dict[str, int] = field(default_factory=dict)  # kept steps naming each file
    _by_content: dict[str, dict[str, Chunk]] = field(default_factory=dict)
    _indexed: dict[str, set[str]] = field(default_factory=dict)  # file: contents found in it
    _seen: dict[Place, Seen] = field(default_factory=dict)  # what the last save saw
    _seeing: dict[Place, Seen] = field(default_factory=dict)  # what this save sees
    _by_quick: dict[int, str] = field(default_factory=dict)  # XXH3 -> name, of chunks it saw
    seed: int = field(default_factory=lambda: int.from_bytes(os.urandom(8), "little"))
    turns: int = 0  # saves over (a save without chunked blobs is not one: it noted nothing)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, store: Store, name: str, steps: Iterable[int]) -> ChunkIndex:
        """The index of the committed ``steps`` (a damaged manifest is skipped: its chunks
        are neither reused nor deleted by the writer)."""
        index = cls()
        for step in steps:
            try:
                index.add(read_manifest(store, name, step))
            except (CorruptCheckpoint, CheckpointNotFound):
                continue
        return index

    def find(self, content: str) -> Chunk | None:
        """A kept chunk file holding bytes of hash ``content``, if any."""
        files = self._by_content.get(content)
        return next(iter(files.values())) if files else None

    def last(self, place: Place) -> Seen | None:
        """What the last save saw at ``place``, if it saw it."""
        return self._seen.get(place)

    def was_new(self, place: Place) -> bool:
        """Whether the last save wrote the bytes it saw at ``place`` (no kept step held them)."""
        seen = self._seen.get(place)
        return seen is not None and seen.new

    def named(self, quick: int) -> str | None:
        """The name of the bytes of XXH3 ``quick`` (this writer's seed), if a save of this
        writer saw them in a chunk that a kept step or the last save still holds."""
        return self._by_quick.get(quick)

    def note(self, place: Place, seen: Seen) -> None:
        """Remember, for the next save, what this save saw at ``place``."""
        self._seeing[place] = seen
        if seen.quick is not None:
            self._by_quick[seen.quick] = seen.content

    def seen(self) -> dict[Place, Seen]:
        """What the last save saw (a forked save sends it to its parent)."""
        with self.lock:
            return dict(self._seen)

    def adopt(self, seen: dict[Place, Seen]) -> None:
        """Take what a save in a forked process saw as the last save's."""
        with self.lock:
            self._seen = seen
            self._by_quick.update((s.quick, s.content) for s in seen.values() if s.quick is not None)
            self.turns += 1

    def turn(self) -> None:
        """A save is over: the places it noted are the ones the next save looks up (only
        those, so that what is remembered stays the size of one state)."""
        self._seen, self._seeing = self._seeing, {}
        self.turns += 1
        live = {seen.content for seen in self._seen.values()}
        self._by_quick = {quick: content for quick, content in self._by_quick.items()
                          if content in live or content in self._by_content}

    def reused(self) -> float | None:
        """The share of the bytes that the last save saw which a kept step held already
        (it wrote none of them), or None when it saw no chunk."""
        with self.lock:
            total = sum(stop - start for _, start, stop in self._seen)
            if not total:
                return None
            new = sum(stop - start for (_, start, stop), seen in self._seen.items() if seen.new)
            return 1 - new / total

    def add(self, manifest: Manifest) -> list[str]:
        """Record a committed step (replacing an earlier manifest of that step); returns
        the chunk files no step names any more."""
        orphans = self.forget(manifest.step)
        entries = chunk_entries(manifest)
        self.steps[manifest.step] = entries
        for rel, (_, chunks) in entries.items():
            self._count[rel] = self._count.get(rel, 0) + 1
            for chunk in chunks:
                self._by_content.setdefault(chunk.content, {}).setdefault(rel, chunk)
                self._indexed.setdefault(rel, set()).add(chunk.content)
        return [rel for rel in orphans if rel not in self._count]

    def forget(self, step: int) -> list[str]:
        """Drop a removed step; returns the chunk files no kept step names any more."""
        orphans = []
        for rel in self.steps.pop(step, {}):
            self._count[rel] -= 1
            if self._count[rel]:
                continue
            del self._count[rel]
            orphans.append(rel)
            for content in self._indexed.pop(rel, ()):  # of every step that named the file
                files = self._by_content.get(content, {})
                files.pop(rel, None)
                if not files:
                    self._by_content.pop(content, None)
        return orphans


@dataclass
class References:
    """The chunk files named by the manifests of a name, read in one stable pass."""

    files: set[str]
    problem: str | None = None
    """Why no chunk may be deleted now (a damaged manifest, a listing that kept changing)."""


def chunk_references(store: Store, name: str, *, skip: Iterable[int] = ()) -> References:
    """The chunk files every manifest of ``name`` names (committed or not, except the steps
    in ``skip``, which the caller is removing), read in a *stable pass*: the manifests are
    listed, each is read, and if one vanished meanwhile (retention removed it) the pass
    starts again, so that every manifest committed before the final listing was read.
    """
    skipped = set(skip)
    for _ in range(_STABLE_TRIES):
        files: set[str] = set()
        vanished = False
        for entry in store.list(name):
            step = step_of_manifest(entry)
            if step is None or step in skipped:
                continue
            try:
                manifest = read_manifest(store, name, step)
            except CheckpointNotFound:
                vanished = True
                break
            except CorruptCheckpoint as exc:
                return References(set(), f"the manifest of step {step} is damaged ({exc}); chunks "
                                  "are kept until it is repaired or removed")
            files.update(chunk_entries(manifest))
        if not vanished:
            return References(files)
    return References(set(), "the steps kept changing while they were read; chunks are kept")


def shared_bytes(store: Store, manifest: Manifest, steps: Iterable[int]) -> int:
    """Bytes of ``manifest``'s chunks that another of ``steps`` names too (what
    ``show`` and ``ls`` report next to a step's logical size); reads those manifests only
    when the step has chunk files. A damaged or vanished manifest counts as sharing none."""
    mine = chunk_entries(manifest)
    if not mine:
        return 0
    others: set[tuple[str, int]] = set()  # (chunk file, offset) of the chunks they name
    for step in steps:
        if step == manifest.step:
            continue
        try:
            entries = chunk_entries(read_manifest(store, manifest.name, step))
        except (CorruptCheckpoint, CheckpointNotFound):
            continue
        others.update((chunk.rel, chunk.offset) for _, chunks in entries.values() for chunk in chunks)
    return sum(chunk.size for _, chunks in mine.values() for chunk in chunks
               if (chunk.rel, chunk.offset) in others)


def chunk_files_in_store(store: Store, name: str) -> list[str]:
    """The chunk files present under ``name`` (relative keys), sorted."""
    return [f"{CHUNKS}/{e.name}" for e in store.scan(f"{name}/{CHUNKS}")
            if e.kind == "file" and is_chunk_file(e.name)]


__all__ = [
    "CHUNKS",
    "Chunk",
    "ChunkIndex",
    "References",
    "chunk_entries",
    "chunk_file",
    "chunk_files_in_store",
    "chunk_references",
    "content_cuts",
    "content_of",
    "digest",
    "is_chunk_file",
    "is_chunk_key",
    "quick_places",
    "rewritten_name",
    "shared_bytes",
    "unchanged_share",
]
