"""A store at any fsspec URL: ``s3://``, ``gs://``, ``memory://``, ...

On object stores a commit is one PUT, which the service makes atomic. On other
filesystems it is a write to a temporary key and a move.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import fsspec

from safepoint.store.base import Buffer, KeyInfo, Store, check_key

# Backends where a single put of a whole object is atomic.
_ATOMIC_PUT = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "oss"}


class FsspecStore(Store):
    """Keys are objects under ``url`` on an fsspec filesystem.

    ``storage_options`` go to the filesystem (e.g. ``client_kwargs={"endpoint_url": ...}``
    for an S3-compatible server). Listings are not cached (``use_listings_cache=False``
    unless given): another process may commit a checkpoint at any time, and ``list``,
    ``exists`` and reads must see it.
    """

    def __init__(self, url: str, **storage_options: Any) -> None:
        storage_options.setdefault("use_listings_cache", False)
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")
        self.url = url
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self._atomic_put = any(p in _ATOMIC_PUT for p in protocols)

    def _path(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}" if key else self.root

    def _file(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}"  # values live under the root, never at it

    def write_blob(self, key: str, chunks: Iterable[Buffer], *, durable: bool) -> None:
        with self.fs.open(self._file(key), "wb") as f:
            for chunk in chunks:
                f.write(chunk)

    def commit(self, key: str, data: bytes, *, durable: bool) -> None:
        path = self._file(key)
        if self._atomic_put:
            self.fs.pipe_file(path, bytes(data))
            return
        parent, _, name = path.rpartition("/")
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex[:12]}.tmp"
        self.fs.pipe_file(tmp, bytes(data))
        self.fs.mv(tmp, path)

    def create(self, key: str, data: bytes, *, durable: bool) -> bool:
        path = self._file(key)
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError, TypeError):
            # No exclusive create on this backend: check, then put. Racy between two
            # creators; attempt numbers are also checked on every commit.
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, bytes(data))
            return True

    def read(self, key: str) -> bytes:
        return self.fs.cat_file(self._file(key))

    def read_into(self, key: str, out: memoryview) -> int:
        view = out.cast("B") if out.format != "B" or out.ndim != 1 else out
        with self.fs.open(self._file(key), "rb") as f:
            size = f.size if hasattr(f, "size") else None
            n = 0
            while n < len(view):
                chunk = f.read(min(len(view) - n, 64 << 20))
                if not chunk:
                    break
                view[n : n + len(chunk)] = chunk
                n += len(chunk)
            return size if size is not None else n + len(f.read())

    def stat(self, key: str) -> KeyInfo:
        info = self.fs.info(self._path(key))
        if info.get("type") == "directory":
            return KeyInfo(size=0, mtime=None)
        return KeyInfo(size=int(info.get("size") or 0), mtime=_mtime(info))

    def list(self, prefix: str = "") -> list[str]:
        path = self._path(prefix)
        try:
            entries = self.fs.ls(path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        # Listing a file gives the file itself: a file has nothing under it.
        names = {str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries if str(e).rstrip("/") != path}
        names.discard("")
        return sorted(names)

    def delete(self, key: str) -> None:
        path = self._path(key)
        manifest = f"{path}/manifest.json"
        with contextlib.suppress(FileNotFoundError):
            if self.fs.isdir(path) and self.fs.exists(manifest):
                self.fs.rm(manifest)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)


def _mtime(info: dict[str, Any]) -> float | None:
    for field in ("mtime", "LastModified", "last_modified", "created", "updated"):
        value = info.get(field)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    return None
