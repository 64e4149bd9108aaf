"""Tunables in one place. Code reads them as ``knobs.NAME`` at call time, so a test can
override one with ``monkeypatch.setattr(knobs, "NAME", value)``.

The limits bound what safepoint allocates for anything it reads from a store: a size, a
count or a depth found in a file is checked against them (and against the real size of the
files) before any memory is taken, so a damaged or hostile store cannot exhaust memory.
"""

from __future__ import annotations

import os

# ---------------------------------------------------------------- reading limits

MAX_MANIFEST_BYTES = 256 << 20
"""No manifest (or latest record, lease ticket...) safepoint writes is larger."""
MAX_RECORD_BYTES = 256 << 20
"""No journal record is larger: a longer length field is damage."""
MAX_JOURNAL_BYTES = 1 << 30
"""A journal is compacted long before this; a larger file is damage (a sparse file, say)."""
MAX_DEPTH = 200
"""Containers nest at most this deep in a state tree, on save and on load."""
MAX_DIMS = 64
"""Arrays have at most this many dimensions (numpy's own limit)."""
MAX_SMALL_READ = 64 << 20
"""Records read whole (lease tickets, markers, part manifests) are at most this large."""
MAX_SHARDS = 1 << 16
"""A sharded array has at most this many blocks."""

# ---------------------------------------------------------------- format

INLINE_LIMIT = 4096
"""Arrays and byte strings of at most this many bytes are stored inside the manifest."""
PACK_BELOW = 4 << 20
"""Blobs smaller than this are packed together into shared files (one write and one fsync
for many arrays); larger ones get a file of their own."""
PACK_BYTES = 64 << 20
"""A pack file is closed once it holds this many bytes."""
ALIGN = 64
"""Offsets of arrays inside a pack are multiples of this (cache-line and SIMD alignment)."""
CHUNK_BYTES = 4 << 20
"""Incremental saves cut blobs of at least this many bytes into chunks of this size, each
stored once under its content hash (``Checkpointer(..., incremental=True)``)."""
QUICK_UNCHANGED = True
"""Incremental saves take a chunk whose 128-bit XXH3 matches the one its place had at the
writer's last save as unchanged, without its BLAKE3, and name a chunk whose place changed
at the last save and again now from its XXH3. False names every chunk by its BLAKE3
alone: for states holding bytes that someone may have crafted to collide in XXH3, which is
not a cryptographic hash."""
AUTO_INCREMENTAL_ON = 0.5
"""``incremental="auto"`` saves incrementally from the save after a full one that found at
least this share of the state's bytes unchanged since the full save before it."""
AUTO_INCREMENTAL_OFF = 0.25
"""... and saves in full again after an incremental save (not the first of its run) in
which less than this share of the bytes was held by a kept step already."""
CHUNKS_PER_FILE = 8
"""Where every one of this many consecutive chunks of a blob is new at an incremental save
and was new at the writer's last save, they are written into one chunk file (one write and
one fsync for them), so that a save that changed everything costs few more fsyncs than a
full one; other new chunks get a file each. A chunk file stays while any kept step names
one of its chunks."""
SHARD_RANGE = 4 << 20
"""A shard's data is written as byte ranges of about this size, each with its own checksum,
so that a restore onto another layout reads (and verifies) little more than it needs."""
PARALLEL_BYTES = 32 << 20
"""Blob files are written, and read, on several threads above this total size."""
WRITE_THREADS = 4
READ_THREADS = 2
PREFETCH_BLOBS = 256
"""A full restore of a checkpoint of at least this many blobs (and neither chunks nor
shards) reads its data files on a thread of its own while it decodes the tree."""
COPY_THREADS = 4
"""Most threads a large in-memory copy is split between (a snapshot, ``restore(into=)``)."""
COPY_PART_BYTES = 16 << 20
"""Fewest bytes each of those threads copies."""
PAUSE_GC = True
"""Pause Python's cyclic garbage collector during a blocking save and a restore, and while
a background save encodes its tree and builds its manifest (:mod:`safepoint.format.collector`)."""

# ---------------------------------------------------------------- housekeeping

LEFTOVER_MIN_AGE = 3600.0
"""Seconds after which a Checkpointer's first save removes crash leftovers by itself;
younger ones may belong to a save in flight in another process."""
GC_MIN_AGE = 300.0
"""``safepoint gc`` leaves leftovers younger than this alone unless told otherwise."""

# ---------------------------------------------------------------- writers

LEASE_TTL = float(os.environ.get("SAFEPOINT_LEASE_TTL", "30"))
"""Seconds without a heartbeat after which a writer counts as gone (hung, paused, or on
another host; on the same host an OS lock tells at once that a writer died). Heartbeats
come every third of it. ``$SAFEPOINT_LEASE_TTL`` sets it for a whole cluster."""
LEASE_POLL = 0.2
"""Seconds between looks at a busy name, when waiting for its writer to let go."""
LOG_COMPACT_RECORDS = 256
"""On object stores a run's log (one object per record) is compacted after this many."""

# ---------------------------------------------------------------- errors

TRIM_TRACEBACKS = os.environ.get("SAFEPOINT_FULL_TRACEBACKS", "") in ("", "0")
"""A failing flow step or task shows the user's frames, not the engine's that called them
(``$SAFEPOINT_FULL_TRACEBACKS=1`` keeps every frame, to debug safepoint itself)."""
