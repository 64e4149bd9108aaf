"""A store in a local directory, with POSIX durability (fsync of files and directories)."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

from safepoint.store.base import Buffer, KeyInfo, Store, check_key

# os.write caps one call at about 2 GiB on Linux; write large buffers in slices.
_MAX_WRITE = 1 << 30


def _write_all(fd: int, view: memoryview) -> None:
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    offset, total = 0, len(view)
    while offset < total:
        offset += os.write(fd, view[offset : offset + _MAX_WRITE])


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new, renamed or removed files) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(path: Path, data: Buffer, durable: bool) -> Path:
    """Write ``data`` to a fresh hidden temp file beside ``path`` (fsync'd if durable)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, memoryview(data))
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    return tmp


class LocalStore(Store):
    """Keys are files under ``root``; commit is temp file, fsync, rename, fsync directory."""

    supports_mmap = True

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.url = str(self.root)

    def path(self, key: str) -> Path:
        """The file behind ``key`` (validated so that it cannot leave the root); ``""`` is
        the root itself."""
        return self.root / check_key(key) if key else self.root

    def _file(self, key: str) -> Path:
        return self.root / check_key(key)  # values live under the root, never at it

    def _ensure_parent(self, path: Path, durable: bool) -> None:
        parent = path.parent
        if parent.is_dir():
            return
        missing = []
        while not parent.is_dir():
            missing.append(parent)
            parent = parent.parent
        for directory in reversed(missing):
            with contextlib.suppress(FileExistsError):
                directory.mkdir()
            if durable:
                fsync_dir(directory.parent)

    def write_blob(self, key: str, chunks: Iterable[Buffer], *, durable: bool) -> None:
        path = self._file(key)
        self._ensure_parent(path, durable)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for chunk in chunks:
                _write_all(fd, memoryview(chunk))
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)

    def commit(self, key: str, data: bytes, *, durable: bool) -> None:
        path = self._file(key)
        self._ensure_parent(path, durable)
        tmp = _write_temp(path, data, durable)
        try:
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if durable:
            fsync_dir(path.parent)

    def create(self, key: str, data: bytes, *, durable: bool) -> bool:
        path = self._file(key)
        self._ensure_parent(path, durable)
        # Write a temp file, then link() it into place: link fails if the name exists, so
        # the value appears complete or not at all, and only one creator wins.
        tmp = _write_temp(path, data, durable)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        if durable:
            fsync_dir(path.parent)
        return True

    def read(self, key: str) -> bytes:
        return self._file(key).read_bytes()

    def read_into(self, key: str, out: memoryview) -> int:
        with open(self._file(key), "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            view = out.cast("B") if out.format != "B" or out.ndim != 1 else out
            n, total = 0, min(size, len(view))
            while n < total:
                got = f.readinto(view[n:total])
                if not got:
                    break
                n += got
            return size

    def map(self, key: str) -> memoryview | None:
        with open(self._file(key), "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return memoryview(b"")
            return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))

    def stat(self, key: str) -> KeyInfo:
        st = self.path(key).stat()
        return KeyInfo(size=st.st_size, mtime=st.st_mtime)

    def list(self, prefix: str = "") -> list[str]:
        try:
            return sorted(os.listdir(self.path(prefix)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete(self, key: str) -> None:
        path = self.path(key)
        try:
            if path.is_dir() and not path.is_symlink():
                _remove_tree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            pass


def _remove_tree(path: Path) -> None:
    # Remove a manifest first, so that a half-deleted checkpoint is invisible to readers.
    manifest = path / "manifest.json"
    with contextlib.suppress(FileNotFoundError):
        manifest.unlink()
    for entry in sorted(path.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            _remove_tree(entry)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
    try:
        path.rmdir()
    except OSError as exc:  # a concurrent writer added a file: leave it for gc
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
            raise
