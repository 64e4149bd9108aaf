"""Reading a checkpoint: its state tree from the manifest, its blobs from byte ranges.

A restore is three phases, so that a caller's arrays change only when everything is sound:

1. **Walk** the tree (:class:`~safepoint.format.tree.Decoder`), validating every node and
   asking a :class:`FileSet` for the memory each large array will occupy: a view into the
   buffer of its data file (a pack holds many arrays), checked against the file's real
   size before anything is allocated. Arrays bound for a caller's live arrays are only
   noted.
2. **Load**: read each data file once (on several threads when large), then check the
   CRC-32C of every byte range used.
3. **Fill**: copy the verified bytes into the caller's arrays (``Loaded.fill``), after the
   caller has checked the rest of its live tree.
"""

from __future__ import annotations

import contextlib
import mmap as mmap_module
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import crc32c as _crc32c
import numpy as np

from safepoint import knobs
from safepoint.errors import CheckpointNotFound, CorruptCheckpoint, UnsafeCheckpoint
from safepoint.format.chunks import is_chunk_key
from safepoint.format.collector import collector_paused
from safepoint.format.copying import copy_into
from safepoint.format.manifest import BASE_VERSION, Manifest, read_manifest
from safepoint.format.plain import plain_copy
from safepoint.format.tree import Decoder
from safepoint.store import Store
from safepoint.store.base import KIND_TEXT

_POPULATE_BYTES = 1 << 20
_MAP_POPULATE = getattr(mmap_module, "MAP_POPULATE", None)
_VERIFY_CHUNK = 16 << 20
_FREE_GIL_BYTES = 32 << 10  # crc32c frees the GIL for buffers of this size or more


def read_buffer(size: int) -> np.ndarray:
    """A writable byte array to read a file into.

    Large buffers are anonymous maps with MAP_POPULATE (Linux): the kernel supplies every
    page in one call instead of one page fault at a time, and no transparent huge pages are
    requested. numpy's own large allocations ask for huge pages, and where the kernel
    compacts memory to find them (THP defrag "madvise", the common default) a load can stall
    for seconds per GiB at random. The array keeps its map alive.
    """
    if size < _POPULATE_BYTES or _MAP_POPULATE is None:
        return np.empty(size, np.uint8)
    region = mmap_module.mmap(
        -1, size, flags=mmap_module.MAP_PRIVATE | mmap_module.MAP_ANONYMOUS | _MAP_POPULATE)
    return np.frombuffer(region, np.uint8)


def _crc(data: Any, value: int = 0) -> str:
    return f"{_crc32c.crc32c(data, value) & 0xFFFFFFFF:08x}"


@dataclass
class _File:
    key: str
    size: int
    buffer: Any = None  # np.ndarray (private) or a read-only map, once chosen
    private: bool = False
    loaded: bool = False
    ranges: list[tuple[int, int, str, str]] = field(default_factory=list)  # to verify
    allocated: threading.Event | None = None  # set once a prefetch chose the buffer


class FileSet:
    """The blob bytes of one manifest (a :class:`~safepoint.format.tree.BlobSource`).

    ``mmap=True`` hands out read-only maps of the files (local stores) instead of reading
    them; checksums are still verified.
    """

    def __init__(self, store: Store, manifest: Manifest, *, mmap: bool = False) -> None:
        self.store, self.manifest = store, manifest
        self.mmap = mmap and store.supports_mmap
        self._blobs = manifest.blobs
        self._files: dict[int, _File] = {}
        self._verified: set[int] = set()
        self._wanted: list[int] = []  # blob indexes to verify at load()
        self._singles: list[tuple[int, _File, int, int, str]] = []  # arrays of one range, to verify
        self._multi: list[tuple[int, np.ndarray]] = []  # blobs of several ranges: own buffer
        self._fills: list[tuple[np.ndarray, int | None, bytes | None, str]] = []
        self._parts: list[_PartFill] = []  # parts of blobs (a restore onto another layout)
        self._maps: dict[str, np.ndarray] = {}  # read-only maps that serve parts (local stores)
        self._maps_lock = threading.Lock()
        self._prefetch: threading.Thread | None = None
        self._prefetch_error: BaseException | None = None

    def _where(self, key: str) -> str:
        return f"{self.store.url}/{key}"

    def _blob(self, index: int) -> dict[str, Any]:
        blobs = self._blobs
        if not 0 <= index < len(blobs):
            raise CorruptCheckpoint(f"{self.manifest.key}: a node refers to blob {index}, which "
                                    "the manifest does not have", path=self.manifest.key)
        return blobs[index]

    def _file(self, index: int) -> _File:
        found = self._files.get(index)
        if found is None:
            rel, size = self.manifest.files[index]
            key = f"{self.manifest.name}/{rel}"
            try:
                info = self.store.stat(key)
            except FileNotFoundError:
                raise self._missing(key) from None
            if info.kind != "file":
                raise CorruptCheckpoint(
                    f"{self._where(key)} is {KIND_TEXT[info.kind]}, not a data file; safepoint "
                    "never follows links or reads special files inside a store",
                    path=self._where(key))
            if info.size != size:
                raise CorruptCheckpoint(
                    f"{self._where(key)}: data file has {info.size} bytes, expected {size} "
                    "(truncated or replaced)", path=self._where(key), expected=str(size),
                    actual=str(info.size))
            found = self._files[index] = _File(key, size)
        return found

    def prefetch(self) -> None:
        """Read every data file into private memory on a thread of its own while the
        caller decodes the tree: an array node needs only its file's buffer, not the bytes
        in it, and taking fresh memory and reading free the GIL. For a manifest of many
        small arrays, whose nodes take as long to decode as their files take to read."""
        files = [self._file(i) for i in range(len(self.manifest.files))]
        for file in files:
            file.allocated = threading.Event()

        def read_all() -> None:
            try:
                for file in files:
                    try:
                        file.buffer, file.private = read_buffer(file.size), True
                    finally:
                        assert file.allocated is not None
                        file.allocated.set()
                    self._read_file(file)
            except BaseException as exc:  # raised by load(), in the caller
                self._prefetch_error = exc
                for file in files:
                    assert file.allocated is not None
                    file.allocated.set()

        self._prefetch = threading.Thread(target=read_all, name="safepoint-prefetch", daemon=True)
        self._prefetch.start()

    def _private(self, file: _File) -> np.ndarray:
        if file.buffer is None and file.allocated is not None:
            file.allocated.wait()
        if file.buffer is None:
            if self.mmap:
                file.buffer = self._map(file)
            else:
                file.buffer, file.private = read_buffer(file.size), True
        return file.buffer

    def _map(self, file: _File) -> np.ndarray:
        try:
            mapped = self.store.map(file.key)
        except FileNotFoundError:
            raise self._missing(file.key) from None
        view = np.frombuffer(mapped if mapped is not None else b"", np.uint8)
        if view.nbytes != file.size:
            raise CorruptCheckpoint(f"{self._where(file.key)}: data file changed while it was "
                                    "read", path=self._where(file.key))
        file.loaded = True
        return view

    # ------------------------------------------------ BlobSource

    def size(self, index: int) -> int:
        return int(self._blob(index)["size"])

    def array(self, index: int) -> np.ndarray:
        blob = self._blob(index)
        ranges = blob["ranges"]
        if len(ranges) == 1:
            fi, offset, length, expected, *_ = ranges[0]
            file = self._files.get(fi) or self._file(fi)
            buffer = file.buffer if file.buffer is not None else self._private(file)
            self._singles.append((index, file, offset, length, expected))
            return buffer[offset : offset + length]
        out = read_buffer(int(blob["size"]))
        for fi, *_ in ranges:
            self._file(fi)
        self._multi.append((index, out))
        return out

    def read(self, index: int) -> memoryview:
        data = self.array(index)
        self.load()
        return data.data

    def fill(self, target: np.ndarray, index: int | None, data: bytes | None, order: str) -> None:
        if index is not None:
            for fi, *_ in self._blob(index)["ranges"]:
                self._file(fi)
            self._wanted.append(index)
        self._fills.append((target, index, data, order))

    def fill_part(self, target: np.ndarray, index: int | None, data: bytes | None, first: int,
                  end: int, view: Callable[[np.ndarray], np.ndarray], *, own: bool) -> None:
        part = _PartFill(target, index, data, first, end, view, own)
        if index is not None:
            ranges, at = self._blob(index)["ranges"], 0
            for fi, offset, length, crc, *_ in ranges:  # only the ranges that hold first..end
                if at < end and first < at + length:
                    part.ranges.append((self._file(fi), offset, length, crc, at))
                at += length
            if at != self.size(index) or (end > first and not part.ranges):
                raise CorruptCheckpoint(f"{self.manifest.key}: the ranges of blob {index} do not "
                                        "add up to its size", path=self.manifest.key)
        self._parts.append(part)

    # ------------------------------------------------ loading

    def load(self) -> None:
        """Read what the walk asked for and verify every range of it."""
        if self._prefetch is not None:
            self._prefetch.join()
            self._prefetch = None
            if self._prefetch_error is not None:
                raise self._prefetch_error
        for index in self._wanted:
            for fi, *_ in self._blob(index)["ranges"]:
                file = self._files[fi]
                if file.buffer is None:  # wanted by a fill only: a map is enough
                    file.buffer = self._map(file) if self.store.supports_mmap else self._private(file)
        todo = [f for f in self._files.values() if f.buffer is not None and not f.loaded]
        total = sum(f.size for f in todo)
        if len(todo) > 1 and total >= knobs.PARALLEL_BYTES:
            with ThreadPoolExecutor(min(knobs.READ_THREADS, len(todo))) as pool:
                for future in [pool.submit(self._read_file, f) for f in todo]:
                    future.result()
        else:
            for file in todo:
                self._read_file(file)
        for index, out in self._multi:
            self._read_ranges(index, out)
        self._multi.clear()
        self.flush()
        checks, self._singles = self._singles, []
        for index in dict.fromkeys(self._wanted):
            if index not in self._verified:
                checks += [(index, self._files[fi], offset, length, expected)
                           for fi, offset, length, expected, *_ in self._blob(index)["ranges"]]
        self._wanted.clear()
        self._verify_ranges(checks)

    def _verify_ranges(self, checks: list[tuple[int, _File, int, int, str]]) -> None:
        """Check the checksum of every ``(blob, file, offset, length, expected)``: in one
        loop, or for a large load in a loop per thread over about equal shares of the bytes
        (crc32c releases the GIL, as the copies do)."""
        total = sum(check[3] for check in checks)
        threads = min(knobs.READ_THREADS, len(checks))
        # crc32c keeps the GIL for a range below 32 KiB: threads would only take turns
        if threads < 2 or total < knobs.PARALLEL_BYTES or total < len(checks) * _FREE_GIL_BYTES:
            self._verify_share(checks)
            return
        shares: list[list[tuple[int, _File, int, int, str]]] = [[] for _ in range(threads)]
        done = 0
        for check in checks:
            shares[min(threads - 1, done * threads // total)].append(check)
            done += check[3]
        with ThreadPoolExecutor(threads) as pool:
            for future in [pool.submit(self._verify_share, share) for share in shares]:
                future.result()

    def _verify_share(self, checks: list[tuple[int, _File, int, int, str]]) -> None:
        crc, verified = _crc32c.crc32c, self._verified
        for index, file, offset, length, expected in checks:
            data = file.buffer[offset : offset + length]
            if f"{crc(data) & 0xFFFFFFFF:08x}" != expected:
                self._check(file.key, data, expected, self._blob(index))
            verified.add(index)

    def flush(self) -> None:
        """Read (and verify) the parts asked for so far; fill those bound for the
        decoder's own arrays."""
        parts = [p for p in self._parts if p.ranges and p.buffer is None]
        if len(parts) > 1 and sum(p.end - p.first for p in parts) >= knobs.PARALLEL_BYTES:
            with ThreadPoolExecutor(knobs.READ_THREADS) as pool:
                for future in [pool.submit(self._read_part, p) for p in parts]:
                    future.result()
        else:
            for part in parts:
                self._read_part(part)
        for part in self._parts:
            if part.own:
                part.copy()
        self._parts = [p for p in self._parts if not p.own]

    def _missing(self, key: str) -> CorruptCheckpoint:
        return CorruptCheckpoint(
            f"{self._where(key)}: data file is missing (checkpoint step {self.manifest.step} is "
            "incomplete)", path=self._where(key), step=self.manifest.step)

    def _read_file(self, file: _File) -> None:
        try:
            got = self.store.read_range(file.key, 0, memoryview(file.buffer))
        except FileNotFoundError:
            raise self._missing(file.key) from None
        if got != file.size:
            raise CorruptCheckpoint(
                f"{self._where(file.key)}: data file has {got} bytes, expected {file.size} "
                "(truncated while it was read)", path=self._where(file.key))
        file.loaded = True

    def _read_ranges(self, index: int, out: np.ndarray) -> None:
        blob, at = self._blob(index), 0
        for fi, offset, length, expected, *_ in blob["ranges"]:
            file = self._files[fi]
            view = out[at : at + length]
            self._read_range(file, offset, view)
            self._check(file.key, view, expected, blob)
            at += length
        self._verified.add(index)

    def _read_range(self, file: _File, offset: int, view: np.ndarray) -> None:
        """Fill ``view`` from ``offset`` of ``file``; a short read is damage."""
        try:
            got = self.store.read_range(file.key, offset, view.data)
        except FileNotFoundError:
            raise self._missing(file.key) from None
        if got != view.nbytes:
            raise CorruptCheckpoint(f"{self._where(file.key)}: data file is shorter than "
                                    "its manifest says", path=self._where(file.key))

    def _read_part(self, part: _PartFill) -> None:
        """Check the ranges that hold ``part``, in a map of their file where the store can
        map and they lie end to end in one file (as a rank writes its shard), else read
        into a buffer of their own. A map costs no copy and no fresh memory: the target is
        filled straight from the page cache, once every range is verified."""
        base = part.ranges[0][4]
        size = part.ranges[-1][4] + part.ranges[-1][2] - base
        first, start = part.ranges[0][0], part.ranges[0][1]
        mapped = self.store.supports_mmap and all(
            file is first and offset == start + at - base for file, offset, _, _, at in part.ranges)
        buffer = self._mapped(first)[start : start + size] if mapped else read_buffer(size)
        for file, offset, length, expected, at in part.ranges:
            view = buffer[at - base : at - base + length]
            if not mapped:
                self._read_range(file, offset, view)
            elif view.nbytes != length:
                raise CorruptCheckpoint(f"{self._where(file.key)}: data file is shorter than "
                                        "its manifest says", path=self._where(file.key))
            assert part.index is not None
            self._check(file.key, view, expected, self._blob(part.index))
        part.buffer, part.base = buffer, base

    def _mapped(self, file: _File) -> np.ndarray:
        with self._maps_lock:  # parts are checked on several threads
            found = self._maps.get(file.key)
            if found is None:
                found = self._maps[file.key] = self._map(_File(file.key, file.size))
            return found

    def _check(self, key: str, data: Any, expected: str, blob: dict[str, Any]) -> None:
        actual = _crc(data)
        if actual != expected:
            where = self._where(key)
            leaf = f" (data of {blob['path']})" if isinstance(blob.get("path"), str) else ""
            raise CorruptCheckpoint(
                f"{where}: checksum mismatch{leaf} (expected {expected}, got {actual})",
                path=where, step=self.manifest.step, expected=expected, actual=actual)

    def blob_bytes(self, index: int) -> np.ndarray:
        """The verified bytes of blob ``index`` (after :meth:`load`)."""
        blob = self._blob(index)
        ranges = blob["ranges"]
        if len(ranges) == 1:
            fi, offset, length, *_ = ranges[0]
            return self._files[fi].buffer[offset : offset + length]
        out = read_buffer(int(blob["size"]))
        files = [self._files.get(fi) for fi, *_ in ranges]
        if index in self._verified and all(f is not None and f.buffer is not None for f in files):
            at = 0  # the ranges were read and verified by load(): gather them
            for file, (_, offset, length, *_) in zip(files, ranges, strict=True):
                assert file is not None
                out[at : at + length] = file.buffer[offset : offset + length]
                at += length
            return out
        self._read_ranges(index, out)
        return out

    def fill_targets(self) -> None:
        """Copy every noted blob into its caller's array (everything is verified by now)."""
        for target, index, data, order in self._fills:
            if not target.size:
                continue
            raw = self.blob_bytes(index) if index is not None else np.frombuffer(data or b"", np.uint8)
            if order == "F":
                saved = raw.view(target.dtype).reshape(target.shape[::-1]).T
            else:
                saved = raw.view(target.dtype).reshape(target.shape)
            copy_into(target, saved)
        self._fills.clear()
        for part in self._parts:
            part.copy()
        self._parts.clear()

    def release(self) -> None:
        """Drop maps that only served fills (arrays handed out keep their own buffers)."""
        for file in self._files.values():
            if not file.private and file.buffer is not None and not self.mmap:
                file.buffer = None
        self._maps.clear()


@dataclass
class _PartFill:
    """Bytes ``first..end`` of a blob (or of inline ``data``), bound for ``target``."""

    target: np.ndarray
    index: int | None
    data: bytes | None
    first: int
    end: int
    view: Callable[[np.ndarray], np.ndarray]
    own: bool
    ranges: list[tuple[_File, int, int, str, int]] = field(default_factory=list)
    buffer: np.ndarray | None = None  # the ranges' bytes, read and verified
    base: int = 0  # the blob offset of buffer[0]

    def copy(self) -> None:
        if self.index is None:
            raw = np.frombuffer(self.data or b"", np.uint8)[self.first : self.end]
        else:
            assert self.buffer is not None
            raw = self.buffer[self.first - self.base : self.end - self.base]
        if self.target.size:
            copy_into(self.target, self.view(raw))


@dataclass
class Loaded:
    """A state tree read back; :meth:`fill` copies into the caller's live arrays."""

    tree: Any
    source: FileSet

    def fill(self) -> None:
        self.source.fill_targets()
        self.source.release()


def load_tree(
    store: Store,
    manifest: Manifest,
    *,
    allow_pickle: bool = False,
    mmap: bool = False,
    target: Any = None,
    node: Any = None,
    share: bool = False,
    rank: tuple[int, int] | None = None,
) -> Loaded:
    """Read (part of) the state tree of a validated manifest, checking every blob's checksum.

    ``mmap=True`` maps blobs instead of reading them (read-only arrays, local stores only).
    ``target``: a tree whose numpy arrays receive the saved arrays at their places, in place,
    when :meth:`Loaded.fill` is called (shapes and dtypes must match). ``node``: a subtree of
    the manifest's tree to read instead of the whole (only its blobs are read).
    ``share=True``: the manifest was read for this load alone, so that the value may hold
    its plain subtrees rather than copies. ``rank``: (rank, world size) of a distributed
    restore, whose PerRank values are this rank's own.
    """
    pickled = manifest.body.get("pickled") or []
    if pickled and not allow_pickle and node is None:
        raise UnsafeCheckpoint(
            f"{store.url}/{manifest.key}: the checkpoint holds pickled values at "
            f"{', '.join(pickled[:5])}; loading them could run arbitrary code. Pass "
            "allow_pickle=True only if you trust where it came from",
            path=manifest.key, leaves=list(pickled))
    source = FileSet(store, manifest, mmap=mmap)
    try:
        if (node is None and target is None and not mmap and not manifest.plain_tree
                and manifest.body.get("version") == BASE_VERSION
                and len(manifest.blobs) >= knobs.PREFETCH_BLOBS):
            source.prefetch()
        with collector_paused():
            if node is None and target is None and manifest.plain_tree:  # the state as it is
                tree = manifest.body["tree"] if share else plain_copy(manifest.body["tree"])
            else:
                tree = Decoder(source, allow_pickle=allow_pickle, share=share, rank=rank).decode(
                    manifest.body["tree"] if node is None else node, target)
        source.load()
    except CorruptCheckpoint as exc:
        if exc.step is None:
            exc.step = manifest.step
        if not exc.path:
            exc.path = f"{store.url}/{manifest.key}"
        if not exc.message.startswith(store.url):
            exc.message = f"{store.url}/{manifest.key}: {exc.message}"
            exc.args = (exc.message,)
        raise
    return Loaded(tree, source)


@dataclass
class VerifyReport:
    """What :func:`verify_checkpoint` found."""

    name: str
    step: int | None
    checked_bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_tree(manifest: Manifest, store: Store) -> None:
    """Validate every node of a manifest's tree without reading a blob (what ``show`` and
    ``ls`` rely on); raises :class:`CorruptCheckpoint`."""
    try:
        Decoder(_SizesOnly(manifest), build=False).decode(manifest.body["tree"])
    except CorruptCheckpoint as exc:
        exc.step = manifest.step
        if not exc.message.startswith(store.url):
            exc.message = f"{store.url}/{manifest.key}: {exc.message}"
            exc.args = (exc.message,)
        raise


class _SizesOnly:
    """A blob source that knows sizes only (the tree walk of verify and show)."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest

    def size(self, index: int) -> int:
        blobs = self.manifest.blobs
        if not 0 <= index < len(blobs):
            raise CorruptCheckpoint(f"a node refers to blob {index}, which the manifest does not have")
        return int(blobs[index]["size"])

    def array(self, index: int) -> np.ndarray:
        raise AssertionError("validation reads no blob")

    def read(self, index: int) -> memoryview:
        raise AssertionError("validation reads no blob")

    def fill(self, target: np.ndarray, index: int | None, data: bytes | None, order: str) -> None:
        raise AssertionError("validation fills nothing")

    def flush(self) -> None:
        raise AssertionError("validation fills nothing")

    def fill_part(self, target: np.ndarray, index: int | None, data: bytes | None, first: int,
                  end: int, view: Callable[[np.ndarray], np.ndarray], *, own: bool) -> None:
        raise AssertionError("validation fills nothing")


def verify_checkpoint(
    store: Store, name: str, step: int, *, on_bytes: Callable[[int], None] | None = None,
    verified: set[tuple[str, int, int, str]] | None = None,
) -> VerifyReport:
    """Check the manifest, the tree and every byte range of one step; never raises for damage.

    It refuses exactly what a restore refuses: the same validation of the manifest and its
    tree, the same size and checksum of every range (read in bounded chunks).
    ``verified``: ranges of chunk files (never rewritten) found intact earlier in the same
    check, not read again; the intact ones found here are added (a whole-store check reads
    a chunk shared by many steps once).
    """
    report = VerifyReport(name, step)
    try:
        manifest = read_manifest(store, name, step)
        check_tree(manifest, store)
    except (CorruptCheckpoint, CheckpointNotFound) as exc:
        report.problems.append(str(exc))
        return report
    source = FileSet(store, manifest)
    for fi in range(len(manifest.files)):
        try:
            source._file(fi)
        except CorruptCheckpoint as exc:
            report.problems.append(str(exc))
    if report.problems:
        return report
    buffer = np.empty(min(_VERIFY_CHUNK, max((s for _, s in manifest.files), default=0)), np.uint8)
    for index, blob in enumerate(manifest.blobs):
        for fi, offset, length, expected, *_ in blob["ranges"]:
            try:
                file = source._file(fi)
                seen = (file.key, offset, length, expected)
                if verified is not None and seen in verified:
                    report.checked_bytes += length
                    continue
                value, at = 0, 0
                while at < length:
                    view = buffer.data[: min(len(buffer), length - at)]
                    try:
                        got = store.read_range(file.key, offset + at, view)
                    except FileNotFoundError:
                        raise source._missing(file.key) from None
                    if got != len(view):
                        raise CorruptCheckpoint(f"{store.url}/{file.key}: data file is shorter "
                                                "than its manifest says", path=file.key)
                    value = _crc32c.crc32c(view, value)
                    at += got
                    if on_bytes:
                        on_bytes(got)
                actual = f"{value & 0xFFFFFFFF:08x}"
                if actual != expected:
                    raise CorruptCheckpoint(
                        f"{store.url}/{file.key}: checksum mismatch (data of {blob.get('path')}, "
                        f"blob {index}; expected {expected}, got {actual})", path=file.key,
                        expected=expected, actual=actual)
            except CorruptCheckpoint as exc:
                report.problems.append(str(exc))
                break
            report.checked_bytes += length
            if verified is not None and is_chunk_key(manifest.files[fi][0]):
                verified.add(seen)
    with contextlib.suppress(Exception):
        source.release()
    return report


__all__ = ["FileSet", "Loaded", "VerifyReport", "check_tree", "load_tree", "read_buffer",
           "verify_checkpoint"]
