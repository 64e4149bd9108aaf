"""The manifest: one checkpoint's JSON description, checksummed, versioned, validated.

The manifest file is itself strict JSON, readable with ``jq`` or ``json.load``::

    {"crc32c":"1a2b3c4d","manifest":{"format":"safepoint","version":2,...}}

The checksum covers the exact bytes of the ``"manifest"`` value as they appear in the file,
so any change to them (a flipped bit, a truncation) is detected before anything is parsed.
Then :func:`check_body` checks every field a reader relies on, against limits and against
each other, before anything is allocated: the one model of large leaves is *byte ranges*
(``blobs``) in *data files* (``files``), each range with its own CRC-32C.
"""

from __future__ import annotations

import errno
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import crc32c as _crc32c
import numpy as np

from safepoint import knobs
from safepoint.errors import CheckpointNotFound, CorruptCheckpoint, InvalidName
from safepoint.format import plain
from safepoint.format.collector import collector_paused
from safepoint.format.layout import latest_key, manifest_key, step_text
from safepoint.format.tree import Encoder, decode_inline
from safepoint.store import Store, check_key

FORMAT = "safepoint"
VERSION = 5
"""The newest format version this safepoint reads and writes. Version 3 adds chunk files
(``chunks/<content hash>-<save id>.bin``, incremental saves), version 4 sharded arrays and
per-rank values (distributed saves), version 5 chunk files of several chunks (a byte range
into one names its chunk's content); a manifest is written with the lowest version that
holds it (2 without any), so that older readers read what they can."""
PACKED_CHUNK_VERSION = 5
SHARD_VERSION = 4
CHUNK_VERSION = 3
BASE_VERSION = 2
_CHUNK_FILE = re.compile(r"chunks/[0-9a-f]{64}-[0-9a-f]{12}\.bin")
_PREFIX = b'{"crc32c":"'
_MIDDLE = b'","manifest":'
_SUFFIX = b"}\n"
_HEAD = len(_PREFIX) + 8 + len(_MIDDLE)
_CRC = re.compile(r"[0-9a-f]{8}")
_CONTENT = re.compile(r"[0-9a-f]{64}")
_SAVE_ID = re.compile(r"[0-9a-f]{12}")
BODY_KEYS = frozenset({"format", "version", "name", "step", "created", "save_id", "metadata",
                       "pickled", "files", "blobs", "tree"})
_ERRNO_HINTS = {
    errno.ENOSPC: "the disk is full (no space left on device); free some space and save again",
    errno.EDQUOT: "the disk quota is exceeded; free some space and save again",
    errno.EFBIG: "a file is larger than this file system allows",
    errno.EACCES: "permission denied; check that this process may write to the store",
    errno.EPERM: "operation not permitted; check that this process may write to the store",
    errno.EROFS: "the file system is read-only",
}


def checksum(data: bytes | memoryview | np.ndarray, *, free_gil: bool = False) -> str:
    """crc32c of ``data`` as 8 hex digits (hardware-accelerated where the CPU has it).

    ``free_gil``: release the GIL even for a small buffer (crc32c keeps it below 32 KiB),
    so that threads waiting on it get it back between checksums, not every 5 ms.
    """
    buffer = data.data if isinstance(data, np.ndarray) else data
    return f"{_crc32c.crc32c(buffer, gil_release_mode=1 if free_gil else -1) & 0xFFFFFFFF:08x}"


@dataclass
class Manifest:
    """A parsed, checksum-verified, validated manifest."""

    key: str  # the manifest's key in the store
    body: dict[str, Any]
    size: int = 0
    plain_tree: bool = False
    """The tree, as read, holds no ``"$"`` key and nests at most ``knobs.MAX_DEPTH`` deep:
    it is the state as it is, with nothing to decode."""

    @property
    def name(self) -> str:
        return str(self.body["name"])

    @property
    def step(self) -> int:
        return int(self.body["step"])

    @property
    def metadata(self) -> dict[str, Any]:
        return untag_floats(self.body.get("metadata") or {})

    @property
    def files(self) -> list[list[Any]]:
        """``[key relative to the name's folder, size]`` of each data file."""
        return self.body.get("files", [])

    @property
    def blobs(self) -> list[dict[str, Any]]:
        """``{"size", "path", "ranges": [[file index, offset, length, crc32c], ...]}``."""
        return self.body.get("blobs", [])

    @property
    def nbytes(self) -> int:
        """Bytes the step occupies: its manifest and its data files."""
        return self.size + sum(int(size) for _, size in self.files)

    @property
    def created(self) -> float:
        return float(self.body.get("created", 0.0))


def encode_manifest(body: dict[str, Any], *, tree: bytes | memoryview | None = None) -> bytes:
    """The manifest file of ``body``; ``tree``: the JSON text of its plain tree, if made
    (written as it is, as the body's last field). The text is checksummed piece by piece
    and copied once: a tree of many leaves makes a text of megabytes."""
    if tree is None:
        parts: list[bytes | memoryview] = [plain.dumps(body)]
    else:
        head = plain.dumps({key: value for key, value in body.items() if key != "tree"})
        parts = [memoryview(head)[:-1], b',"tree":' if len(head) > 2 else b'"tree":', tree, b"}"]
    crc = 0
    for part in parts:
        crc = _crc32c.crc32c(part, crc)
    return b"".join([_PREFIX, f"{crc & 0xFFFFFFFF:08x}".encode("ascii"), _MIDDLE, *parts, _SUFFIX])


def decode_manifest(data: bytes, where: str, *, name: str | None = None,
                    step: int | None = None) -> dict[str, Any]:
    """Check a manifest's checksum, parse it and validate its fields (see :func:`check_body`)."""
    return _decode(data, where, name, step)[0]


def _decode(data: bytes, where: str, name: str | None, step: int | None) -> tuple[dict[str, Any], bool]:
    """:func:`decode_manifest`, and whether its tree is plain (:attr:`Manifest.plain_tree`)."""
    if (
        len(data) < _HEAD + len(_SUFFIX)
        or not data.startswith(_PREFIX)
        or data[len(_PREFIX) + 8 : _HEAD] != _MIDDLE
        or not data.endswith(_SUFFIX)
    ):
        raise CorruptCheckpoint(
            f"{where}: not a complete safepoint manifest (truncated or damaged)", path=where)
    expected = data[len(_PREFIX) : len(_PREFIX) + 8].decode("ascii", "replace")
    text = data[_HEAD : -len(_SUFFIX)]
    actual = checksum(text)
    if actual != expected:
        raise CorruptCheckpoint(
            f"{where}: manifest checksum mismatch (expected {expected}, got {actual})",
            path=where, expected=expected, actual=actual)
    with collector_paused():
        try:
            body, shallow = plain.parse(text, max_depth=knobs.MAX_DEPTH + 1)  # the body, then the tree
        except RecursionError:
            raise CorruptCheckpoint(f"{where}: the manifest nests too deeply", path=where) from None
        except ValueError as exc:
            raise CorruptCheckpoint(f"{where}: manifest is not valid JSON: {exc}", path=where) from exc
        check_body(body, where, name=name, step=step)
    # "$" can only be written as itself or escaped: without either, no tag anywhere
    return body, shallow and b'"$"' not in text and b"\\u0024" not in text


def check_body(body: Any, where: str, *, name: str | None = None, step: int | None = None) -> None:
    """Raise :class:`CorruptCheckpoint` unless every field of a manifest body is sound.

    Checks the format and version, that the name and step are the ones of the file that
    holds it, and that every data file and byte range is well-formed and within bounds.
    The tree itself is checked by the decoder (``safepoint.format.read``).
    """
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CorruptCheckpoint(f"{where}: not a safepoint manifest", path=where)
    version = body.get("version")
    if type(version) is int and version > VERSION:
        raise CorruptCheckpoint(
            f"{where}: written by a newer safepoint (format version {version}, this one reads "
            f"up to {VERSION}); upgrade safepoint to read it", path=where)
    if version == 1:
        raise CorruptCheckpoint(
            f"{where}: format version 1 (safepoint 0.1) is not read by this version; restore "
            "it with safepoint 0.1 and save it again", path=where)
    problem = _problem(body, name, step)
    if problem:
        raise CorruptCheckpoint(f"{where}: malformed manifest: {problem}", path=where)


def _problem(body: dict[str, Any], name: str | None, step: int | None) -> str | None:
    version = body.get("version")
    if type(version) is not int or not BASE_VERSION <= version <= VERSION:
        return "no valid format version"
    if type(body.get("step")) is not int or body["step"] < 0:
        return "no valid step"
    if step is not None and body["step"] != step:
        return f"it says step {body['step']} but is the manifest of step {step}"
    if not isinstance(body.get("name"), str):
        return "no valid name"
    if name is not None and body["name"] != name:
        return f"it says name {body['name']!r} but lies in {name!r}"
    if "tree" not in body:
        return "no tree"
    if not isinstance(body.get("metadata", {}), dict):
        return "metadata is not an object"
    if not isinstance(body.get("save_id"), str) or not _SAVE_ID.fullmatch(body["save_id"]):
        return "no valid save id"
    pickled = body.get("pickled", [])
    if not isinstance(pickled, list) or not all(isinstance(p, str) for p in pickled):
        return "bad list of pickled leaves"
    files = body.get("files", [])
    if not isinstance(files, list):
        return "the file table is not a list"
    own = step_text(body["step"]) + "/"
    for index, entry in enumerate(files):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and type(entry[1]) is int and entry[1] >= 0):
            return f"bad file entry {index}"
        try:
            check_key(entry[0])
        except InvalidName:
            return f"file entry {index} names {entry[0]!r}, which is not a key in the store"
        if version >= 3 and _CHUNK_FILE.fullmatch(entry[0]):
            continue  # a chunk file, shared by the steps that hold its bytes
        if not entry[0].startswith(own) or entry[0].count("/") != 1:
            return f"file entry {index} names {entry[0]!r}, outside the step's own folder"
    blobs = body.get("blobs", [])
    if not isinstance(blobs, list):
        return "the blob table is not a list"
    sizes = [entry[1] for entry in files]
    crc = _CRC.fullmatch
    for index, blob in enumerate(blobs):
        if type(blob) is dict:  # the common entry first: one byte range of 4 fields, sound
            size, ranges = blob.get("size"), blob.get("ranges")
            if type(ranges) is list and len(ranges) == 1 and type(size) is int:
                r = ranges[0]
                if type(r) is list and len(r) == 4:
                    file, offset, length, value = r
                    if (type(file) is int and type(offset) is int and length == size
                            and type(length) is int and 0 <= file < len(sizes) and offset >= 0
                            and length >= 0 and offset + length <= sizes[file]
                            and type(value) is str and crc(value)):
                        continue
        problem = _blob_problem(blob, files, version)
        if problem:
            return f"blob {index}: {problem}"
    return None


def _names_a_part(r: list[Any], file: list[Any], version: int) -> bool:
    """Whether a range's fifth element is sound: a chunk's content (version 5), in a chunk
    file of several chunks, and the content in the file's name if it is the first."""
    rel = file[0]
    if not (version >= PACKED_CHUNK_VERSION and isinstance(r[4], str) and _CONTENT.fullmatch(r[4])
            and _CHUNK_FILE.fullmatch(rel)):
        return False
    if r[1] == 0:
        return r[2] != file[1] and rel.startswith(f"chunks/{r[4]}-")
    return True


def _blob_problem(blob: Any, files: list[list[Any]], version: int) -> str | None:
    if not (isinstance(blob, dict) and type(blob.get("size")) is int and blob["size"] >= 0
            and isinstance(blob.get("ranges"), list)):
        return "bad entry"
    total = 0
    for r in blob["ranges"]:
        if not (isinstance(r, list) and len(r) in (4, 5) and all(type(v) is int for v in r[:3])
                and isinstance(r[3], str) and _CRC.fullmatch(r[3])):
            return "bad byte range"
        file, offset, length = r[0], r[1], r[2]
        if not 0 <= file < len(files) or offset < 0 or length < 0:
            return "byte range outside the file table"
        if len(r) == 5 and not _names_a_part(r, files[file], version):
            return ("bad byte range (a chunk's content names a part of a chunk file of "
                    "several, the first of which names the file)")
        if offset + length > files[file][1]:
            return f"byte range {offset}+{length} runs past the end of {files[file][0]}"
        total += length
    if total != blob["size"]:
        return f"its ranges hold {total} bytes, not {blob['size']}"
    return None


def read_manifest(store: Store, name: str, step: int | None = None) -> Manifest:
    """The validated manifest of ``step`` of ``name`` (``None``: the one in ``latest.json``)."""
    key = latest_key(name) if step is None else manifest_key(name, step)
    try:
        data = store.read(key, limit=knobs.MAX_MANIFEST_BYTES)
    except FileNotFoundError as exc:
        what = "no latest step" if step is None else f"no step {step}"
        raise CheckpointNotFound(f"{name!r} has {what} in {store.url}", name=name,
                                 step=step) from exc
    except CorruptCheckpoint as exc:
        exc.step = step
        raise
    where = f"{store.url}/{key}"
    body, plain_tree = _decode(data, where, name, step)
    return Manifest(key=key, body=body, size=len(data), plain_tree=plain_tree)


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
        copied = json.loads(json.dumps(value, allow_nan=True, default=default))
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"{what} must be JSON-serializable (str keys, plain values): {exc}") from exc
    return _tag_floats(copied)


def _tag_floats(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return Encoder().encode(value)
    if isinstance(value, list):
        return [_tag_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: _tag_floats(v) for k, v in value.items()}
    return value


def untag_floats(value: Any) -> Any:
    """Metadata as saved: tagged non-finite floats become floats again."""
    if isinstance(value, list):
        return [untag_floats(v) for v in value]
    if isinstance(value, dict):
        if value.get("$") == "float" and isinstance(value.get("bits"), str):
            try:
                return decode_inline(value)
            except CorruptCheckpoint:
                return value
        return {k: untag_floats(v) for k, v in value.items()}
    return value


__all__ = ["BASE_VERSION", "BODY_KEYS", "CHUNK_VERSION", "FORMAT", "PACKED_CHUNK_VERSION",
           "SHARD_VERSION", "VERSION", "Manifest", "check_body", "checksum",
           "decode_manifest", "describe_os_error", "encode_manifest", "json_copy",
           "read_manifest", "untag_floats"]
