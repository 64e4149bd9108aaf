"""Writing the chunks of an incremental save (see :mod:`safepoint.format.chunks`).

A chunked blob's chunks are taken in *segments* of up to
:data:`~safepoint.knobs.CHUNKS_PER_FILE` consecutive chunks, each segment on one writing
thread: every chunk is hashed (XXH3 at its place first, then BLAKE3 if its bytes changed;
at a place whose bytes changed at the last save too, the XXH3 names the chunk) and a chunk
a kept step holds is named.
New chunks are written each to a chunk file of its own, named by its BLAKE3 and the save
id, except in a segment that is being rewritten: every chunk new at this save and at the
writer's last one (weights that training changes everywhere).
Its chunks go together into one file, named by its first chunk, with one write and one
fsync; since the next save most likely rewrites them all again, the file dies whole, and a
kept step rarely holds superseded bytes through it. A chunk file of several chunks names
each chunk's content in its byte ranges (format version 5).
"""

from __future__ import annotations

import threading
from typing import Any

from safepoint import knobs
from safepoint.format.chunks import (
    Chunk,
    ChunkIndex,
    Seen,
    chunk_file,
    digest,
    quick_digest,
    rewritten_name,
)
from safepoint.format.manifest import checksum
from safepoint.format.tree import BlobRef
from safepoint.store import Store

Where = tuple[int, int]
"""A chunk of this save: its blob's index and its start offset in the blob."""


class ChunkWriter:
    """The chunks of one save's chunked blobs: :meth:`write` each segment (on any thread),
    then :meth:`close`, then :meth:`finish`; :attr:`named` then holds every chunk's
    :class:`Chunk`."""

    def __init__(self, store: Store, name: str, save_id: str, blobs: list[BlobRef],
                 plan: dict[int, list[tuple[int, int]]], index: ChunkIndex, *, durable: bool,
                 written: list[str]) -> None:
        self.store, self.name, self.save_id, self.blobs = store, name, save_id, blobs
        self.index, self.durable, self.written = index, durable, written
        per_file = max(1, knobs.CHUNKS_PER_FILE)
        self.segments = [(blob, spans[at : at + per_file]) for blob, spans in plan.items()
                         for at in range(0, len(spans), per_file)]
        self.named: dict[Where, Chunk] = {}
        self.wrote = False
        self._claimed: set[str] = set()  # contents this save writes
        self._fresh: dict[str, Chunk] = {}  # ... once written
        self._later: list[tuple[Where, str]] = []  # chunks another segment writes
        self._lock = threading.Lock()

    def write(self, segment: int) -> None:
        """Hash the chunks of ``segment``, name the kept ones, write the new ones."""
        index, spans = self.segments[segment]
        blob = self.blobs[index]
        new: list[tuple[int, Any, str]] = []  # (start, bytes, content)
        changing = True  # every chunk new now and at the last save: the segment is rewritten
        for start, stop in spans:
            data = blob.data[start:stop]
            place = (blob.tree_path, start, stop)
            seen, known = self._identify(data, place)
            content = seen.content
            with self.index.lock:
                changing = changing and known is None and self.index.was_new(place)
                self.index.note(place, seen)
            if known is not None:
                self.named[(index, start)] = known
                continue
            with self._lock:
                ours = content not in self._claimed
                if ours:
                    self._claimed.add(content)
                else:  # the same bytes elsewhere in this save: one copy
                    self._later.append(((index, start), content))
            if ours:
                new.append((start, data, content))
        if changing and len(new) == len(spans):
            self._write_file(index, new)  # it dies whole when the next save rewrites it too
        else:
            for chunk in new:  # each dies on its own: no superseded bytes held by a kept one
                self._write_file(index, [chunk])

    def _write_file(self, index: int, new: list[tuple[int, Any, str]]) -> None:
        if not new:
            return
        rel = chunk_file(new[0][2], self.save_id)
        size = sum(data.nbytes for _, data, _ in new)
        made, offset = [], 0
        for start, data, content in new:
            made.append(((index, start), Chunk(content, rel, offset, data.nbytes,
                                               checksum(data), size)))
            offset += data.nbytes
        self.written.append(f"{self.name}/{rel}")
        self.store.write_blob(f"{self.name}/{rel}", [data for _, data, _ in new],
                              durable=self.durable)
        with self._lock:
            self.wrote = True
            for where, chunk in made:
                self.named[where] = chunk
                self._fresh[chunk.content] = chunk

    def _identify(self, data: Any, place: tuple[str, int, int]) -> tuple[Seen, Chunk | None]:
        """What this save sees at ``place``, and a kept chunk holding those bytes if any.

        The XXH3 at a place spares the BLAKE3 where the bytes are those of the last save.
        Where they had changed at the last save too (weights that training rewrites
        everywhere), the chunk is named from its XXH3 (:func:`rewritten_name`): bytes that
        change at every save are never shared, so their BLAKE3 would buy nothing, and a
        save in which everything changed hashes each byte once, at XXH3's speed.
        """
        index = self.index
        with index.lock:
            last = index.last(place)
        if not knobs.QUICK_UNCHANGED:
            content = digest(data)
            with index.lock:
                known = index.find(content)
            changed = last is not None and last.content != content
            return Seen(None, content, new=known is None, changed=changed), known
        quick = quick_digest(data, index.seed)
        if last is not None and last.quick == quick:
            content, changed = last.content, False
        elif last is not None and last.changed:
            with index.lock:  # bytes it saw before (a region set back) keep their name
                content = index.named(quick) or rewritten_name(quick, index.seed)
            changed = True
        else:
            content = digest(data)
            changed = last is not None and last.content != content
        with index.lock:
            known = index.find(content)
        return Seen(quick, content, new=known is None, changed=changed), known

    def close(self) -> None:
        """The save is over, written or not: what it saw is what the next save looks up."""
        with self.index.lock:
            self.index.turn()

    def finish(self) -> None:
        """Name, for each chunk whose bytes another chunk of this save wrote, that one
        (every segment has been written)."""
        for where, content in self._later:
            self.named[where] = self._fresh[content]
