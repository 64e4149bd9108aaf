"""An append-only, checksummed log of records: the fast commit of a run.

A run commits its small state many times a second; a full checkpoint (temp file, fsync,
rename, fsync of the directory) costs several flushes each time. The journal costs one:
each commit writes a record after the previous one and calls ``fdatasync``.

File layout (all integers little-endian)::

    MAGIC (8 bytes)
    record*   where record = SYNC (4 bytes) <u64 seq> <u32 length> <u32 crc32c(payload)>
                             <u32 crc32c(the 20 bytes before)> <payload>
    zeros     space written in advance for the next records

**A torn tail is told from damage.** The header carries its own checksum, so a damaged
length can never masquerade as the end of the log or send the reader into the middle of
a payload; sequence numbers only go up. When a record does not check out, the reader
searches for the next ``SYNC`` and goes on: an intact record after a damaged one proves the
damage is in the middle of the log (reported, never erased), and only the bytes after the
last intact record are a torn tail (a commit cut short by a crash), which a writer clears.
The first record of a file is always written with an atomic replace, so a damaged first
record is damage too, never an empty log.

The file is extended with zeros ahead of the records (doubling, up to :data:`PREALLOCATE`
bytes at a time), so that a commit overwrites bytes the file already has: ``fdatasync``
then flushes data only, not the file's size, which on journaling file systems saves a
metadata commit per record. :meth:`Journal.replace` swaps the whole log for a few records
(temp file, fsync, rename, fsync the directory): compaction.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import crc32c as _crc32c

from safepoint import knobs
from safepoint.errors import CorruptCheckpoint
from safepoint.store.local import LocalStore

MAGIC = b"SPJRNL2\n"
SYNC = b"\xa5SPR"
_HEAD = struct.Struct("<4sQII")  # sync, seq, length, payload crc
_HEAD_CRC = struct.Struct("<I")
HEADER = _HEAD.size + _HEAD_CRC.size
COMPACT_BYTES = 1 << 20
"""A journal whose records pass this many bytes is due for compaction."""
PREALLOCATE = 256 << 10
"""Most zeros written ahead of the records at a time (the file grows by doubling up to
this)."""

_sync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


def _crc(data: bytes | memoryview, value: int = 0) -> int:
    return _crc32c.crc32c(data, value) & 0xFFFFFFFF


def frame(seq: int, payload: bytes) -> bytes:
    """One record as it is written."""
    if not payload:
        raise ValueError("a journal record cannot be empty")
    head = _HEAD.pack(SYNC, seq, len(payload), _crc(payload))
    return head + _HEAD_CRC.pack(_crc(head)) + payload


@dataclass
class Scan:
    """What a journal's bytes hold."""

    records: list[tuple[int, bytes]] = field(default_factory=list)
    """Every intact record, as (seq, payload), in order."""
    end: int = 0
    """The offset just past the last intact record: where the next record goes."""
    damage: list[str] = field(default_factory=list)
    """Damaged stretches before the last intact record (or a damaged first record)."""
    torn: int = 0
    """Non-zero bytes after the last intact record: a commit cut short."""

    @property
    def newest(self) -> bytes | None:
        return self.records[-1][1] if self.records else None

    @property
    def seq(self) -> int:
        return self.records[-1][0] if self.records else 0


def _record_at(view: memoryview, pos: int, after: int) -> tuple[int, bytes, int] | None:
    """The intact record at ``pos`` with a sequence number above ``after``: (seq, payload,
    end), or None."""
    if pos + HEADER > len(view) or view[pos : pos + 4] != SYNC:
        return None
    _, seq, length, crc = _HEAD.unpack_from(view, pos)
    (head_crc,) = _HEAD_CRC.unpack_from(view, pos + _HEAD.size)
    if _crc(view[pos : pos + _HEAD.size]) != head_crc:
        return None
    stop = pos + HEADER + length
    if not 0 < length <= knobs.MAX_RECORD_BYTES or stop > len(view) or seq <= after:
        return None
    payload = view[pos + HEADER : stop]
    if _crc(payload) != crc:
        return None
    return seq, bytes(payload), stop


def scan(data: bytes | memoryview, where: str = "journal") -> Scan:
    """Every intact record of a journal's bytes, and where it is damaged or torn."""
    raw = data if isinstance(data, bytes) else bytes(data)
    view = memoryview(raw)
    if len(view) < len(MAGIC):
        if not bytes(view).strip(b"\0"):
            return Scan(end=0)  # an empty file: no journal yet
        raise CorruptCheckpoint(f"{where}: not a safepoint journal (too short)", path=where)
    if view[: len(MAGIC)] != MAGIC:
        if view[:6] == MAGIC[:6]:
            raise CorruptCheckpoint(
                f"{where}: journal format {bytes(view[6:7])!r} is not one this safepoint reads; "
                "it was written by another version", path=where)
        raise CorruptCheckpoint(f"{where}: not a safepoint journal (bad header)", path=where)
    found = Scan(end=len(MAGIC))
    pos, suspect = len(MAGIC), None  # suspect: where a stretch that does not check out began
    while pos < len(view):
        record = _record_at(view, pos, found.seq)
        if record is not None:
            if suspect is not None:
                found.damage.append(f"{where}: bytes {suspect}-{pos} are damaged (records "
                                    f"after them are intact)")
                suspect = None
            seq, payload, pos = record
            found.records.append((seq, payload))
            found.end = pos
            continue
        if suspect is None:
            suspect = pos
        pos = raw.find(SYNC, pos + 1)
        if pos < 0:
            break
    if suspect == len(MAGIC) and not found.records:  # the first record is written whole
        found.damage.append(f"{where}: its first record (at byte {suspect}) is damaged")
    found.torn = len(raw[found.end :].rstrip(b"\0"))
    return found


def read_journal(store: LocalStore, key: str) -> tuple[Scan | None, int]:
    """The scan of the journal at ``key`` and its size; (None, 0) when there is none. Reads
    only: a torn tail is left for the writer to clear."""
    try:
        data = store.read(key, limit=knobs.MAX_JOURNAL_BYTES)
    except FileNotFoundError:
        return None, 0
    return scan(data, f"{store.url}/{key}"), len(data)


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class Journal:
    """The writer of one journal file in a local store (one writer at a time).

    :meth:`open` returns the scan of what is there and clears a torn tail;
    :meth:`append` adds a record and, when ``durable``, makes it durable before returning.
    """

    def __init__(self, store: LocalStore, key: str, *, durable: bool = True,
                 compact_bytes: int = COMPACT_BYTES) -> None:
        self.store, self.key = store, key
        self.compact_bytes = compact_bytes
        self.where = f"{store.url}/{key}"
        self.durable = durable
        self.end = 0
        """Where the next record goes."""
        self.capacity = 0
        """The file's size: records plus the zeros ahead of them."""
        self.seq = 0
        """The sequence number of the newest record."""
        self.compacted = 0
        """Bytes of records the journal held after its last :meth:`replace`."""
        self._fd: int | None = None
        self._unsynced = False

    def open(self) -> Scan:
        """Open for writing; the scan of the journal as found (empty for a new journal).

        Raises :class:`CorruptCheckpoint` when the journal holds no intact record but is
        damaged: a run never silently starts over on a damaged journal.
        """
        found, size = read_journal(self.store, self.key)
        if found is None or (not found.records and found.end == 0):
            return Scan()
        if not found.records and found.damage:
            raise CorruptCheckpoint(
                f"{self.where}: no intact record ({found.damage[0]}); the run cannot resume "
                f"from it. `safepoint rm {self.key.rpartition('/')[0]}` to start over",
                path=self.where)
        self._fd = self.store.open_for_append(self.key)
        self.end, self.capacity, self.seq = found.end, size, found.seq
        if found.torn:  # bytes after the last intact record: clear them (never a record)
            _write_at(self._fd, bytes(size - found.end), found.end)
            if self.durable:
                _sync(self._fd)
        return found

    def append(self, payload: bytes, *, sync: bool = True) -> int:
        """Write one record after the newest; durable on return when the journal is (with
        ``sync=False``, at the next :meth:`sync` or synced append: two records, one
        ``fdatasync``). Returns its sequence number."""
        record = frame(self.seq + 1, payload)
        if self._fd is None:  # the first record: create the file with it, atomically
            self.replace([payload])
            return self.seq
        if self.end + len(record) > self.capacity:  # write zeros ahead: one size change
            grow = max(min(self.capacity, PREALLOCATE), len(record))  # doubling, up to a limit
            _write_at(self._fd, bytes(grow), self.capacity)
            self.capacity += grow
        _write_at(self._fd, record, self.end)
        self.end += len(record)
        self.seq += 1
        self._unsynced = True
        if sync:
            self.sync()
        return self.seq

    def sync(self) -> None:
        """Make every record appended so far durable (one ``fdatasync``, if any is not)."""
        if self._unsynced and self.durable and self._fd is not None:
            _sync(self._fd)
        self._unsynced = False

    @property
    def due(self) -> bool:
        """Whether the records pass ``compact_bytes`` and twice what the last compaction
        kept (time to :meth:`replace`): a compaction then costs O(1) per record appended,
        however many records stay alive."""
        return self.end > max(self.compact_bytes, 2 * self.compacted)

    def replace(self, payloads: list[bytes]) -> None:
        """Atomically make the journal hold only ``payloads`` (numbered on from the newest
        record) and zeros after them."""
        records = []
        for payload in payloads:
            self.seq += 1
            records.append(frame(self.seq, payload))
        body = MAGIC + b"".join(records)
        content = body + bytes(min(PREALLOCATE, 16 * max(len(r) for r in records)))
        self.store.commit(self.key, content, durable=self.durable)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = self.store.open_for_append(self.key)
        self.end, self.capacity = len(body), len(content)
        self.compacted = self.end

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


__all__ = ["COMPACT_BYTES", "MAGIC", "PREALLOCATE", "Journal", "Scan", "frame", "read_journal", "scan"]
