"""A store at any fsspec URL: ``s3://``, ``gs://``, ``memory://``, ...

On object stores a commit is one PUT, which the service makes atomic. On other
filesystems it is a write to a temporary key and a move. Object stores have no links or
special files, so the no-follow rules of the protocol hold by construction.

On S3 (``s3fs``) conditional writes are native: ``create`` is a PUT with
``If-None-Match: *`` and ``publish(expect=...)`` a PUT with ``If-Match: <ETag>``, so the
check and the write are one operation. Large files go up as a multipart upload in parallel
parts. Transient errors are retried by the client itself (botocore's adaptive retry mode
and s3fs's ``retries``), never by a loop here.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import fsspec

from safepoint.errors import WriteConflict
from safepoint.store.base import (
    ABSENT,
    MARKER,
    MARKER_BODY,
    Buffer,
    Entry,
    KeyInfo,
    Store,
    check_key,
    conflict,
    too_large,
)

# Backends where a single put of a whole object is atomic.
_ATOMIC_PUT = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "oss"}
_CONDITIONAL = {"s3", "s3a"}
_PART_BYTES = 16 << 20
_PARALLEL_PARTS = 8


class FsspecStore(Store):
    """Keys are objects under ``url`` on an fsspec filesystem.

    ``storage_options`` go to the filesystem (e.g. ``client_kwargs={"endpoint_url": ...}``
    for an S3-compatible server). Listings are not cached (``use_listings_cache=False``
    unless given): another process may commit a checkpoint at any time, and ``list``,
    ``exists`` and reads must see it.
    """

    def __init__(self, url: str, **storage_options: Any) -> None:
        storage_options.setdefault("use_listings_cache", False)
        protocol = url.split("://", 1)[0]
        if protocol in _CONDITIONAL:
            config = dict(storage_options.get("config_kwargs") or {})
            config.setdefault("retries", {"max_attempts": 10, "mode": "adaptive"})
            storage_options["config_kwargs"] = config
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")
        self.url = url
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self._atomic_put = any(p in _ATOMIC_PUT for p in protocols)
        self.conditional = any(p in _CONDITIONAL for p in protocols)
        self._marked = False

    def _path(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}" if key else self.root

    def _file(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}"  # values live under the root, never at it

    def _mark(self) -> None:
        if not self._marked:
            path = self._file(MARKER)
            if not self.fs.exists(path):
                self.fs.pipe_file(path, MARKER_BODY)
            self._marked = True

    # ------------------------------------------------------------- writing

    def _put(self, path: str, data: Buffer, **conditions: Any) -> Any:
        size = memoryview(data).nbytes
        if size >= 2 * _PART_BYTES and not conditions:
            return self.fs.pipe_file(path, bytes(data), chunksize=_PART_BYTES,
                                     max_concurrency=_PARALLEL_PARTS)
        return self.fs.pipe_file(path, bytes(data) if not isinstance(data, bytes) else data,
                                 **conditions)

    def write_blob(self, key: str, chunks: Iterable[Buffer], *, durable: bool) -> None:
        self._mark()
        views = [memoryview(c).cast("B") if memoryview(c).ndim != 1 or memoryview(c).format != "B"
                 else memoryview(c) for c in chunks]
        data = views[0] if len(views) == 1 else b"".join(views)
        self._put(self._file(key), data)

    def commit(self, key: str, data: bytes, *, durable: bool) -> None:
        self._mark()
        path = self._file(key)
        if self._atomic_put:
            self._put(path, bytes(data))
            return
        parent, _, name = path.rpartition("/")
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex[:12]}.tmp"
        self.fs.pipe_file(tmp, bytes(data))
        self.fs.mv(tmp, path)

    def publish(
        self, key: str, data: bytes, *, alias: str, durable: bool, expect: str | None = None,
        exclusive: bool = False,
    ) -> str | None:
        if expect is None or not self.conditional:
            return super().publish(key, data, alias=alias, durable=durable, expect=expect,
                                   exclusive=exclusive)
        self.put_manifest(key, data, durable=durable, exclusive=exclusive)
        return self.commit_if(alias, data, expect=None if expect == ABSENT else expect,
                              durable=durable)

    def commit_if(self, key: str, data: bytes, *, expect: str | None, durable: bool) -> str | None:
        if not self.conditional:
            return super().commit_if(key, data, expect=expect, durable=durable)
        self._mark()
        try:
            if expect is None:
                out = self.fs.pipe_file(self._file(key), bytes(data), mode="create")
            else:
                out = self.fs.pipe_file(self._file(key), bytes(data), IfMatch=expect)
        except (FileExistsError, FileNotFoundError) as exc:
            raise conflict(self, key) from exc
        except OSError as exc:
            if "pre-condition" in str(exc) or "Precondition" in str(exc):
                raise conflict(self, key) from exc
            raise
        etag = out.get("ETag") if isinstance(out, dict) else None
        return str(etag) if etag else self.version(key)

    def touch(self, key: str) -> bool:
        try:
            data, version = self.read(key), self.version(key)
        except FileNotFoundError:
            return False
        try:  # conditional where the backend can: never brings back a key deleted meanwhile
            self.commit_if(key, data, expect=version, durable=False)
        except WriteConflict:
            return False
        return True

    def create(self, key: str, data: bytes, *, durable: bool) -> bool:
        self._mark()
        path = self._file(key)
        if self.conditional:
            try:
                self.fs.pipe_file(path, bytes(data), mode="create")
            except FileExistsError:
                return False
            return True
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError, TypeError):
            # No exclusive create on this backend (memory://): check, then put. Racy
            # between two creators; documented in docs/format.md.
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, bytes(data))
            return True

    # ------------------------------------------------------------- reading

    def read(self, key: str, *, limit: int | None = None) -> bytes:
        path = self._file(key)
        if limit is None:
            return bytes(self.fs.cat_file(path))
        data = self.fs.cat_file(path, start=0, end=limit + 1)
        if len(data) > limit:
            raise too_large(f"{self.url}/{key}", self.stat(key).size, limit)
        return bytes(data)

    def read_range(self, key: str, offset: int, out: memoryview) -> int:
        view = out.cast("B") if out.format != "B" or out.ndim != 1 else out
        if not view.nbytes:
            return 0
        data = self.fs.cat_file(self._file(key), start=offset, end=offset + view.nbytes)
        view[: len(data)] = data
        return len(data)

    def stat(self, key: str) -> KeyInfo:
        info = self.fs.info(self._path(key))
        if info.get("type") == "directory":
            return KeyInfo(size=0, mtime=None, kind="dir")
        etag = info.get("ETag") or info.get("etag") or info.get("generation")
        version = str(etag) if etag else f"{info.get('size')}:{_mtime(info)}"
        return KeyInfo(size=int(info.get("size") or 0), mtime=_mtime(info), version=version)

    def scan(self, prefix: str = "") -> list[Entry]:
        path = self._path(prefix)
        try:
            entries = self.fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        found: dict[str, Entry] = {}
        for entry in entries:
            full = str(entry.get("name", "")).rstrip("/")
            if full == path:  # listing a file gives the file itself: nothing under it
                continue
            name = full.rsplit("/", 1)[-1]
            if name:
                found[name] = Entry(name, "dir" if entry.get("type") == "directory" else "file")
        return [found[n] for n in sorted(found)]

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError):
            if self.fs.isdir(path):  # manifests first: the name vanishes before its data
                names = [e.name for e in self.scan(key)]
                first = sorted((n for n in names if n.endswith(".json")),
                               key=lambda n: n != "latest.json")
                for name in first:
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm(f"{path}/{name}")
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)

    def remove_empty_folder(self, key: str) -> bool:
        if self.scan(key):
            return False
        with contextlib.suppress(OSError):  # a backend with real folders: rmdir (never recursive)
            self.fs.rmdir(self._path(key))
        return True

    def delete_objects(self, keys: list[str]) -> None:
        if keys:  # non-recursive: no listing; s3fs sends one DeleteObjects per 1,000 keys
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm([self._path(key) for key in keys])


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


__all__ = ["FsspecStore"]
