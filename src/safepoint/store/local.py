"""A store in a local directory, with POSIX durability (fsync of files and directories).

Every operation walks from the root one component at a time with ``openat``-style calls and
``O_NOFOLLOW``, so a symbolic link anywhere inside the store is never followed, whatever
it points at; files are opened non-blocking and checked with ``fstat`` to be regular
before a byte is read, so a FIFO or a device cannot hang or feed a read.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import itertools
import mmap
import os
import stat as stat_module
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from safepoint.store.base import (
    ABSENT,
    KIND_TEXT,
    MARKER,
    MARKER_BODY,
    Buffer,
    Entry,
    EntryKind,
    KeyInfo,
    Store,
    check_key,
    conflict,
    too_large,
    unsafe_entry,
)

# os.write caps one call at about 2 GiB on Linux; write large buffers in slices.
_MAX_WRITE = 1 << 30
_IOV_MAX = 1024
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_WRITE = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_LINK_UNSUPPORTED = {errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOTSUP, errno.EXDEV}


def _view(data: Buffer) -> memoryview:
    view = memoryview(data)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _write_all(fd: int, chunks: Iterable[Buffer]) -> None:
    """Write every buffer, in as few system calls as the kernel allows (``writev``)."""
    pending: list[memoryview] = []
    for chunk in chunks:
        view = _view(chunk)
        if view.nbytes:
            pending.append(view)
        if len(pending) >= _IOV_MAX:
            _writev(fd, pending)
            pending = []
    _writev(fd, pending)


def _writev(fd: int, views: list[memoryview]) -> None:
    """Write ``views`` whole, however the kernel splits the writes: a short ``writev`` goes
    on from the byte where it stopped, found by bisecting the running sum of the sizes. A
    call ends with the first view too large for one call, so that the bytes it wrote are a
    prefix of the views as given."""
    while views:
        batch = views[:_IOV_MAX]
        sizes = [v.nbytes for v in batch]
        if max(sizes) > _MAX_WRITE:  # rare: end the call with the first that cannot go whole
            cut = next(i for i, size in enumerate(sizes) if size > _MAX_WRITE)
            batch = [*batch[:cut], batch[cut][:_MAX_WRITE]]
            sizes = sizes[: cut + 1]  # the cut view's own size: its rest stays to write
        written = os.writev(fd, batch)
        ends = list(itertools.accumulate(sizes))
        whole = bisect.bisect_right(ends, written)  # views written entirely (not cut ones)
        rest = written - (ends[whole - 1] if whole else 0)
        views = views[whole:]
        if rest:
            views[0] = views[0][rest:]


def _kind(mode: int) -> EntryKind:
    if stat_module.S_ISREG(mode):
        return "file"
    if stat_module.S_ISDIR(mode):
        return "dir"
    if stat_module.S_ISLNK(mode):
        return "link"
    return "other"


_WHAT = KIND_TEXT


def fsync_dir(path: str | os.PathLike[str] | int) -> None:
    """Make a directory's entries (new, renamed or removed files) durable."""
    if isinstance(path, int):
        os.fsync(path)
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore(Store):
    """Keys are files under ``root``; commit is temp file, fsync, rename, fsync directory."""

    supports_mmap = True
    supports_append = True
    cheap_metadata = True
    fork_safe = True  # plain system calls on descriptors opened per operation
    conditional = True  # publish(expect=...) under a lock on the folder (one host)

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.url = str(self.root)
        self._marked = False

    # ------------------------------------------------------------- walking

    def path(self, key: str) -> Path:
        """The file behind ``key`` (for messages; the store itself never opens by path)."""
        return self.root / check_key(key) if key else self.root

    def _where(self, key: str) -> str:
        return f"{self.url}/{key}" if key else self.url

    def _open_root(self, create: bool, durable: bool) -> int:
        try:
            return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            if not create:
                raise
        self.root.mkdir(parents=True, exist_ok=True)
        return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def _mark(self, root_fd: int, durable: bool) -> None:
        """Write the store marker once (the first write through this store object)."""
        if self._marked:
            return
        try:
            fd = os.open(MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                         os.O_CLOEXEC, 0o644, dir_fd=root_fd)
        except FileExistsError:
            pass
        else:
            try:
                os.write(fd, MARKER_BODY)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if durable:
                os.fsync(root_fd)
        self._marked = True

    def _enter(self, parent: int, part: str, key: str, *, create: bool, durable: bool) -> int:
        try:
            return os.open(part, _DIR, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                kind = self._lkind(parent, part)
                if kind == "file":  # nothing can be under a file: for a lookup, not found
                    error = NotADirectoryError if create else FileNotFoundError
                    raise error(errno.ENOTDIR, f"{self._where(key)} is a file, not a folder") from None
                raise unsafe_entry(self._where(key), _WHAT.get(kind, "not a folder")) from None
            raise
        with contextlib.suppress(FileExistsError):
            os.mkdir(part, 0o755, dir_fd=parent)
        if durable:
            os.fsync(parent)
        return os.open(part, _DIR, dir_fd=parent)

    @staticmethod
    def _lkind(parent: int, name: str) -> EntryKind:
        try:
            return _kind(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return "other"

    @contextlib.contextmanager
    def _parent(self, key: str, *, create: bool = False, durable: bool = False) -> Iterator[tuple[int, str]]:
        """The descriptor of ``key``'s folder (made if ``create``) and its last component."""
        parts = check_key(key).split("/")
        fd = self._open_root(create, durable)
        try:
            if create:
                self._mark(fd, durable)
            for i, part in enumerate(parts[:-1]):
                inner = self._enter(fd, part, "/".join(parts[: i + 1]), create=create, durable=durable)
                os.close(fd)
                fd = inner
            yield fd, parts[-1]
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _folder(self, prefix: str) -> Iterator[int]:
        """The descriptor of the folder ``prefix`` (``""``: the root)."""
        if not prefix:
            fd = self._open_root(False, False)
            try:
                yield fd
            finally:
                os.close(fd)
            return
        with self._parent(prefix) as (parent, name):
            fd = self._enter(parent, name, prefix, create=False, durable=False)
            try:
                yield fd
            finally:
                os.close(fd)

    def _open_regular(self, parent: int, name: str, key: str, flags: int = _READ) -> int:
        try:
            fd = os.open(name, flags, 0o644, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                raise unsafe_entry(self._where(key), _WHAT.get(self._lkind(parent, name),
                                   "not a file")) from None
            raise
        kind = _kind(os.fstat(fd).st_mode)
        if kind != "file":
            os.close(fd)
            raise unsafe_entry(self._where(key), _WHAT.get(kind, "not a file"))
        return fd

    @contextlib.contextmanager
    def open_fd(self, key: str, *, write: bool = False) -> Iterator[int]:
        """A descriptor of the regular file ``key`` (read, or read and write), never through
        a link; for the journal, which appends in place."""
        with self._parent(key) as (parent, name):
            fd = self._open_regular(parent, name, key,
                                    (os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
                                    if write else _READ)
        try:
            yield fd
        finally:
            os.close(fd)

    def open_for_append(self, key: str) -> int:
        """An open read-write descriptor of the regular file ``key``; the caller closes it."""
        with self._parent(key) as (parent, name):
            return self._open_regular(parent, name, key,
                                      os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)

    # ------------------------------------------------------------- writing

    def _temp(self, parent: int, name: str, key: str, chunks: Iterable[Buffer], durable: bool) -> str:
        """Write a fresh hidden temp file beside ``name`` (fsync'd if durable)."""
        tmp = f".{name}.{uuid.uuid4().hex[:12]}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644, dir_fd=parent)
        try:
            _write_all(fd, chunks)
            if durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=parent)
            raise
        os.close(fd)
        return tmp

    def write_blob(self, key: str, chunks: Iterable[Buffer], *, durable: bool) -> None:
        with self._parent(key, create=True, durable=durable) as (parent, name):
            fd = self._open_regular(parent, name, key, _WRITE)
            try:
                os.ftruncate(fd, 0)
                _write_all(fd, chunks)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)

    def sync_folder(self, prefix: str) -> None:
        with self._folder(prefix) as fd:
            os.fsync(fd)

    def commit(self, key: str, data: bytes, *, durable: bool) -> None:
        with self._parent(key, create=True, durable=durable) as (parent, name):
            tmp = self._temp(parent, name, key, [data], durable)
            self._replace(parent, tmp, name, key, durable=durable)

    def publish(
        self, key: str, data: bytes, *, alias: str, durable: bool, expect: str | None = None,
        exclusive: bool = False,
    ) -> str | None:
        folder, _, _ = key.rpartition("/")
        alias_folder, _, alias_name = alias.rpartition("/")
        if folder != alias_folder:
            return super().publish(key, data, alias=alias, durable=durable, expect=expect,
                                   exclusive=exclusive)
        with self._parent(key, create=True, durable=durable) as (parent, name):
            tmp = self._temp(parent, name, key, [data], durable)
            try:
                if exclusive:  # link() fails if the name exists: another writer's step stays
                    try:
                        os.link(tmp, name, src_dir_fd=parent, dst_dir_fd=parent,
                                follow_symlinks=False)
                    except FileExistsError:
                        raise conflict(self, key) from None
                    os.unlink(tmp, dir_fd=parent)
                else:
                    os.replace(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=parent)
                raise
            second = f".{alias_name}.{uuid.uuid4().hex[:12]}.tmp"
            try:  # the alias is a hard link: the same (already durable) bytes, no second write
                os.link(name, second, src_dir_fd=parent, dst_dir_fd=parent, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in _LINK_UNSUPPORTED:
                    raise
                second = self._temp(parent, alias_name, alias, [data], durable)
            if expect is None:
                return self._replace(parent, second, alias_name, alias, durable=durable)
            return self._replace(parent, second, alias_name, alias, durable=durable,
                                 expect=None if expect == ABSENT else expect)

    @contextlib.contextmanager
    def _locked(self, parent: int) -> Iterator[None]:
        """An exclusive lock on the folder, held for a check and a rename (one host)."""
        fd = os.open(".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=parent)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _version_at(parent: int, name: str) -> str | None:
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"

    def create(self, key: str, data: bytes, *, durable: bool) -> bool:
        return self._create(key, data, durable=durable, lock=False)[0]

    def create_locked(self, key: str, data: bytes, *, durable: bool) -> tuple[bool, Any]:
        return self._create(key, data, durable=durable, sync_data=False,
                            lock=os.environ.get("SAFEPOINT_OS_LOCKS", "1") != "0")

    def _create(self, key: str, data: bytes, *, durable: bool, lock: bool,
                sync_data: bool = True) -> tuple[bool, Any]:
        with self._parent(key, create=True, durable=durable) as (parent, name):
            # Write a temp file, then link() it into place: link fails if the name exists,
            # so the value appears complete or not at all, and only one creator wins. The
            # lock is taken on the temp file: the linked name is locked from its first instant.
            tmp = self._temp(parent, name, key, [data], durable and sync_data)
            held = None
            try:
                if lock:
                    fd = self._open_regular(parent, tmp, key)
                    held = _Lock(fd)
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else knows tmp
                os.link(tmp, name, src_dir_fd=parent, dst_dir_fd=parent, follow_symlinks=False)
            except BaseException as exc:
                if held is not None:
                    held.close()
                if isinstance(exc, FileExistsError):
                    return False, None
                raise
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=parent)
            if durable:
                os.fsync(parent)
            return True, held

    def commit_if(self, key: str, data: bytes, *, expect: str | None, durable: bool) -> str | None:
        with self._parent(key, create=True, durable=durable) as (parent, name):
            tmp = self._temp(parent, name, key, [data], durable)
            return self._replace(parent, tmp, name, key, durable=durable, expect=expect)

    _ANY = object()

    def _replace(self, parent: int, tmp: str, name: str, key: str, *, durable: bool,
                 expect: Any = _ANY) -> str | None:
        """Rename ``tmp`` over ``name``; unless ``expect`` is left out, only if the current
        version is ``expect`` (None: absent), checked under the folder's lock. Returns the
        new version."""
        try:
            with self._locked(parent) if expect is not self._ANY else contextlib.nullcontext():
                if expect is not self._ANY and self._version_at(parent, name) != expect:
                    raise conflict(self, key)
                os.replace(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=parent)
            raise
        if durable:
            os.fsync(parent)
        return self._version_at(parent, name)

    def hold_lock(self, key: str) -> Any:
        if os.environ.get("SAFEPOINT_OS_LOCKS", "1") == "0":
            return None
        with self._parent(key) as (parent, name):
            fd = self._open_regular(parent, name, key)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return _Lock(fd)

    def lock_free(self, key: str) -> bool | None:
        if os.environ.get("SAFEPOINT_OS_LOCKS", "1") == "0":
            return None
        try:
            with self.open_fd(key) as fd:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except OSError:
                    return False
                return True
        except FileNotFoundError:
            return None

    def touch(self, key: str) -> bool:
        with self._parent(key) as (parent, name):
            try:
                os.utime(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                return False
            return True

    # ------------------------------------------------------------- reading

    def read(self, key: str, *, limit: int | None = None) -> bytes:
        with self._parent(key) as (parent, name):
            fd = self._open_regular(parent, name, key)
        try:
            size = os.fstat(fd).st_size
            if limit is not None and size > limit:
                raise too_large(self._where(key), size, limit)
            parts = []
            while size > 0:
                chunk = os.read(fd, min(size, _MAX_WRITE))
                if not chunk:
                    break
                parts.append(chunk)
                size -= len(chunk)
            return b"".join(parts)
        finally:
            os.close(fd)

    def read_range(self, key: str, offset: int, out: memoryview) -> int:
        with self.open_fd(key) as fd:
            return pread_into(fd, offset, out)

    def read_into(self, key: str, out: memoryview) -> int:
        with self.open_fd(key) as fd:
            size = os.fstat(fd).st_size
            view = _view(out)
            pread_into(fd, 0, view[: min(size, view.nbytes)])
            return size

    def map(self, key: str) -> memoryview | None:
        with self.open_fd(key) as fd:
            if os.fstat(fd).st_size == 0:
                return memoryview(b"")
            return memoryview(mmap.mmap(fd, 0, access=mmap.ACCESS_READ))

    def stat(self, key: str) -> KeyInfo:
        if not key:
            st = os.stat(self.root)
            return KeyInfo(size=0, mtime=st.st_mtime, kind="dir")
        with self._parent(key) as (parent, name):
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except NotADirectoryError as exc:
                raise FileNotFoundError(errno.ENOENT, str(exc)) from None
        kind = _kind(st.st_mode)
        return KeyInfo(size=st.st_size if kind == "file" else 0, mtime=st.st_mtime, kind=kind,
                       version=f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}")

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def scan(self, prefix: str = "") -> list[Entry]:
        try:
            with self._folder(prefix) as fd, os.scandir(fd) as entries:
                found = [Entry(e.name, "link" if e.is_symlink() else "dir"
                               if e.is_dir(follow_symlinks=False) else "file"
                               if e.is_file(follow_symlinks=False) else "other")
                         for e in entries]
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(found, key=lambda e: e.name)

    # ------------------------------------------------------------- deleting

    def delete(self, key: str) -> None:
        if not key:
            with contextlib.suppress(FileNotFoundError), self._folder("") as fd:
                _clear(fd)
            return
        try:
            with self._parent(key) as (parent, name):
                _remove(parent, name)
        except (FileNotFoundError, NotADirectoryError):
            pass


    def remove_empty_folder(self, key: str) -> bool:
        try:
            with self._parent(key) as (parent, name):
                os.rmdir(name, dir_fd=parent)  # ENOTEMPTY if a file appeared: it stays
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True


class _Lock:
    """An OS lock held on an open file; released by :meth:`close` or by the process's end."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def pread_into(fd: int, offset: int, out: memoryview) -> int:
    """Fill ``out`` from ``fd`` at ``offset``; the bytes read (fewer only at the end)."""
    view = _view(out)
    done, total = 0, view.nbytes
    while done < total:
        got = os.preadv(fd, [view[done : done + _MAX_WRITE]], offset + done)
        if not got:
            break
        done += got
    return done


def _remove(parent: int, name: str) -> None:
    """Remove ``name`` in the folder ``parent``: a file or link is unlinked (a link never
    followed), a folder emptied and removed."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat_module.S_ISDIR(st.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=parent)
        return
    try:
        fd = os.open(name, _DIR, dir_fd=parent)
    except FileNotFoundError:
        return
    try:
        _clear(fd)
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=parent)
    except OSError as exc:  # a concurrent writer added a file: leave it for gc
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
            raise


def _clear(fd: int) -> None:
    # Manifests go first (the newest-step record before the others), so that a
    # half-deleted name never shows a manifest whose files are gone.
    with os.scandir(fd) as entries:
        names = [e.name for e in entries]
    first = sorted((n for n in names if n.endswith(".json")), key=lambda n: n != "latest.json")
    for name in [*first, *(n for n in names if not n.endswith(".json"))]:
        _remove(fd, name)


__all__ = ["LocalStore", "fsync_dir", "pread_into"]
