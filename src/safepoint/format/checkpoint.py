"""One checkpoint in a store: blobs plus a checksummed JSON manifest, committed last.

The manifest file is itself strict JSON, readable with ``jq`` or ``json.load``::

    {"crc32c":"1a2b3c4d","manifest":{"format":"safepoint","version":1,...}}

The checksum covers the exact bytes of the ``"manifest"`` value as they appear in the file,
so any change to them (a flipped bit, a truncation) is detected before anything is parsed.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import mmap as mmap_module
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import crc32c as _crc32c
import numpy as np

from safepoint.errors import (
    CheckpointNotFound,
    CorruptCheckpoint,
    InvalidName,
    SaveFailed,
    UnsafeCheckpoint,
    UnsupportedType,
)
from safepoint.format.tree import Decoder, Encoder, decode_dtype, no_blobs
from safepoint.store import Store, check_name

FORMAT = "safepoint"
VERSION = 1
MANIFEST = "manifest.json"
_PREFIX = b'{"crc32c":"'
_MIDDLE = b'","manifest":'
_SUFFIX = b"}\n"
_PARALLEL_BYTES = 32 << 20  # write blobs on several threads above this total size
_WRITE_THREADS = 4
_BODY_KEYS = {"format", "version", "name", "step", "created", "save_id", "metadata", "pickled",
              "blobs", "tree"}
_ERRNO_HINTS = {
    errno.ENOSPC: "the disk is full (no space left on device); free some space and save again",
    errno.EDQUOT: "the disk quota is exceeded; free some space and save again",
    errno.EFBIG: "a file is larger than this file system allows",
    errno.EACCES: "permission denied; check that this process may write to the store",
    errno.EPERM: "operation not permitted; check that this process may write to the store",
    errno.EROFS: "the file system is read-only",
}


def checksum(data: bytes | memoryview | np.ndarray) -> str:
    """crc32c of ``data`` as 8 hex digits (hardware-accelerated where the CPU has it)."""
    return f"{_crc32c.crc32c(data) & 0xFFFFFFFF:08x}"


def step_key(name: str, step: int) -> str:
    """The folder of one step: zero-padded so that listings sort."""
    return f"{name}/{step:012d}"


@dataclass
class Prepared:
    """A state tree encoded and ready to write: nothing of the caller's is needed after this
    except the memory the blobs point at (the live arrays, or snapshot buffers)."""

    node: Any
    blobs: list[Any]
    pickled: list[str]

    @property
    def nbytes(self) -> int:
        return sum(b.data.nbytes for b in self.blobs)


def prepare(
    tree: Any,
    *,
    allow_pickle: bool = False,
    snapshot: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> Prepared:
    """Encode ``tree``; raise ``UnsupportedType`` naming the path of a value it cannot store."""
    encoder = Encoder(allow_pickle=allow_pickle, snapshot=snapshot)
    node = encoder.encode(tree)
    return Prepared(node=node, blobs=encoder.blobs, pickled=encoder.pickled)


@dataclass
class Manifest:
    """A parsed, checksum-verified manifest."""

    key: str  # the manifest's key in the store
    body: dict[str, Any]
    size: int = 0

    @property
    def step(self) -> int:
        return int(self.body["step"])

    @property
    def metadata(self) -> dict[str, Any]:
        return _untag_floats(self.body.get("metadata") or {})

    @property
    def folder(self) -> str:
        return self.key.rsplit("/", 1)[0]

    @property
    def blobs(self) -> list[dict[str, Any]]:
        return self.body.get("blobs", [])

    @property
    def nbytes(self) -> int:
        return self.size + sum(int(b["size"]) for b in self.blobs)

    @property
    def created(self) -> float:
        return float(self.body.get("created", 0.0))


def encode_manifest(body: dict[str, Any]) -> bytes:
    text = json.dumps(body, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode("ascii")
    return _PREFIX + checksum(text).encode("ascii") + _MIDDLE + text + _SUFFIX


def decode_manifest(data: bytes, key: str) -> dict[str, Any]:
    head = len(_PREFIX) + 8 + len(_MIDDLE)
    if (
        len(data) < head + len(_SUFFIX)
        or not data.startswith(_PREFIX)
        or data[len(_PREFIX) + 8 : head] != _MIDDLE
        or not data.endswith(_SUFFIX)
    ):
        raise CorruptCheckpoint(
            f"{key}: not a complete safepoint manifest (truncated or damaged)", path=key)
    expected = data[len(_PREFIX) : len(_PREFIX) + 8].decode("ascii", "replace")
    text = data[head : -len(_SUFFIX)]
    actual = checksum(text)
    if actual != expected:
        raise CorruptCheckpoint(
            f"{key}: manifest checksum mismatch (expected {expected}, got {actual})",
            path=key, expected=expected, actual=actual)
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise CorruptCheckpoint(f"{key}: manifest is not valid JSON: {exc}", path=key) from exc
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CorruptCheckpoint(f"{key}: not a safepoint manifest", path=key)
    version = body.get("version")
    if type(version) is int and version > VERSION:
        raise CorruptCheckpoint(
            f"{key}: written by a newer safepoint (format version {version}, this "
            f"one reads up to {VERSION}); upgrade safepoint to read it", path=key)
    problem = _schema_problem(body)
    if problem:
        raise CorruptCheckpoint(f"{key}: malformed manifest: {problem}", path=key)
    return body


def _schema_problem(body: dict[str, Any]) -> str | None:
    """What is wrong with the fields every reader relies on, or None."""
    if type(body.get("version")) is not int or body["version"] < 1:
        return "no valid format version"
    if type(body.get("step")) is not int or body["step"] < 0:
        return "no valid step"
    if "tree" not in body:
        return "no tree"
    if not isinstance(body.get("metadata", {}), dict):
        return "metadata is not an object"
    pickled = body.get("pickled", [])
    if not isinstance(pickled, list) or not all(isinstance(p, str) for p in pickled):
        return "bad list of pickled leaves"
    blobs = body.get("blobs", [])
    if not isinstance(blobs, list):
        return "the blob table is not a list"
    for index, entry in enumerate(blobs):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("file"), str)
            and type(entry.get("size")) is int
            and entry["size"] >= 0
            and isinstance(entry.get("crc32c"), str)
        ):
            return f"bad blob entry {index}"
        try:
            check_name(entry["file"], "blob file")
        except InvalidName:
            return f"blob entry {index} names the file {entry['file']!r}, outside its folder"
    return None


def write_checkpoint(
    store: Store,
    folder: str,
    prepared: Prepared,
    *,
    name: str,
    step: int,
    metadata: dict[str, Any] | None,
    durable: bool = True,
    extra: dict[str, Any] | None = None,
    before_commit: Callable[[], None] | None = None,
    replaces: bool = True,
) -> Manifest:
    """Write blobs, then commit the manifest (steps 1 and 2 of the store's protocol).

    ``before_commit`` runs after every blob is durable and before the manifest is written;
    raising there (a fencing check) leaves nothing visible. On any failure the blobs of this
    save are removed again (best effort) and a manifest it may have published is rolled
    back, so readers see the checkpoint as it was before; an ``OSError`` is raised as
    :class:`SaveFailed` with what happened and what to do. ``replaces=False`` says that
    ``folder`` holds no committed manifest (a new step): the previous manifest, kept for
    that rollback, is then not read, which saves a read per save (a GET on object stores).
    """
    meta_json = json_copy(metadata, "metadata")
    extra_json = json_copy(extra, "extra")
    clash = sorted(set(extra_json) & _BODY_KEYS)
    if clash:
        raise ValueError(f"extra may not set the manifest's own keys {clash}")
    save_id = uuid.uuid4().hex[:12]
    manifest_key = f"{folder}/{MANIFEST}"
    entries: list[dict[str, Any]] = [{}] * len(prepared.blobs)
    written: list[str] = []  # blob keys this save created (or began to)
    published = False  # whether our manifest may be visible

    def write_one(index: int) -> None:
        blob = prepared.blobs[index]
        key = f"{folder}/{save_id}-{index}.bin"
        digest = checksum(blob.data)
        written.append(key)
        store.write_blob(key, [blob.data], durable=durable)
        entries[index] = {"file": key.rsplit("/", 1)[1], "size": blob.data.nbytes,
                          "crc32c": digest, "path": blob.tree_path}

    try:
        _write_blobs(write_one, len(prepared.blobs), parallel=prepared.nbytes >= _PARALLEL_BYTES)
        body = {
            "format": FORMAT,
            "version": VERSION,
            "name": name,
            "step": step,
            "created": time.time(),
            "save_id": save_id,
            "metadata": meta_json,
            **extra_json,
            "pickled": prepared.pickled,
            "blobs": entries,
            "tree": prepared.node,
        }
        data = encode_manifest(body)
        if before_commit is not None:
            before_commit()
        previous = _read_if_exists(store, manifest_key) if replaces else None
        published = True
        store.commit(manifest_key, data, durable=durable)
    except BaseException as exc:
        if published:
            published = _roll_back(store, manifest_key, data, previous, durable=durable)
        if not published:
            for key in written:
                with contextlib.suppress(OSError):
                    store.delete(key)
        if isinstance(exc, OSError):
            raise SaveFailed(
                f"could not save {name!r} step {step} to {store.url}: {describe_os_error(exc)}. "
                + ("The step was committed but may not be durable." if published else
                   "The previous checkpoints are untouched."),
                name=name, step=step, errno=exc.errno) from exc
        raise
    return Manifest(key=manifest_key, body=body, size=len(data))


def describe_os_error(exc: OSError) -> str:
    """``exc`` with a plain-words cause in front where the errno has a common one."""
    hint = _ERRNO_HINTS.get(exc.errno) if exc.errno is not None else None
    return f"{hint} ({exc})" if hint else str(exc)


def json_copy(value: dict[str, Any] | None, what: str = "metadata") -> dict[str, Any]:
    """A plain-JSON copy of the dict ``value`` (numpy scalars become numbers; non-finite
    floats are tagged as in the tree, so that the manifest stays strict JSON and
    :attr:`Manifest.metadata` gives them back). ``TypeError`` names ``what`` otherwise."""
    def default(item: Any) -> Any:
        if isinstance(item, np.generic) or (isinstance(item, np.ndarray) and item.ndim == 0):
            return item.item()  # np.float32(0.1) and the like, common in metrics
        raise TypeError(f"{type(item).__name__} is not JSON-serializable")

    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be a dict, not {type(value).__name__}")
    try:
        return _tag_floats(json.loads(json.dumps(value, allow_nan=True, default=default)))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be JSON-serializable (str keys, plain values): {exc}") from exc


def _tag_floats(value: Any) -> Any:
    if isinstance(value, float) and value - value != 0.0:  # nan, inf, -inf
        return Encoder().encode(value)
    if isinstance(value, list):
        return [_tag_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: _tag_floats(v) for k, v in value.items()}
    return value


def _untag_floats(value: Any) -> Any:
    if isinstance(value, list):
        return [_untag_floats(v) for v in value]
    if isinstance(value, dict):
        if value.get("$") == "float" and isinstance(value.get("bits"), str):
            return Decoder(no_blobs).decode(value)
        return {k: _untag_floats(v) for k, v in value.items()}
    return value


def _write_blobs(write_one: Callable[[int], None], count: int, *, parallel: bool) -> None:
    if not parallel or count < 2:
        for index in range(count):
            write_one(index)
        return
    with ThreadPoolExecutor(min(_WRITE_THREADS, count)) as pool:
        futures = [pool.submit(write_one, index) for index in range(count)]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:  # the ones not started yet; the pool waits for the rest
                future.cancel()
            raise


def _read_if_exists(store: Store, key: str) -> bytes | None:
    try:
        return store.read(key)
    except FileNotFoundError:
        return None


def _roll_back(store: Store, key: str, ours: bytes, previous: bytes | None, *, durable: bool) -> bool:
    """Undo a commit that failed late (e.g. the directory fsync after the rename): if our
    manifest is visible, put back what was there. Returns whether ours is still visible."""
    with contextlib.suppress(OSError):
        if _read_if_exists(store, key) == ours:
            if previous is None:
                store.delete(key)
            else:
                store.commit(key, previous, durable=durable)
    try:
        return _read_if_exists(store, key) == ours
    except OSError:
        return True  # cannot tell: keep its blobs


def read_manifest(store: Store, folder: str) -> Manifest:
    """The verified manifest of the checkpoint in ``folder``."""
    key = f"{folder}/{MANIFEST}"
    try:
        data = store.read(key)
    except FileNotFoundError as exc:
        raise CheckpointNotFound(f"no committed checkpoint at {store.url}/{folder}") from exc
    return Manifest(key=key, body=decode_manifest(data, f"{store.url}/{key}"), size=len(data))


_POPULATE_BYTES = 1 << 20
_MAP_POPULATE = getattr(mmap_module, "MAP_POPULATE", None)


_READ_THREADS = 2


def _prefetch_pays(manifest: Manifest) -> bool:
    try:
        total = sum(int(b["size"]) for b in manifest.blobs)
    except (KeyError, TypeError, ValueError):
        return False  # malformed: the sequential loader reports it
    return len(manifest.blobs) > 1 and total >= _PARALLEL_BYTES


def read_buffer(size: int) -> np.ndarray:
    """A writable byte array to read a blob into.

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


def _blob_loader(
    store: Store, manifest: Manifest, *, mmap: bool
) -> Callable[[int, memoryview | None], memoryview | np.ndarray]:
    def load(index: int, into: memoryview | None) -> memoryview | np.ndarray:
        try:
            entry = manifest.blobs[index]
            key = f"{manifest.folder}/{entry['file']}"
            size, expected = int(entry["size"]), entry["crc32c"]
        except (IndexError, KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpoint(f"{manifest.key}: bad blob entry {index}", path=manifest.key) from exc
        where = f"{store.url}/{key}"
        fill = into is not None and into.nbytes == size
        # A caller's array is filled from a verified map where the store can map, so
        # damaged bytes never land in it (and a map, checksum and copy is no slower).
        mapped = store.supports_mmap and (mmap or fill)
        try:
            if mapped:
                data: memoryview | np.ndarray = store.map(key) or memoryview(b"")
                actual_size = data.nbytes
            else:
                data = into if fill and into is not None else memoryview(read_buffer(size))
                actual_size = store.read_into(key, data)
        except FileNotFoundError as exc:
            raise CorruptCheckpoint(
                f"{where}: blob is missing (checkpoint step {manifest.step} is incomplete)",
                path=where, step=manifest.step) from exc
        if actual_size != size:
            raise CorruptCheckpoint(
                f"{where}: blob has {actual_size} bytes, expected {size} (truncated or replaced)",
                path=where, step=manifest.step, expected=str(size), actual=str(actual_size))
        actual = checksum(data)
        if actual != expected:
            raise CorruptCheckpoint(
                f"{where}: checksum mismatch (expected {expected}, got {actual})",
                path=where, step=manifest.step, expected=expected, actual=actual)
        if mapped and fill and into is not None:
            into[:] = data
            if isinstance(data, memoryview):
                data.release()  # unmap now rather than at garbage collection
            return into
        return data

    return load


def load_tree(
    store: Store,
    manifest: Manifest,
    *,
    allow_pickle: bool = False,
    mmap: bool = False,
    target: Any = None,
) -> Any:
    """Read the state tree of a verified manifest, checking every blob's checksum.

    ``mmap=True`` maps blobs instead of reading them (read-only arrays, local stores only).
    ``target``: a tree whose numpy arrays of matching dtype and shape are filled in place.
    """
    if manifest.body.get("pickled") and not allow_pickle:
        raise UnsafeCheckpoint(
            f"{store.url}/{manifest.key}: the checkpoint holds pickled values at "
            f"{', '.join(manifest.body['pickled'][:5])}; loading them could run arbitrary code. "
            "Pass allow_pickle=True only if you trust where it came from",
            path=manifest.key, leaves=list(manifest.body["pickled"]))
    load = _blob_loader(store, manifest, mmap=mmap)
    try:
        with contextlib.ExitStack() as stack:
            if target is None and not mmap and _prefetch_pays(manifest):
                # Read blobs on several threads ahead of the decoder (reads and checksums
                # release the GIL). Only when every blob gets a new buffer: with a target,
                # the decoder decides which blob is read into which live array.
                pool = stack.enter_context(ThreadPoolExecutor(_READ_THREADS))
                futures = [pool.submit(load, i, None) for i in range(len(manifest.blobs))]

                def load_prefetched(index: int, into: memoryview | None) -> memoryview | np.ndarray:
                    if isinstance(index, int) and 0 <= index < len(futures):
                        return futures[index].result()
                    return load(index, into)  # a bad index: the loader reports it

                return Decoder(load_prefetched, allow_pickle=allow_pickle).decode(manifest.body["tree"])
            return Decoder(load, allow_pickle=allow_pickle).decode(manifest.body["tree"], target)
    except CorruptCheckpoint as exc:
        if exc.step is None:
            exc.step = manifest.step
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpoint(
            f"{store.url}/{manifest.key}: malformed tree in manifest ({exc!r})",
            path=manifest.key, step=manifest.step) from exc


@dataclass
class VerifyReport:
    """What :func:`verify_checkpoint` found."""

    folder: str
    checked_bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_checkpoint(
    store: Store, folder: str, *, on_bytes: Callable[[int], None] | None = None
) -> VerifyReport:
    """Check the manifest and every blob of one checkpoint; never raises for corruption."""
    report = VerifyReport(folder)
    try:
        manifest = read_manifest(store, folder)
    except (CorruptCheckpoint, CheckpointNotFound) as exc:
        report.problems.append(str(exc))
        return report
    load = _blob_loader(store, manifest, mmap=store.supports_mmap)
    for index, entry in enumerate(manifest.blobs):
        try:
            load(index, None)
        except CorruptCheckpoint as exc:
            report.problems.append(str(exc))
        size = int(entry.get("size", 0))
        report.checked_bytes += size
        if on_bytes:
            on_bytes(size)
    try:
        for _ in iter_tree_summary(manifest.body["tree"]):
            pass
    except (KeyError, TypeError, ValueError, CorruptCheckpoint) as exc:
        report.problems.append(f"{manifest.key}: malformed tree ({exc!r})")
    return report


def iter_tree_summary(
    node: Any, path: str = "state", *, blobs: list[dict[str, Any]] | None = None
) -> Iterator[tuple[str, str, str, str, int]]:
    """(path, type, dtype, shape or value, bytes) for each leaf of a node, without reading
    blobs. ``blobs`` (the manifest's blob table) gives the sizes of blob-backed bytes."""
    if isinstance(node, list):
        if not node:
            yield path, "list", "", "0 items", 0
        for i, v in enumerate(node):
            yield from iter_tree_summary(v, f"{path}[{i}]", blobs=blobs)
        return
    if not isinstance(node, dict):
        yield path, type(node).__name__, "", _short(repr(node)), 0
        return
    tag = node.get("$")
    if tag is None:
        if not node:
            yield path, "dict", "", "0 items", 0
        for k, v in node.items():
            yield from iter_tree_summary(v, f"{path}[{k!r}]", blobs=blobs)
    elif tag == "tuple":
        if not node["items"]:
            yield path, "tuple", "", "0 items", 0
        for i, v in enumerate(node["items"]):
            yield from iter_tree_summary(v, f"{path}[{i}]", blobs=blobs)
    elif tag in ("dict", "odict"):
        if not node["items"]:
            yield path, "dict", "", "0 items", 0
        for k, v in node["items"]:
            yield from iter_tree_summary(v, f"{path}[{_short(repr(k))}]", blobs=blobs)
    elif tag == "ndarray":
        label, itemsize = _dtype_label(node["dtype"])
        shape = tuple(node["shape"])
        yield path, "ndarray", label, str(shape), int(np.prod(shape, dtype=np.int64)) * itemsize
    elif tag == "npscalar":
        label, itemsize = _dtype_label(node["dtype"])
        yield path, "numpy scalar", label, "()", itemsize
    elif tag == "leaf":
        inner = node["array"]
        shape = tuple(inner["shape"])
        label, itemsize = _dtype_label(inner["dtype"])
        dname = str((node.get("attrs") or {}).get("dtype") or label)
        yield path, node["kind"], dname, str(shape), int(np.prod(shape, dtype=np.int64)) * itemsize
    elif tag in ("bytes", "bytearray", "pickle"):
        yield path, node.get("type", tag), "", "", _data_size(node, blobs)
    elif tag in ("int", "float", "complex"):
        value = Decoder(no_blobs).decode(node)
        yield path, tag, "", _short(repr(value)), 0
    else:
        yield path, str(tag), "", "", 0


def _short(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."


def _dtype_label(spec: Any) -> tuple[str, int]:
    """A readable name for a stored dtype (with its byte order where not native)."""
    if isinstance(spec, dict) and "ml_dtypes" in spec:
        try:
            dtype = decode_dtype(spec)
        except UnsupportedType:  # ml_dtypes not installed: the name is all we can show
            return str(spec["ml_dtypes"]), 0
    else:
        dtype = decode_dtype(spec)
    if dtype.fields is not None or dtype.kind in "USV":
        return str(dtype), dtype.itemsize  # '<U5', '|S3', "[('x', '<f4'), ...]"
    label = dtype.name
    if dtype.byteorder in "<>":  # numpy writes the native order as "="
        label += " (big-endian)" if dtype.byteorder == ">" else " (little-endian)"
    return label, dtype.itemsize


def _data_size(node: dict[str, Any], blobs: list[dict[str, Any]] | None) -> int:
    if "b64" in node:
        return len(base64.b64decode(node["b64"]))
    if blobs is not None and 0 <= int(node["blob"]) < len(blobs):
        return int(blobs[int(node["blob"])]["size"])
    return 0
