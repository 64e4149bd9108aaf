"""State trees to JSON nodes plus blobs, and back.

A node is plain JSON. Native JSON values stand for themselves (``null``, booleans, ints,
finite floats, strings, lists, and objects whose keys are strings other than ``"$"``).
Everything else is an object tagged with ``"$"``::

    {"$": "int", "hex": "-0x1f..."}                   int outside the int64 range
    {"$": "tuple", "items": [...]}                    tuple
    {"$": "dict", "items": [[key, value], ...]}       dict with non-str keys (or a "$" key)
    {"$": "odict", "items": [[key, value], ...]}      collections.OrderedDict
    {"$": "float", "bits": "7ff8000000000000"}         nan, inf, -inf (exact bits)
    {"$": "complex", "bits": "<16 bytes hex>"}
    {"$": "bytes", "b64": "..."} | {"$": "bytes", "blob": 0}     (also "bytearray")
    {"$": "ndarray", "dtype": ..., "shape": [...], "order": "C", "b64" | "blob": ...}
    {"$": "npscalar", "dtype": ..., "b64": "..."}
    {"$": "leaf", "kind": "torch.Tensor", "attrs": {...}, "array": <ndarray node>}
    {"$": "pickle", "b64" | "blob": ...}                only with allow_pickle=True

Arrays larger than ``inline_limit`` bytes become blobs: the encoder hands out a view of the
array's own memory (no copy for C- or Fortran-contiguous arrays). The decoder validates
every node as it builds the value (tags, dtypes, shapes against data sizes, base64, key
types, depth), so one walk decides whether a tree is sound; blob bytes come from a
:class:`BlobSource`, which reads and verifies them after the walk and only then fills a
caller's arrays (all or nothing).
"""

from __future__ import annotations

import base64
import binascii
import pickle
import re
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from safepoint import knobs
from safepoint.errors import CorruptCheckpoint, StateMismatch, UnsafeCheckpoint, UnsupportedType
from safepoint.format.codecs import KNOWN_KINDS, LeafCodec, active_codecs, codec_for_kind
from safepoint.format.dtypes import decode_dtype, encode_dtype, itemsize_of
from safepoint.format.plain import is_plain, is_plain_node, plain_copy
from safepoint.format.shards import PerRank, Shard

_HEX_INT = re.compile(r"-?0x[0-9a-f]+")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_SCALARS = frozenset({str, int, float, bool, type(None)})


@dataclass
class BlobRef:
    """A large leaf to be written as a blob."""

    data: memoryview  # 1-D bytes view of the leaf's memory
    tree_path: str
    stream: bool = False
    """Bytes rather than an array (bytes, bytearray, a pickle): where insertions are likely,
    incremental saves cut it at content-defined boundaries."""
    ranged: int = 0
    """A shard's blob: written as byte ranges of this many bytes, each with its checksum,
    so that a restore onto another layout reads (and verifies) only the ranges it needs."""


def _b64(data: bytes | memoryview) -> str:
    return base64.b64encode(data).decode("ascii")


def _float_bits(value: float) -> str:
    return struct.pack("<d", value).hex()


class TreePath:
    """A place in a state tree, such as ``state['model']['layers'][3]``.

    Built for every container entry that is not a plain scalar, so it only links to its
    parent; the text is made when a message, a blob entry or a pickle list needs it.
    """

    __slots__ = ("is_key", "key", "parent")

    def __init__(self, parent: TreePath | str, key: Any, *, is_key: bool = False) -> None:
        self.parent, self.key, self.is_key = parent, key, is_key

    def __str__(self) -> str:
        if type(self.parent) is str:  # a top-level entry: the common case
            text = key_text(self.key)
            return f"{self.parent} key {text}" if self.is_key else f"{self.parent}[{text}]"
        parts: list[str] = []
        node: TreePath | str = self
        while isinstance(node, TreePath):
            text = key_text(node.key)
            parts.append(f" key {text}" if node.is_key else f"[{text}]")
            node = node.parent
        return node + "".join(reversed(parts))


def key_text(key: Any) -> str:
    """A short repr of a key for a tree path (huge ints and long strings abridged)."""
    if type(key) is int and key.bit_length() > 256:  # repr of a huge int may even fail
        return f"<{key.bit_length()}-bit int>"
    text = repr(key)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_json_scalar(value: Any) -> bool:
    """True for values a node holds as they are (the common case, checked first)."""
    kind = type(value)
    return (
        kind is str
        or value is None
        or kind is bool
        or (kind is int and -(2**63) <= value < 2**63)
        or (kind is float and value - value == 0.0)  # finite
    )


def _describe_type(obj: Any) -> str:
    """``"Point (mymod.Point)"`` with its article: ``a Point``, ``an object``."""
    cls = type(obj)
    article = "an" if cls.__qualname__[:1].lower() in "aeiou" else "a"
    return f"{article} {cls.__qualname__} ({cls.__module__}.{cls.__qualname__})"


class Encoder:
    """Turns one state tree into a JSON node and a list of blobs.

    A plain subtree (:func:`is_plain`) is its own node: it is copied in C, or used as it is
    with ``share=True`` (when the caller serializes the node before the tree may change).
    ``snapshot`` (used by asynchronous saves) is called with the index of each blob that
    would share memory with the caller (a large array, or a large bytearray as a uint8
    array) and the array, and returns the array whose memory is written: a copy in a
    buffer reused across saves, so that the caller may change the live value while the
    write goes on.

    ``host_only`` refuses a framework array held in device memory (a CUDA tensor, a jax
    array on a GPU): a copy-on-write snapshot (``snapshot="fork"``) shares host pages only.
    """

    def __init__(
        self,
        *,
        allow_pickle: bool = False,
        inline_limit: int | None = None,
        snapshot: Callable[[int, np.ndarray], np.ndarray] | None = None,
        share: bool = False,
        host_only: bool = False,
        shards_only: bool = False,
    ) -> None:
        self.allow_pickle = allow_pickle
        self.shards_only = shards_only
        """Encode only Shard and PerRank leaves (a distributed save's other ranks: the
        coordinator saves the replicated values); the rest become None."""
        self.shards: list[list[Any]] = []  # [tree path, shard node] of every Shard
        self.per_rank: list[list[Any]] = []  # [tree path, node] of every PerRank value
        self._in_per_rank = False
        self.share = share
        self._plain: dict[int, bool] | None = None  # is_plain's answers, once one was no
        self.host_only = host_only
        self.inline_limit = knobs.INLINE_LIMIT if inline_limit is None else inline_limit
        self.snapshot = snapshot
        self.blobs: list[BlobRef] = []
        self.pickled: list[str] = []
        self._codecs: list[LeafCodec] = active_codecs()
        self._active: set[int] = set()

    def encode(self, obj: Any, path: TreePath | str = "state") -> Any:
        if _is_json_scalar(obj):
            return obj
        kind = type(obj)
        if kind is np.ndarray and not self.shards_only:  # the common leaf, first
            return self._ndarray(obj, path)
        if kind is int:
            return {"$": "int", "hex": hex(obj)}
        if kind is float:
            return {"$": "float", "bits": _float_bits(obj)}
        if kind is complex:
            return {"$": "complex", "bits": struct.pack("<dd", obj.real, obj.imag).hex()}
        if kind is bytes:
            return {"$": "bytes", **self._data(memoryview(obj), path, stream=True)}
        if kind is bytearray:
            data = memoryview(obj)
            if self.snapshot is not None and len(obj) > self.inline_limit:
                data = self.snapshot(len(self.blobs), np.frombuffer(obj, np.uint8)).data
            return {"$": "bytearray", **self._data(data, path, stream=True)}
        if kind in (list, tuple, dict, OrderedDict):
            return self._container(obj, path)
        if kind is Shard or kind is PerRank:
            return self._distributed(obj, path)
        if self.shards_only:
            return self._framework_shard(obj, path)
        if isinstance(obj, np.ndarray) and (kind is np.ndarray or isinstance(obj, np.memmap)):
            return self._ndarray(obj, path)
        if isinstance(obj, np.generic):
            return self._npscalar(obj, path)
        for codec in self._codecs:
            if codec.matches(obj):
                shard = self._framework_shard(obj, path, codec)
                if shard is not None:
                    return shard
                if self.host_only:
                    _refuse_device_memory(codec, obj, path)
                array, attrs = codec.to_numpy(obj)
                return {"$": "leaf", "kind": codec.kind, "attrs": attrs,
                        "array": self._ndarray(np.asarray(array), path)}
        return self._pickle(obj, path)

    def _child(self, value: Any, parent: TreePath | str, key: Any) -> Any:
        return value if _is_json_scalar(value) else self.encode(value, TreePath(parent, key))

    def _container(self, obj: Any, path: TreePath | str) -> Any:
        if is_plain(obj, len(self._active), self._plain):
            return None if self.shards_only else obj if self.share else plain_copy(obj)
        if self._plain is None:  # a mixed tree: remember answers, so that no subtree is walked twice more
            self._plain = {}
        if id(obj) in self._active:
            raise UnsupportedType(f"{path}: the state tree contains itself (a cycle)",
                                  tree_path=str(path), type_name=type(obj).__name__)
        if len(self._active) >= knobs.MAX_DEPTH:
            raise UnsupportedType(
                f"{path}: the state tree nests more than {knobs.MAX_DEPTH} containers deep; "
                "flatten it (a checkpoint reader must be able to load what is saved)",
                tree_path=str(path), type_name=type(obj).__name__)
        self._active.add(id(obj))
        try:
            if type(obj) is list:
                return [self._child(v, path, i) for i, v in enumerate(obj)]
            if type(obj) is tuple:
                return {"$": "tuple", "items": [self._child(v, path, i) for i, v in enumerate(obj)]}
            plain = type(obj) is dict and all(type(k) is str and k != "$" for k in obj)
            if plain:
                array, child, ndarray = self._ndarray, self._child, np.ndarray
                if self.shards_only:
                    return {k: child(v, path, k) for k, v in obj.items()}
                return {k: array(v, TreePath(path, k)) if type(v) is ndarray else child(v, path, k)
                        for k, v in obj.items()}
            items = [[self._key(k, path), self._child(v, path, k)] for k, v in obj.items()]
            return {"$": "odict" if type(obj) is OrderedDict else "dict", "items": items}
        finally:
            self._active.discard(id(obj))

    def _framework_shard(self, obj: Any, path: TreePath | str,
                         codec: LeafCodec | None = None) -> dict[str, Any] | None:
        """A framework's distributed array (a DTensor) as a Shard's node, else None."""
        from safepoint.format.sharded_nodes import encode_framework_shard
        return encode_framework_shard(self, obj, path, codec)

    def _distributed(self, obj: Shard | PerRank, path: TreePath | str) -> dict[str, Any]:
        """A Shard's or a PerRank value's node (:mod:`safepoint.format.sharded_nodes`)."""
        from safepoint.format.sharded_nodes import encode_distributed
        return encode_distributed(self, obj, path)

    def _key(self, key: Any, path: TreePath | str) -> Any:
        if type(key) in (str, int, float, bool, bytes, tuple) or key is None or isinstance(key, np.generic):
            return self.encode(key, TreePath(path, key, is_key=True))
        raise UnsupportedType(
            f"{path}: cannot store a dict key of type {type(key).__name__} ({key_text(key)}); "
            "keys may be str, int, float, bool, None, bytes, numpy scalars or tuples of those",
            tree_path=str(path), type_name=type(key).__name__)

    def _data(self, data: memoryview, path: TreePath | str, *, stream: bool = False) -> dict[str, Any]:
        if data.nbytes <= self.inline_limit:
            return {"b64": _b64(data)}
        flat = data.cast("B") if data.ndim != 1 or data.format != "B" else data
        self.blobs.append(BlobRef(flat, str(path), stream))
        return {"blob": len(self.blobs) - 1}

    def _ndarray(self, array: np.ndarray, path: TreePath | str) -> dict[str, Any]:
        try:
            dtype = encode_dtype(array.dtype)
        except TypeError:
            return self._pickle(array, path)
        shared = True  # does `flat` share memory with the caller's array?
        flags = array.flags
        if flags.c_contiguous:
            order, flat = "C", array
        elif flags.f_contiguous:
            order, flat = "F", array.T
        else:
            order, flat, shared = "C", np.ascontiguousarray(array), False
        node: dict[str, Any] = {"$": "ndarray", "dtype": dtype, "shape": list(array.shape), "order": order}
        if flat.nbytes <= self.inline_limit:
            node["b64"] = _b64(bytes_view(flat))
            return node
        if shared and self.snapshot is not None:
            flat = self.snapshot(len(self.blobs), flat)
        node["blob"] = len(self.blobs)
        self.blobs.append(BlobRef(bytes_view(flat), str(path)))
        return node

    def _npscalar(self, value: np.generic, path: TreePath | str) -> Any:
        array = np.asarray(value)  # np.str_("") has dtype <U0 but holds one <U1 item
        try:
            dtype = encode_dtype(array.dtype)
        except TypeError:
            return self._pickle(value, path)
        return {"$": "npscalar", "dtype": dtype, "b64": _b64(array.tobytes())}

    def _pickle(self, obj: Any, path: TreePath | str) -> Any:
        name = f"{type(obj).__module__}.{type(obj).__qualname__}"
        if not self.allow_pickle:
            raise UnsupportedType(
                f"{path}: cannot store {_describe_type(obj)}; a state tree holds dicts, "
                "lists, tuples, None, bool, int, float, complex, str, bytes, numpy arrays and "
                "scalars (and torch/jax arrays); convert it, give it "
                "state_dict()/load_state_dict(), or pass allow_pickle=True to save and load "
                "it with pickle",
                tree_path=str(path), type_name=name)
        self.pickled.append(str(path))
        try:
            data = pickle.dumps(obj, protocol=5)
        except Exception as exc:  # PicklingError, TypeError, AttributeError of a local class...
            part, culprit = _unpicklable_part(obj)
            inside = f", inside {_describe_type(obj)} at {path}," if part else ""
            raise UnsupportedType(
                f"{path}{part}: cannot pickle {_describe_type(culprit)}{inside} even with "
                f"allow_pickle=True ({type(exc).__name__}: {exc}); leave it out of the state "
                "and create it again after a resume, convert it to plain values, or give its "
                "owner state_dict()/load_state_dict()", tree_path=f"{path}{part}",
                type_name=f"{type(culprit).__module__}.{type(culprit).__qualname__}") from exc
        return {"$": "pickle", "type": name, **self._data(memoryview(data), path, stream=True)}


def _refuse_device_memory(codec: LeafCodec, obj: Any, path: TreePath | str) -> None:
    """Raise ``UnsupportedType`` if ``obj`` lives outside host memory (``codec.device``)."""
    where = getattr(codec, "device", None)
    device = where(obj) if where is not None else "cpu"
    if device != "cpu":
        raise UnsupportedType(
            f"{path}: a {codec.kind} on {device}; snapshot='fork' saves host memory only "
            "(a forked process shares the CPU's pages, not a device's): move it to the CPU "
            "first, or use snapshot='copy', which copies it to the host",
            tree_path=str(path), type_name=codec.kind)


def _unpicklable_part(obj: Any, depth: int = 4) -> tuple[str, Any]:
    """Where inside an object that pickle refused the trouble lies: ``(".hook", <lambda>)``
    for an attribute, ``("['k'][2]", ...)`` for items; ``("", obj)`` when no smaller part
    fails on its own. Only called after a failure, so its cost does not matter."""
    parts: list[tuple[str, Any]] = []
    if isinstance(obj, dict):
        parts = [(f"[{key_text(k)}]", v) for k, v in list(obj.items())[:1000]]
    elif isinstance(obj, list | tuple | set | frozenset):
        parts = [(f"[{i}]", v) for i, v in enumerate(list(obj)[:1000])]
    elif isinstance(getattr(obj, "__dict__", None), dict):
        parts = [(f".{k}", v) for k, v in list(vars(obj).items())[:1000]]
    for label, value in parts:
        try:
            pickle.dumps(value, protocol=5)
        except Exception:
            if depth <= 1:
                return label, value
            inner, culprit = _unpicklable_part(value, depth - 1)
            return label + inner, culprit
    return "", obj


def bytes_view(array: np.ndarray) -> memoryview:
    """The memory of a contiguous array as a 1-D byte view, without copying."""
    if array.nbytes == 0:
        return memoryview(b"")
    try:
        return array.data.cast("B")
    except (TypeError, ValueError):  # dtypes the buffer protocol cannot express
        return array.reshape(-1).view(np.uint8).data


# ------------------------------------------------------------------ decoding


class BlobSource(Protocol):
    """Where a decoder gets blob bytes (see ``safepoint.format.read``)."""

    def size(self, index: int) -> int:
        """The byte size of blob ``index``; ``CorruptCheckpoint`` for a bad index."""

    def array(self, index: int) -> np.ndarray:
        """A uint8 buffer that holds blob ``index`` once the source has loaded."""

    def read(self, index: int) -> memoryview:
        """Blob ``index``'s bytes, read and verified now."""

    def fill(self, target: np.ndarray, index: int | None, data: bytes | None, order: str) -> None:
        """Copy blob ``index`` (or ``data``), stored in ``order``, into ``target`` once
        everything is verified."""

    def fill_part(self, target: np.ndarray, index: int | None, data: bytes | None, first: int,
                  end: int, view: Callable[[np.ndarray], np.ndarray], *, own: bool) -> None:
        """Copy ``view(bytes first..end of blob index or data)`` into ``target`` once those
        bytes are read and verified (reading only the byte ranges that hold them); ``own``:
        the target is the decoder's own array, filled when the source loads."""

    def flush(self) -> None:
        """Fill the decoder's own arrays now (a framework that copies them needs them)."""


class NoBlobs:
    """The source of a tree that must be inline (metadata, run journals): any blob
    reference is damage."""

    def __init__(self, where: str = "manifest") -> None:
        self.where = where

    def _refuse(self, index: int) -> Any:
        raise CorruptCheckpoint(f"{self.where}: a node that must be inline refers to blob {index}")

    size = array = read = _refuse

    def fill(self, target: np.ndarray, index: int | None, data: bytes | None, order: str) -> None:
        if index is not None:
            self._refuse(index)
        saved: np.ndarray = np.frombuffer(data or b"", target.dtype)
        saved = saved.reshape(target.shape[::-1]).T if order == "F" else saved.reshape(target.shape)
        np.copyto(target, saved)

    def fill_part(self, target: np.ndarray, index: int | None, data: bytes | None, first: int,
                  end: int, view: Callable[[np.ndarray], np.ndarray], *, own: bool) -> None:
        if index is not None:
            self._refuse(index)
        np.copyto(target, view(np.frombuffer(data or b"", np.uint8)[first:end]))

    def flush(self) -> None:
        """Inline data is copied at once: nothing waits."""


def _path_text(path: Any) -> str:
    keys = []
    while isinstance(path, tuple):
        path, key = path
        keys.append(f"[{key_text(key)}]")
    return "state" + "".join(reversed(keys))


def _fail(path: Any, message: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"{_path_text(path)}: {message}")


class Decoder:
    """Rebuilds a state tree from a node, validating every node on the way.

    ``build=False`` only validates (``verify`` and ``show`` use it, so that they refuse
    exactly what a restore refuses). ``target``: a tree of live arrays of the same
    structure; a saved array lands in the target array at its place (in place, after
    every blob is verified), which must then have the same shape and dtype
    (:class:`StateMismatch` otherwise).
    """

    def __init__(self, source: BlobSource, *, allow_pickle: bool = False, build: bool = True,
                 share: bool = False, rank: tuple[int, int] | None = None) -> None:
        self.source = source
        self.rank = rank
        """(rank, world size) of the restoring process: which PerRank value is its own."""
        self.allow_pickle = allow_pickle
        self.build = build
        self.share = share
        self._plain: dict[int, bool] | None = None  # is_plain_node's answers, once one was no
        """The nodes are the decoder's own (a manifest read for this restore alone): a plain
        subtree is returned as it is, not copied."""

    def decode(self, node: Any, target: Any = None, path: Any = None, depth: int = 0) -> Any:
        kind = type(node)
        if kind in _SCALARS:
            if target is not None and isinstance(target, np.ndarray):
                raise _mismatch(path, target, "a plain value")
            return node
        if depth > knobs.MAX_DEPTH + 8:
            raise _fail(path, f"nodes nested more than {knobs.MAX_DEPTH} deep")
        if target is None and is_plain_node(node, depth, self._plain):  # the value itself: no walk in Python
            return node if self.share or not self.build else plain_copy(node)
        if self._plain is None and kind in (dict, list):
            self._plain = {}
        if kind is list:
            return self._list(node, target, path, depth)
        if kind is not dict:
            raise _fail(path, f"unexpected node {key_text(node)}")
        tag = node.get("$")
        if tag is None:
            sub = target if isinstance(target, dict) else None
            if target is not None and isinstance(target, np.ndarray):
                raise _mismatch(path, target, "a dict")
            scalars = _SCALARS
            out = {}
            for k, v in node.items():
                if type(v) in scalars and not (sub and isinstance(sub.get(k), np.ndarray)):
                    out[k] = v
                elif not sub and type(v) is dict and v.get("$") == "ndarray":  # the common leaf
                    out[k] = self._handle(Decoder._ndarray, "ndarray", v, None, (path, k), depth + 1)
                else:
                    out[k] = self.decode(v, sub.get(k) if sub else None, (path, k), depth + 1)
            return out
        handler = _HANDLERS.get(tag) if isinstance(tag, str) else None
        if handler is None:
            raise _fail(path, f"unknown node type {key_text(tag)}; a newer safepoint may have "
                              "written it")
        if target is not None and isinstance(target, np.ndarray) and tag not in ("ndarray", "sharded"):
            raise _mismatch(path, target, f"a {tag}")
        return self._handle(handler, tag, node, target, path, depth)

    def _handle(self, handler: Callable[[Decoder, dict[str, Any], Any, Any, int], Any], tag: str,
                node: dict[str, Any], target: Any, path: Any, depth: int) -> Any:
        """``handler``'s value for a tagged node; what it finds malformed is damage."""
        try:
            return handler(self, node, target, path, depth)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            if isinstance(exc, (StateMismatch, UnsupportedType)):
                raise
            raise _fail(path, f"malformed {tag} node ({type(exc).__name__}: {exc})") from exc

    def _list(self, node: list[Any], target: Any, path: Any, depth: int) -> list[Any]:
        if isinstance(target, np.ndarray):
            raise _mismatch(path, target, "a list")
        targets = target if isinstance(target, (list, tuple)) and len(target) == len(node) else None
        if targets is None:
            scalars = _SCALARS
            return [v if type(v) in scalars else self.decode(v, None, (path, i), depth + 1)
                    for i, v in enumerate(node)]
        return [self.decode(v, targets[i], (path, i), depth + 1) for i, v in enumerate(node)]

    def _items(self, node: dict[str, Any], path: Any, depth: int) -> list[Any]:
        items = node["items"]
        if type(items) is not list:
            raise _fail(path, "container items are not a list")
        return items

    def _tuple(self, node: dict[str, Any], target: Any, path: Any, depth: int) -> tuple[Any, ...]:
        items = self._items(node, path, depth)
        return tuple(self._list(items, target, path, depth))

    def _pairs(self, node: dict[str, Any], target: Any, path: Any, depth: int) -> list[tuple[Any, Any]]:
        sub = target if isinstance(target, dict) else {}
        pairs = []
        for i, pair in enumerate(self._items(node, path, depth)):
            if type(pair) is not list or len(pair) != 2:
                raise _fail(path, f"dict item {i} is not a [key, value] pair")
            key = self.decode(pair[0], None, (path, i), depth + 1)
            try:
                hash(key)
            except TypeError:
                raise _fail(path, f"dict item {i} has an unhashable key {key_text(key)}") from None
            pairs.append((key, self.decode(pair[1], sub.get(key), (path, key), depth + 1)))
        return pairs

    def _dict(self, node: dict[str, Any], target: Any, path: Any, depth: int) -> dict[Any, Any]:
        return dict(self._pairs(node, target, path, depth))

    def _odict(self, node: dict[str, Any], target: Any, path: Any, depth: int) -> OrderedDict[Any, Any]:
        return OrderedDict(self._pairs(node, target, path, depth))

    def _float(self, node: dict[str, Any], target: Any, path: Any, depth: int) -> float:
        bits = node["bits"]
        if not (isinstance(bits, str) and _HEX16.fullmatch(bits)):
            raise _fail(path, "a float node needs 16 hex digits")
        return struct.unpack("<d", bytes.fromhex(bits))[0]

    def _int(self, node: dict[str, Any], target: Any, path: Any, depth: int) -> int:
        text = node["hex"]
        if not (isinstance(text, str) and _HEX_INT.fullmatch(text)):
            raise _fail(path, "an int node needs a hex number")
        return int(text, 16)

    def _complex(self, node: dict[str, Any], target: Any, path: Any, depth: int) -> complex:
        bits = node["bits"]
        if not (isinstance(bits, str) and _HEX32.fullmatch(bits)):
            raise _fail(path, "a complex node needs 32 hex digits")
        real, imag = struct.unpack("<dd", bytes.fromhex(bits))
        return complex(real, imag)

    def _data(self, node: dict[str, Any], path: Any) -> tuple[bytes | None, int | None, int]:
        """(inline bytes or None, blob index or None, size) of a data node."""
        if "b64" in node:
            text = node["b64"]
            if not isinstance(text, str):
                raise _fail(path, "base64 data is not a string")
            try:
                data = base64.b64decode(text.encode("ascii"), validate=True)
            except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
                raise _fail(path, f"bad base64 data ({exc})") from None
            return data, None, len(data)
        index = node.get("blob")
        if type(index) is not int:
            raise _fail(path, "a data node needs b64 or a blob index")
        return None, index, self.source.size(index)

    def _raw(self, node: dict[str, Any], path: Any) -> bytes | memoryview:
        data, index, _ = self._data(node, path)
        if data is not None:
            return data
        assert index is not None
        return self.source.read(index) if self.build else b""

    def _bytes(self, node: dict[str, Any], target: Any, path: Any, depth: int) -> Any:
        raw = self._raw(node, path)
        return bytes(raw) if node.get("$") == "bytes" else bytearray(raw)

    def _ndarray(self, node: dict[str, Any], target: Any, path: Any, depth: int) -> Any:
        dtype = decode_dtype(node["dtype"])
        shape = node["shape"]
        count = 1
        if type(shape) is list and len(shape) <= knobs.MAX_DIMS:
            for n in shape:
                if type(n) is not int or n < 0:
                    break
                count *= n
            else:
                shape = tuple(shape)
        if type(shape) is not tuple:
            raise _fail(path, f"bad array shape {key_text(shape)}")
        order = node.get("order", "C")
        if order != "C" and order != "F":
            raise _fail(path, f"bad array order {key_text(order)}")
        expected = count * dtype.itemsize
        if (target is None and self.build and expected and type(node.get("blob")) is int
                and "b64" not in node):
            buffer = self.source.array(node["blob"])  # the common case: an array of a blob
            if buffer.nbytes != expected:
                raise _fail(path, f"array data has {buffer.nbytes} bytes, but {shape} {dtype} "
                                  f"needs {expected}")
            if order == "C":
                return buffer.view(dtype).reshape(shape)
            return buffer.view(dtype).reshape(shape[::-1]).T
        data, index, size = self._data(node, path)
        if size != expected:
            raise _fail(path, f"array data has {size} bytes, but {shape} {dtype} needs {expected}")
        stored_shape = shape[::-1] if order == "F" else shape
        if target is not None and isinstance(target, np.ndarray):
            if target.dtype != dtype or target.shape != shape:
                raise _mismatch(path, target, f"a {dtype} array of shape {shape}")
            if not target.flags.writeable:
                raise StateMismatch(
                    f"{_path_text(path)}: the target array is read-only, so the saved array "
                    "cannot be loaded into it; pass a writable array, or restore without "
                    "into=", tree_path=_path_text(path))
            if self.build:
                self.source.fill(target, index, data, order)
            return target
        if not self.build:
            return None
        if not expected:
            return np.empty(shape, dtype, order="F" if order == "F" else "C")
        if data is not None:
            buffer = np.frombuffer(bytearray(data), np.uint8)
        else:
            assert index is not None
            buffer = self.source.array(index)
        array = buffer.view(dtype).reshape(stored_shape)
        return array.T if order == "F" else array

    def _npscalar(self, node: dict[str, Any], target: Any, path: Any, depth: int) -> Any:
        dtype = decode_dtype(node["dtype"])
        data, _, size = self._data(node, path)
        if data is None or size != dtype.itemsize:
            raise _fail(path, f"scalar data has {size} bytes, expected {dtype.itemsize}")
        return np.ndarray((), dtype=dtype, buffer=data)[()].copy()

    def _leaf(self, node: dict[str, Any], target: Any, path: Any, depth: int) -> Any:
        kind = node["kind"]
        attrs = node.get("attrs") or {}
        if not isinstance(kind, str) or kind not in KNOWN_KINDS:
            raise _fail(path, f"unknown leaf kind {key_text(kind)}")
        array_node = node.get("array")
        if not isinstance(attrs, dict) or not isinstance(array_node, dict) \
                or array_node.get("$") != "ndarray":
            raise _fail(path, "a leaf node needs attrs and an ndarray node")
        if not self.build:
            self._ndarray(array_node, None, path, depth)
            return None
        try:
            codec = codec_for_kind(kind)
        except ImportError as exc:
            raise UnsupportedType(
                f"this checkpoint holds {kind} leaves; install the framework to load them",
                type_name=kind) from exc
        view = None
        if target is not None:
            describe = getattr(codec, "describe", None)
            if describe is not None and (found := describe(target)) is not None:
                saved = (attrs.get("dtype"), tuple(array_node.get("shape") or ()))
                if tuple(found) != saved:
                    raise StateMismatch(
                        f"{_path_text(path)}: the target holds a {found[0]} tensor of shape "
                        f"{found[1]}, the checkpoint a {saved[0]} tensor of shape {saved[1]}; "
                        "make them match, or restore without into=", tree_path=_path_text(path))
            writable_view = getattr(codec, "writable_view", None)
            view = writable_view(target, attrs) if writable_view is not None else None
        array = self._ndarray(array_node, view, path, depth)
        if view is not None and array is view:
            return target
        return codec.from_numpy(array, attrs)

    def _sharded(self, node: dict[str, Any], target: Any, path: Any, depth: int) -> Any:
        """A global array saved as shards (:mod:`safepoint.format.sharded_nodes`)."""
        from safepoint.format.sharded_nodes import decode_sharded
        return decode_sharded(self, node, target, path, depth)

    def _perrank(self, node: dict[str, Any], target: Any, path: Any, depth: int) -> Any:
        """This rank's own value, or all ranks' (:mod:`safepoint.format.sharded_nodes`)."""
        from safepoint.format.sharded_nodes import decode_perrank
        return decode_perrank(self, node, target, path, depth)

    def _pickle(self, node: dict[str, Any], target: Any, path: Any, depth: int) -> Any:
        if not self.build:
            self._data(node, path)
            return None
        if not self.allow_pickle:
            raise UnsafeCheckpoint(
                f"the checkpoint holds a pickled {node.get('type', 'object')} at "
                f"{_path_text(path)}; loading it would run code from the checkpoint. Pass "
                "allow_pickle=True only if you trust it")
        return pickle.loads(self._raw(node, path))  # reads any buffer: no copy of a large blob


_HANDLERS: dict[str, Callable[[Decoder, dict[str, Any], Any, Any, int], Any]] = {
    "tuple": Decoder._tuple, "dict": Decoder._dict, "odict": Decoder._odict,
    "float": Decoder._float, "int": Decoder._int, "complex": Decoder._complex,
    "bytes": Decoder._bytes, "bytearray": Decoder._bytes, "ndarray": Decoder._ndarray,
    "npscalar": Decoder._npscalar, "leaf": Decoder._leaf, "pickle": Decoder._pickle,
    "sharded": Decoder._sharded, "perrank": Decoder._perrank,
}


def _mismatch(path: Any, target: np.ndarray, saved: str) -> StateMismatch:
    where = _path_text(path)
    return StateMismatch(
        f"{where}: the target holds a {target.dtype} array of shape {target.shape}, but the "
        f"checkpoint has {saved} there; make the target match, or restore without into=",
        tree_path=where)


def decode_inline(node: Any, where: str = "manifest") -> Any:
    """Decode a node that must not refer to blobs (metadata, a journal record's state)."""
    return Decoder(NoBlobs(where)).decode(node)


__all__ = ["BlobRef", "BlobSource", "Decoder", "Encoder", "NoBlobs", "TreePath", "bytes_view",
           "decode_inline", "itemsize_of", "key_text"]
