"""The storage protocol: where a checkpoint's bytes live.

A store maps keys (``"name/000000000012/manifest.json"``, always ``/``-separated and
relative to the store root) to bytes. No other layer touches files directly. Every
component of a key passes :func:`check_name`, so no key leaves the root; the empty key
``""`` is the root itself, which ``stat``, ``exists``, ``list`` and ``delete`` accept.

The commit protocol every backend follows, and every reader relies on:

1. The writer puts each blob of a checkpoint with :meth:`Store.write_blob` under a name no
   earlier save used (a fresh save id), and makes it durable (fsync) when asked.
2. The writer publishes the checkpoint by writing its manifest with :meth:`Store.commit`,
   last. ``commit`` is atomic: readers see the old manifest or the new one, never a part
   (local disk: temp file, fsync, rename, fsync the directory; object stores: one PUT).
3. Readers start from a manifest and read only the blobs it names, checking each checksum;
   blobs no manifest names are crash leftovers, invisible to reads and removed by ``gc``.
4. Deleting a checkpoint removes its manifest first, so it disappears atomically, then the
   blobs.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

from safepoint.errors import InvalidName

Buffer = bytes | bytearray | memoryview

_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")


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

    Internal keys may use a leading dot on their last component (temporary files).
    """
    parts = key.split("/")
    for part in parts[:-1]:
        check_name(part, "key component")
    last = parts[-1]
    check_name(last[1:] if last.startswith(".") else last, "key component")
    return key


@dataclass(frozen=True)
class KeyInfo:
    """What a store knows about one key."""

    size: int
    mtime: float | None  # seconds since the epoch, when the backend reports it


class Store(ABC):
    """Where bytes live. Backends implement the abstract methods; the rest have defaults."""

    url: str
    """Where this store points, for messages and listings."""

    supports_mmap: bool = False

    @abstractmethod
    def write_blob(self, key: str, chunks: Iterable[Buffer], *, durable: bool) -> None:
        """Write (or replace) a blob from buffers, with no intermediate copy; fsync if durable."""

    @abstractmethod
    def commit(self, key: str, data: bytes, *, durable: bool) -> None:
        """Atomically publish ``data`` at ``key``: readers see all of it or the old value."""

    @abstractmethod
    def create(self, key: str, data: bytes, *, durable: bool) -> bool:
        """Write ``data`` only if ``key`` does not exist; False if it already did."""

    @abstractmethod
    def read(self, key: str) -> bytes:
        """The whole value at ``key``; ``FileNotFoundError`` if absent."""

    @abstractmethod
    def stat(self, key: str) -> KeyInfo:
        """Size and modification time of ``key``; ``FileNotFoundError`` if absent."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Names directly under ``prefix`` (files and folders), sorted; [] if none."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` and everything under it; no error if absent."""

    def read_into(self, key: str, out: memoryview) -> int:
        """Read the value at ``key`` into ``out``; returns the number of bytes read."""
        data = self.read(key)
        n = min(len(data), len(out))
        out[:n] = data[:n]
        return len(data)

    def map(self, key: str) -> memoryview | None:
        """A read-only memory map of ``key``, or None where the backend cannot map."""
        return None

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except FileNotFoundError:
            return False
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
