"""The storage protocol: where a checkpoint's bytes live.

A store maps keys (``"train/000000000012.json"``, always ``/``-separated and relative to the
store root) to bytes. No other layer touches files directly. Every component of a key passes
:func:`check_name`, so no key leaves the root; the empty key ``""`` is the root itself,
which ``stat``, ``exists``, ``list`` and ``delete`` accept.

**A store knows it is a store.** Its root carries a marker, :data:`MARKER`, written by the
first write. Commands that delete (``gc``, ``rm``) refuse a location without one
(:meth:`Store.is_store`), so they never clean up a folder safepoint did not create.

**Nothing outside the store.** A backend never follows a symbolic link inside the store
(reading, writing, listing or deleting) and reads only regular files: a link, a FIFO, a
device or a folder where a file is expected raises :class:`~safepoint.errors.CorruptCheckpoint`
naming the key, and deleting a link removes the link only. Sizes are checked against
``limit`` before anything is allocated.

The commit protocol every backend follows, and every reader relies on:

1. The writer puts each data file of a checkpoint with :meth:`Store.write_blob` under a
   name no earlier save used (a fresh save id), and makes it durable when asked
   (:meth:`Store.sync_folder` then makes the new names durable too).
2. The writer publishes the checkpoint with :meth:`Store.publish`, last: the manifest under
   its own key and, atomically, the same bytes under an alias (the name's ``latest.json``).
   Readers see the old value or the new one, never a part (local disk: temp file, fsync,
   rename, link, rename, fsync the folder; object stores: one PUT each). A conditional
   publish (``expect``) fails with :class:`~safepoint.errors.WriteConflict` when the alias
   changed since the writer last saw it, in the same operation as the write where the
   backend declares :attr:`Store.conditional` (S3 ``If-Match``), else by a check made just
   before it.
3. Readers start from a manifest and read only the files it names, checking each range's
   checksum; files no manifest names are crash leftovers, invisible to reads.
4. Deleting a checkpoint removes its manifest first, so it disappears atomically, then its
   files.

``durable`` means: on a local disk, fsync of the data and of the folder entries, so that
the write survives a power loss; on object stores a completed PUT is durable already.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from safepoint.errors import CorruptCheckpoint, InvalidName, WriteConflict

Buffer = bytes | bytearray | memoryview

MARKER = ".safepoint-store"
"""The file at a store's root that says it is one (JSON: format and version)."""
MARKER_BODY = b'{"format":"safepoint-store","version":2}\n'

_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")

ABSENT = "absent"
"""``expect=ABSENT``: publish only if the alias does not exist yet."""


def check_name(name: str, what: str = "name") -> str:
    """Validate one key component (a checkpoint name); reject anything that could escape.

    Allowed: letters, digits, ``_``, ``-`` and ``.``, not starting with ``.`` or ``-``,
    at most 200 characters. This rules out ``..``, absolute paths, separators and hidden
    names (which the store reserves for its own temporary files).
    """
    if not isinstance(name, str):
        raise InvalidName(f"{what} must be a str, not {type(name).__name__}", name=repr(name))
    if not _COMPONENT.fullmatch(name) or ".." in name:
        raise InvalidName(
            f"invalid {what} {name!r}: use letters, digits, '_', '-' and '.', "
            "starting with a letter, digit or '_' (no path separators, no '..')",
            name=name,
        )
    return name


def check_key(key: str) -> str:
    """Validate a ``/``-separated key: every component must pass :func:`check_name`.

    Internal keys may use a leading dot on their last component (temporary files, locks).
    """
    if not isinstance(key, str):
        raise InvalidName(f"a key must be a str, not {type(key).__name__}", name=repr(key))
    parts = key.split("/")
    for part in parts[:-1]:
        check_name(part, "key component")
    last = parts[-1]
    check_name(last[1:] if last.startswith(".") else last, "key component")
    return key


EntryKind = Literal["file", "dir", "link", "other"]


@dataclass(frozen=True)
class KeyInfo:
    """What a store knows about one key."""

    size: int
    mtime: float | None  # seconds since the epoch, when the backend reports it
    kind: EntryKind = "file"
    version: str | None = None
    """A token that changes with every write of the key (an ETag, or inode and mtime)."""


KIND_TEXT = {"link": "a symbolic link", "dir": "a folder",
             "other": "a special file (FIFO, device or socket)", "file": "a file"}
"""How messages name each kind of entry."""


@dataclass(frozen=True)
class Entry:
    """One name in a listing, with what it is (never following a link)."""

    name: str
    kind: EntryKind


class Store(ABC):
    """Where bytes live. Backends implement the abstract methods; the rest have defaults.

    Optional capabilities are declared, not discovered by callers testing the class:
    :attr:`supports_mmap` (``map`` returns memory maps), :attr:`supports_append` (a journal
    can append in place, :meth:`open_append`), :attr:`conditional` (``publish(expect=...)``
    is atomic with the write), :attr:`cheap_metadata` (``exists`` costs microseconds, as on
    a local file system: a writer looks at its lease before every commit), :attr:`fork_safe`
    (a process forked from the one that made the store may go on using it: no client
    thread, event loop or shared connection, as for a local directory; a copy-on-write
    snapshot, ``snapshot="fork"``, needs it).
    """

    url: str
    """Where this store points, for messages and listings."""

    supports_mmap: bool = False
    supports_append: bool = False
    conditional: bool = False
    cheap_metadata: bool = False
    fork_safe: bool = False

    # ---------------------------------------------------------------- writing

    @abstractmethod
    def write_blob(self, key: str, chunks: Iterable[Buffer], *, durable: bool) -> None:
        """Write (or replace) a data file from buffers, with no intermediate copy; fsync the
        data if durable. The new name is made durable by :meth:`sync_folder`."""

    @abstractmethod
    def commit(self, key: str, data: bytes, *, durable: bool) -> None:
        """Atomically publish ``data`` at ``key``: readers see all of it or the old value."""

    @abstractmethod
    def create(self, key: str, data: bytes, *, durable: bool) -> bool:
        """Write ``data`` only if ``key`` does not exist; False if it already did. Of two
        creators of one key exactly one gets True (``memory://`` cannot promise it)."""

    def publish(
        self, key: str, data: bytes, *, alias: str, durable: bool, expect: str | None = None,
        exclusive: bool = False,
    ) -> str | None:
        """Commit ``data`` at ``key`` and then, atomically, the same bytes at ``alias``;
        returns the alias's new version (for the next ``expect``), when known.

        ``expect``: the alias's version the caller last saw (or :data:`ABSENT`); if the alias
        changed since, raise :class:`~safepoint.errors.WriteConflict` and leave it alone.
        ``exclusive``: ``key`` must not exist yet (else ``WriteConflict`` on ``key``, and
        nothing is written).
        """
        self.put_manifest(key, data, durable=durable, exclusive=exclusive)
        if expect is not None and self.version(alias) != (None if expect == ABSENT else expect):
            raise conflict(self, alias)
        self.commit(alias, data, durable=durable)
        return self.version(alias)

    def put_manifest(self, key: str, data: bytes, *, durable: bool, exclusive: bool) -> None:
        """:meth:`commit`, or with ``exclusive`` :meth:`create` (``WriteConflict`` if ``key``
        exists: another writer's step of that number is never replaced)."""
        if not exclusive:
            self.commit(key, data, durable=durable)
        elif not self.create(key, data, durable=durable):
            raise conflict(self, key)

    def commit_if(self, key: str, data: bytes, *, expect: str | None, durable: bool) -> str | None:
        """Commit ``data`` at ``key`` only if its version is still ``expect`` (None: it must
        not exist); the new version. :class:`~safepoint.errors.WriteConflict` otherwise.
        Atomic where :attr:`conditional`; else a check just before the write."""
        if self.version(key) != expect:
            raise conflict(self, key)
        self.commit(key, data, durable=durable)
        return self.version(key)

    def hold_lock(self, key: str) -> Any:
        """Take and keep an exclusive OS lock on the existing file ``key`` (released when
        the returned handle is closed or the process dies); None where there is none."""
        return None

    def create_locked(self, key: str, data: bytes, *, durable: bool) -> tuple[bool, Any]:
        """:meth:`create`, holding the OS lock of ``key`` (see :meth:`hold_lock`) from the
        moment it exists, so that nobody sees it unlocked; (False, None) if it existed.

        For lease tickets, judged after a power loss by their name and age alone (the holder
        is gone, and another boot of its host looks like another host): ``durable`` makes
        the name survive a power loss, and a store may leave the contents unsynced (the
        local store does: one ``fsync`` less for every writer that starts)."""
        if not self.create(key, data, durable=durable):
            return False, None
        return True, self.hold_lock(key)

    def lock_free(self, key: str) -> bool | None:
        """Whether no process holds the OS lock of ``key``: True, False, or None (unknown:
        no OS locks on this backend, or they are switched off)."""
        return None

    def sync_folder(self, prefix: str) -> None:
        """Make the names of files written under ``prefix`` durable (no-op where a write is
        durable on its own)."""
        return

    def touch(self, key: str) -> bool:
        """Set ``key``'s modification time to now, without creating it; False if absent."""
        try:
            data = self.read(key)
        except FileNotFoundError:
            return False
        self.commit(key, data, durable=False)
        return True

    # ---------------------------------------------------------------- reading

    @abstractmethod
    def read(self, key: str, *, limit: int | None = None) -> bytes:
        """The whole value at ``key``; ``FileNotFoundError`` if absent; ``CorruptCheckpoint``
        if it is larger than ``limit`` bytes or not a regular file."""

    @abstractmethod
    def read_range(self, key: str, offset: int, out: memoryview) -> int:
        """Read up to ``len(out)`` bytes at ``offset`` into ``out``; the count read (fewer
        only at the end of the file)."""

    @abstractmethod
    def stat(self, key: str) -> KeyInfo:
        """Size, modification time and kind of ``key``; ``FileNotFoundError`` if absent."""

    @abstractmethod
    def scan(self, prefix: str = "") -> list[Entry]:
        """Entries directly under ``prefix`` with their kind (a link is reported as a link,
        not followed), sorted by name; [] if ``prefix`` is missing or a file."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` and everything under it; no error if absent. Links are removed,
        never followed."""

    def delete_objects(self, keys: list[str]) -> None:
        """Remove the plain values at ``keys`` (no folders), absent ones included: on object
        stores one batched request rather than a listing, a stat and a delete per key."""
        for key in keys:
            self.delete(key)

    def remove_empty_folder(self, key: str) -> bool:
        """Remove the folder ``key`` if it is empty, never what is in it (a file another
        process creates meanwhile stays, and so does the folder); True if it is gone. On
        object stores a prefix with no objects does not exist: gone once it is empty."""
        return not self.scan(key)

    def read_into(self, key: str, out: memoryview) -> int:
        """Read the value at ``key`` into ``out``; returns the value's full size."""
        size = self.stat(check_key(key)).size
        self.read_range(key, 0, out[: min(len(out), size)])
        return size

    def map(self, key: str) -> memoryview | None:
        """A read-only memory map of ``key``, or None where the backend cannot map."""
        return None

    def version(self, key: str) -> str | None:
        """The key's current version token, or None if absent."""
        try:
            return self.stat(key).version
        except FileNotFoundError:
            return None

    def list(self, prefix: str = "") -> list[str]:
        """Names directly under ``prefix`` (files and folders), sorted; [] if none. The
        store marker is not listed."""
        return [e.name for e in self.scan(prefix) if prefix or e.name != MARKER]

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except FileNotFoundError:
            return False
        return True

    # ---------------------------------------------------------------- the marker

    def is_store(self) -> bool:
        """Whether the root carries the store marker (some safepoint wrote here)."""
        return self.exists(MARKER)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def conflict(store: Store, key: str) -> WriteConflict:
    """The error for a conditional write that lost to another writer."""
    return WriteConflict(
        f"{store.url}/{key} was changed by another writer; this write did not happen", key=key)


def unsafe_entry(where: str, what: str) -> CorruptCheckpoint:
    """The error for something in a store that safepoint will not read or follow."""
    return CorruptCheckpoint(
        f"{where} is {what}, not a file safepoint wrote; safepoint never follows links or "
        "reads special files inside a store. Remove it (it may point outside the store)",
        path=where)


def too_large(where: str, size: int, limit: int, what: str = "file") -> CorruptCheckpoint:
    """The error for a file larger than anything safepoint writes of its kind."""
    return CorruptCheckpoint(
        f"{where} is {size} bytes, more than any {what} safepoint writes ({limit} bytes); it "
        "is damaged or not safepoint's", path=where, expected=f"<= {limit}", actual=str(size))
