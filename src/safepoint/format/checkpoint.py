"""One checkpoint in a store: blobs plus a checksummed JSON manifest, committed last.

The manifest file is itself valid JSON, readable with ``jq`` or ``json.load``::

    {"crc32c":"1a2b3c4d","manifest":{"format":"safepoint","version":1,...}}

The checksum covers the exact bytes of the ``"manifest"`` value as they appear in the file,
so any change to them (a flipped bit, a truncation) is detected before anything is parsed.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import crc32c as _crc32c
import numpy as np

from safepoint.errors import CheckpointNotFound, CorruptCheckpoint, SaveFailed
from safepoint.format.tree import Decoder, Encoder, decode_dtype
from safepoint.store import Store

FORMAT = "safepoint"
VERSION = 1
MANIFEST = "manifest.json"
_PREFIX = b'{"crc32c":"'
_MIDDLE = b'","manifest":'
_SUFFIX = b"}\n"
_PARALLEL_BYTES = 32 << 20  # write blobs on several threads above this total size
_WRITE_THREADS = 4


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
    snapshot: Callable[[str, np.ndarray], np.ndarray] | None = None,
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
        return self.body.get("metadata") or {}

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
    text = json.dumps(body, ensure_ascii=True, separators=(",", ":"), allow_nan=True).encode("ascii")
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
    if int(body.get("version", 0)) > VERSION:
        raise CorruptCheckpoint(
            f"{key}: written by a newer safepoint (format version {body['version']}, this "
            f"one reads up to {VERSION}); upgrade safepoint to read it", path=key)
    return body


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
) -> Manifest:
    """Write blobs, then commit the manifest (steps 1 and 2 of the store's protocol).

    ``before_commit`` runs after every blob is durable and before the manifest is written;
    raising there (a fencing check) leaves nothing visible.
    """
    try:
        meta_json = json.loads(json.dumps(metadata or {}, allow_nan=True))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"metadata must be JSON-serializable (str keys, plain values): {exc}") from exc
    save_id = uuid.uuid4().hex[:12]
    entries: list[dict[str, Any]] = [{}] * len(prepared.blobs)

    def write_one(index: int) -> None:
        blob = prepared.blobs[index]
        key = f"{folder}/{save_id}-{index}.bin"
        digest = checksum(blob.data)
        store.write_blob(key, [blob.data], durable=durable)
        entries[index] = {"file": key.rsplit("/", 1)[1], "size": blob.data.nbytes,
                          "crc32c": digest, "path": blob.tree_path}

    try:
        if prepared.nbytes >= _PARALLEL_BYTES and len(prepared.blobs) > 1:
            with ThreadPoolExecutor(min(_WRITE_THREADS, len(prepared.blobs))) as pool:
                list(pool.map(write_one, range(len(prepared.blobs))))
        else:
            for index in range(len(prepared.blobs)):
                write_one(index)
        body = {
            "format": FORMAT,
            "version": VERSION,
            "name": name,
            "step": step,
            "created": time.time(),
            "save_id": save_id,
            "metadata": meta_json,
            **(extra or {}),
            "pickled": prepared.pickled,
            "blobs": entries,
            "tree": prepared.node,
        }
        data = encode_manifest(body)
        if before_commit is not None:
            before_commit()
        store.commit(f"{folder}/{MANIFEST}", data, durable=durable)
    except OSError as exc:
        raise SaveFailed(
            f"could not save {name!r} step {step} to {store.url}: {exc}; the previous "
            "checkpoints are untouched", name=name, step=step) from exc
    return Manifest(key=f"{folder}/{MANIFEST}", body=body, size=len(data))


def read_manifest(store: Store, folder: str) -> Manifest:
    """The verified manifest of the checkpoint in ``folder``."""
    key = f"{folder}/{MANIFEST}"
    try:
        data = store.read(key)
    except FileNotFoundError as exc:
        raise CheckpointNotFound(f"no committed checkpoint at {store.url}/{folder}") from exc
    return Manifest(key=key, body=decode_manifest(data, f"{store.url}/{key}"), size=len(data))


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
        try:
            if into is None and mmap and store.supports_mmap:
                data: memoryview | np.ndarray = store.map(key) or memoryview(b"")
                actual_size = data.nbytes
            else:
                data = into if into is not None and into.nbytes == size else memoryview(np.empty(size, np.uint8))
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
        from safepoint.errors import UnsafeCheckpoint

        raise UnsafeCheckpoint(
            f"{store.url}/{manifest.key}: the checkpoint holds pickled values at "
            f"{', '.join(manifest.body['pickled'][:5])}; loading them could run arbitrary code. "
            "Pass allow_pickle=True only if you trust where it came from",
            path=manifest.key, leaves=list(manifest.body["pickled"]))
    decoder = Decoder(_blob_loader(store, manifest, mmap=mmap), allow_pickle=allow_pickle)
    try:
        return decoder.decode(manifest.body["tree"], target)
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


def iter_tree_summary(node: Any, path: str = "state") -> Iterator[tuple[str, str, str, str, int]]:
    """(path, type, dtype, shape, bytes) for each leaf of a node, without reading blobs."""
    if isinstance(node, list):
        if not node:
            yield path, "list", "", "0 items", 0
        for i, v in enumerate(node):
            yield from iter_tree_summary(v, f"{path}[{i}]")
        return
    if not isinstance(node, dict):
        value = repr(node)
        yield path, type(node).__name__, "", value if len(value) <= 40 else value[:37] + "...", 0
        return
    tag = node.get("$")
    if tag is None:
        if not node:
            yield path, "dict", "", "0 items", 0
        for k, v in node.items():
            yield from iter_tree_summary(v, f"{path}[{k!r}]")
    elif tag == "tuple":
        for i, v in enumerate(node["items"]):
            yield from iter_tree_summary(v, f"{path}[{i}]")
    elif tag in ("dict", "odict"):
        for k, v in node["items"]:
            yield from iter_tree_summary(v, f"{path}[{k!r}]")
    elif tag == "ndarray":
        dtype = decode_dtype(node["dtype"]) if not isinstance(node["dtype"], dict) else node["dtype"]
        dname = str(getattr(dtype, "name", dtype))
        shape = tuple(node["shape"])
        itemsize = getattr(dtype, "itemsize", 0)
        yield path, "ndarray", dname, str(shape), int(np.prod(shape, dtype=np.int64)) * itemsize
    elif tag == "leaf":
        inner = node["array"]
        shape = tuple(inner["shape"])
        dname = node.get("attrs", {}).get("dtype") or str(inner["dtype"])
        yield path, node["kind"], str(dname), str(shape), 0
    elif tag in ("bytes", "bytearray", "pickle"):
        yield path, node.get("type", tag), "", "", 0
    else:
        yield path, tag, str(node.get("dtype", "")), "", 0
