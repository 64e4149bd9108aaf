"""An append-only, checksummed log of small records: the fast commit of a run.

A run commits its small state many times a second; a full checkpoint (temp file, fsync,
rename, fsync of the directory) costs several flushes each time. The journal costs one:
each commit writes a record after the previous one and calls ``fdatasync``. The newest
intact record wins.

File layout::

    MAGIC (8 bytes)
    record*   where record = <u32 length> <u32 crc32c(length bytes + payload)> <payload>
    zeros     space written in advance for the next records

All integers are little-endian. The file is extended with zeros ahead of the records
(doubling, up to :data:`PREALLOCATE` bytes at a time), so that a commit overwrites
bytes the file already has: ``fdatasync`` then flushes data only, not the file's size, which
on journaling file systems saves a metadata commit per record. A header of zeros ends the
log. A record interrupted by a crash (a torn tail) or damaged on disk fails its length or
checksum check and is ignored, so readers see the previous record; a writer opening the
journal clears such a tail before it writes.

When the records pass ``compact_bytes`` the file is replaced atomically by one holding only
the newest record (temp file, fsync, rename, fsync the directory), so its size stays bounded.
"""

from __future__ import annotations

import contextlib
import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import crc32c as _crc32c

from safepoint.errors import CorruptCheckpoint
from safepoint.store.local import LocalStore, fsync_dir

MAGIC = b"SPJRNL1\n"
_HEAD = struct.Struct("<II")
COMPACT_BYTES = 1 << 20
"""Replace the log by its newest record once the records pass this many bytes."""
PREALLOCATE = 256 << 10
"""Most zeros written ahead of the records at a time (the file grows by doubling up to
this)."""
MAX_RECORD = 1 << 30
"""No record is larger: a length field above it is damage, not data."""

_sync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


def _crc(head_length: bytes, payload: bytes | memoryview) -> int:
    return _crc32c.crc32c(payload, _crc32c.crc32c(head_length)) & 0xFFFFFFFF


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def frame(payload: bytes) -> bytes:
    """One record as it is written: length, checksum, payload."""
    if not payload:
        raise ValueError("a journal record cannot be empty")
    length = struct.pack("<I", len(payload))
    return length + struct.pack("<I", _crc(length, payload)) + payload


@dataclass(frozen=True)
class Scan:
    """What a journal's bytes hold."""

    newest: bytes | None
    """The payload of the newest intact record, or None."""
    end: int
    """The offset just past that record: where the next record goes."""
    records: int
    """How many intact records there are."""


def scan(data: bytes | memoryview, where: str = "journal") -> Scan:
    """Find the newest intact record in a journal's bytes.

    A header of zeros ends the log. A record whose checksum fails is skipped when its length
    field still leads to a record that checks out (a damaged byte in the middle of the log);
    a record cut short by the end of the file ends the scan (a torn tail).
    """
    view = memoryview(data)
    if len(view) < len(MAGIC):
        if MAGIC.startswith(bytes(view)):  # a creation cut short: an empty journal
            return Scan(None, 0, 0)
        raise CorruptCheckpoint(f"{where}: not a safepoint journal", path=where)
    if view[: len(MAGIC)] != MAGIC:
        raise CorruptCheckpoint(f"{where}: not a safepoint journal (bad header)", path=where)
    pos = end = len(MAGIC)
    newest: bytes | None = None
    records = 0
    while pos + _HEAD.size <= len(view):
        length, crc = _HEAD.unpack_from(view, pos)
        if length == 0 and crc == 0:  # the zeros after the last record
            break
        stop = pos + _HEAD.size + length
        if length > MAX_RECORD or stop > len(view):
            break
        payload = view[pos + _HEAD.size : stop]
        if length and _crc(bytes(view[pos : pos + 4]), payload) == crc:
            newest, end, records = bytes(payload), stop, records + 1
        pos = stop
    return Scan(newest, end, records)


def read_journal(store: LocalStore, key: str) -> tuple[bytes | None, int]:
    """The newest intact payload of the journal at ``key`` and the file's size; (None, 0)
    when there is no journal. Reads only: a torn tail is left for the writer to clear."""
    try:
        data = store.path(key).read_bytes()
    except FileNotFoundError:
        return None, 0
    return scan(data, f"{store.url}/{key}").newest, len(data)


class Journal:
    """The writer of one journal file in a local store (one writer at a time).

    ``open()`` returns the newest record and clears a torn tail; ``append()`` adds a record
    and, when ``durable``, makes it durable before returning.
    """

    def __init__(
        self, store: LocalStore, key: str, *, durable: bool = True, compact_bytes: int = COMPACT_BYTES
    ) -> None:
        self.path: Path = store.path(key)
        self.where = f"{store.url}/{key}"
        self.durable = durable
        self.compact_bytes = compact_bytes
        self.end = 0
        """Where the next record goes."""
        self.capacity = 0
        """The file's size: records plus the zeros ahead of them."""
        self._fd: int | None = None

    def open(self) -> bytes | None:
        """Open for writing; returns the newest intact payload (None for a new journal).

        The file is created by the first append, so a run that never commits leaves none.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        found = scan(data, self.where)
        if found.end < len(MAGIC):  # a creation cut short: the first append replaces it
            return None
        self._fd = os.open(self.path, os.O_RDWR)
        self.end, self.capacity = found.end, len(data)
        if data[found.end :].strip(b"\0"):  # a torn or damaged tail: clear it
            _write_at(self._fd, bytes(len(data) - found.end), found.end)
            if self.durable:
                _sync(self._fd)
        return found.newest

    def append(self, payload: bytes) -> None:
        """Write one record after the newest; durable on return when the journal is."""
        record = frame(payload)
        if self._fd is None:  # the first record: create the file with it, atomically
            self._replace(record)
            return
        if self.end + len(record) > self.capacity:  # write zeros ahead: one size change
            grow = max(min(self.capacity, PREALLOCATE), len(record))  # doubling, up to a limit
            _write_at(self._fd, bytes(grow), self.capacity)
            self.capacity += grow
        _write_at(self._fd, record, self.end)
        if self.durable:
            _sync(self._fd)
        self.end += len(record)
        if self.end > self.compact_bytes and self.end > 4 * len(record):
            self._replace(record)

    def _replace(self, record: bytes) -> None:
        """Atomically make the journal hold only ``record`` (and zeros after it)."""
        directory = self.path.parent
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            if self.durable:
                fsync_dir(directory.parent)
        tmp = directory / f".{self.path.name}.{uuid.uuid4().hex[:12]}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        content = MAGIC + record + bytes(min(PREALLOCATE, 16 * len(record)))
        try:
            _write_at(fd, content, 0)
            if self.durable:
                os.fsync(fd)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if self.durable:
            fsync_dir(directory)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd  # the descriptor now names the journal itself
        self.end, self.capacity = len(MAGIC) + len(record), len(content)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


__all__ = ["COMPACT_BYTES", "MAGIC", "PREALLOCATE", "Journal", "Scan", "frame", "read_journal", "scan"]
