"""State trees to JSON nodes plus raw blobs, and back.

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
array's own memory (no copy for C- or Fortran-contiguous arrays), and the decoder builds the
array directly on the bytes it is given (a read buffer, an mmap, or a caller's array).
"""

from __future__ import annotations

import base64
import pickle
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from safepoint.errors import CorruptCheckpoint, UnsafeCheckpoint, UnsupportedType
from safepoint.format.codecs import LeafCodec, active_codecs, codec_for_kind

INLINE_LIMIT = 4096
"""Arrays and bytes of at most this many bytes are stored inside the manifest."""


_ML_DTYPES = {
    "bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e4m3b11fnuz", "float8_e5m2",
    "float8_e5m2fnuz", "float8_e3m4", "float8_e4m3", "float8_e8m0fnu", "float4_e2m1fn",
    "float6_e2m3fn", "float6_e3m2fn", "int2", "int4", "uint2", "uint4",
}


@dataclass
class BlobRef:
    """A large leaf to be written as its own blob."""

    data: memoryview  # 1-D bytes view of the leaf's memory
    tree_path: str


def _b64(data: bytes | memoryview) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def encode_dtype(dtype: np.dtype) -> Any:
    """A JSON description of a numpy dtype that :func:`decode_dtype` rebuilds exactly."""
    if type(dtype).__module__.startswith("ml_dtypes") or dtype.type.__module__.startswith("ml_dtypes"):
        return {"ml_dtypes": dtype.name}
    if dtype.fields is not None:
        names = list(dtype.names or ())
        spec = {"descr": _descr_to_json(dtype.descr), "itemsize": dtype.itemsize, "names": names,
                "offsets": [dtype.fields[n][1] for n in names],
                "formats": [encode_dtype(dtype.fields[n][0]) for n in names]}
        titles = [dtype.fields[n][2] if len(dtype.fields[n]) > 2 else None for n in names]
        if any(t is not None for t in titles):
            spec["titles"] = titles
        if dtype.isalignedstruct:
            spec["aligned"] = True
        return spec
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        return {"subdtype": encode_dtype(base), "shape": list(shape)}
    if dtype.kind == "O":
        raise TypeError("object arrays")
    return dtype.str


def _descr_to_json(descr: Any) -> Any:
    return [[name, _descr_to_json(fmt) if isinstance(fmt, list) else fmt, *rest]
            for name, fmt, *rest in descr]


def decode_dtype(spec: Any) -> np.dtype:
    """The dtype described by :func:`encode_dtype`'s output; never one holding objects."""
    dtype = _decode_dtype(spec)
    if dtype.hasobject:
        raise CorruptCheckpoint(f"manifest names a dtype holding Python objects: {spec!r}")
    return dtype


def _decode_dtype(spec: Any) -> np.dtype:
    if isinstance(spec, str):
        return np.dtype(spec)
    if isinstance(spec, dict) and "ml_dtypes" in spec:
        name = spec["ml_dtypes"]
        if name not in _ML_DTYPES:
            raise CorruptCheckpoint(f"unknown ml_dtypes dtype {name!r} in manifest")
        try:
            import ml_dtypes
        except ImportError as exc:
            raise UnsupportedType(
                f"this checkpoint holds {name} arrays; install ml_dtypes to load them "
                "(pip install ml_dtypes, or safepoint[jax])", type_name=name) from exc
        return np.dtype(getattr(ml_dtypes, name))
    if isinstance(spec, dict) and "subdtype" in spec:
        return np.dtype((_decode_dtype(spec["subdtype"]), tuple(spec["shape"])))
    if isinstance(spec, dict) and "names" in spec:
        fields = {
            "names": spec["names"],
            "formats": [_decode_dtype(f) for f in spec["formats"]],
            "offsets": spec["offsets"],
            "itemsize": spec["itemsize"],
        }
        if "titles" in spec:
            fields["titles"] = spec["titles"]
        return np.dtype(fields, align=bool(spec.get("aligned")))
    raise CorruptCheckpoint(f"unreadable dtype {spec!r} in manifest")


def _float_bits(value: float) -> str:
    return struct.pack("<d", value).hex()


def _bits_float(text: str) -> float:
    return struct.unpack("<d", bytes.fromhex(text))[0]


class TreePath:
    """A place in a state tree, such as ``state['model']['layers'][3]``.

    Built for every container entry that is not a plain scalar, so it only links to its
    parent; the text is made when a message, a blob entry or a pickle list needs it.
    """

    __slots__ = ("is_key", "key", "parent")

    def __init__(self, parent: TreePath | str, key: Any, *, is_key: bool = False) -> None:
        self.parent, self.key, self.is_key = parent, key, is_key

    def __str__(self) -> str:
        parts: list[str] = []
        node: TreePath | str = self
        while isinstance(node, TreePath):
            text = _key_text(node.key)
            parts.append(f" key {text}" if node.is_key else f"[{text}]")
            node = node.parent
        return node + "".join(reversed(parts))


def _key_text(key: Any) -> str:
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


class Encoder:
    """Turns one state tree into a JSON node and a list of blobs.

    ``snapshot`` (used by asynchronous saves) is called with the index of each blob that
    would share memory with the caller (a large array, or a large bytearray as a uint8
    array) and the array, and returns the array whose memory is written: a copy in a
    buffer reused across saves, so that the caller may change the live value while the
    write goes on.
    """

    def __init__(
        self,
        *,
        allow_pickle: bool = False,
        inline_limit: int = INLINE_LIMIT,
        snapshot: Callable[[int, np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.allow_pickle = allow_pickle
        self.inline_limit = inline_limit
        self.snapshot = snapshot
        self.blobs: list[BlobRef] = []
        self.pickled: list[str] = []
        self._codecs: list[LeafCodec] = active_codecs()
        self._active: set[int] = set()

    def encode(self, obj: Any, path: TreePath | str = "state") -> Any:
        if _is_json_scalar(obj):
            return obj
        kind = type(obj)
        if kind is int:
            return {"$": "int", "hex": hex(obj)}
        if kind is float:
            return {"$": "float", "bits": _float_bits(obj)}
        if kind is complex:
            return {"$": "complex", "bits": struct.pack("<dd", obj.real, obj.imag).hex()}
        if kind is bytes:
            return {"$": "bytes", **self._data(memoryview(obj), path)}
        if kind is bytearray:
            data = memoryview(obj)
            if self.snapshot is not None and len(obj) > self.inline_limit:
                data = memoryview(self.snapshot(len(self.blobs), np.frombuffer(obj, np.uint8)))
            return {"$": "bytearray", **self._data(data, path)}
        if kind in (list, tuple, dict, OrderedDict):
            return self._container(obj, path)
        if isinstance(obj, np.ndarray) and (kind is np.ndarray or isinstance(obj, np.memmap)):
            return self._ndarray(obj, path)
        if isinstance(obj, np.generic):
            return self._npscalar(obj, path)
        for codec in self._codecs:
            if codec.matches(obj):
                array, attrs = codec.to_numpy(obj)
                return {"$": "leaf", "kind": codec.kind, "attrs": attrs,
                        "array": self._ndarray(np.asarray(array), path)}
        return self._pickle(obj, path)

    def _child(self, value: Any, parent: TreePath | str, key: Any) -> Any:
        return value if _is_json_scalar(value) else self.encode(value, TreePath(parent, key))

    def _container(self, obj: Any, path: TreePath | str) -> Any:
        if id(obj) in self._active:
            raise UnsupportedType(f"{path}: the state tree contains itself (a cycle)",
                                  tree_path=str(path), type_name=type(obj).__name__)
        self._active.add(id(obj))
        try:
            if type(obj) is list:
                return [self._child(v, path, i) for i, v in enumerate(obj)]
            if type(obj) is tuple:
                return {"$": "tuple", "items": [self._child(v, path, i) for i, v in enumerate(obj)]}
            plain = type(obj) is dict and all(type(k) is str and k != "$" for k in obj)
            if plain:
                return {k: self._child(v, path, k) for k, v in obj.items()}
            items = [[self._key(k, path), self._child(v, path, k)] for k, v in obj.items()]
            return {"$": "odict" if type(obj) is OrderedDict else "dict", "items": items}
        finally:
            self._active.discard(id(obj))

    def _key(self, key: Any, path: TreePath | str) -> Any:
        if type(key) in (str, int, float, bool, bytes, tuple) or key is None or isinstance(key, np.generic):
            return self.encode(key, TreePath(path, key, is_key=True))
        raise UnsupportedType(
            f"{path}: cannot store a dict key of type {type(key).__name__} ({_key_text(key)}); "
            "keys may be str, int, float, bool, None, bytes, numpy scalars or tuples of those",
            tree_path=str(path), type_name=type(key).__name__)

    def _data(self, data: memoryview, path: TreePath | str) -> dict[str, Any]:
        if data.nbytes <= self.inline_limit:
            return {"b64": _b64(data)}
        flat = data.cast("B") if data.ndim != 1 or data.format != "B" else data
        self.blobs.append(BlobRef(flat, str(path)))
        return {"blob": len(self.blobs) - 1}

    def _ndarray(self, array: np.ndarray, path: TreePath | str) -> dict[str, Any]:
        try:
            dtype = encode_dtype(array.dtype)
        except TypeError:
            return self._pickle(array, path)
        shared = True  # does `flat` share memory with the caller's array?
        if array.flags.c_contiguous:
            order, flat = "C", array
        elif array.flags.f_contiguous:
            order, flat = "F", array.T
        else:
            order, flat, shared = "C", np.ascontiguousarray(array), False
        node: dict[str, Any] = {"$": "ndarray", "dtype": dtype, "shape": list(array.shape), "order": order}
        if shared and flat.nbytes > self.inline_limit and self.snapshot is not None:
            flat = self.snapshot(len(self.blobs), flat)
        node.update(self._data(_bytes_view(flat), path))
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
                f"{path}: cannot store a {type(obj).__qualname__} ({name}); a state tree holds "
                "dicts, lists, tuples, None, bool, int, float, complex, str, bytes, numpy "
                "arrays and scalars (and torch/jax arrays); convert it, give it "
                "state_dict()/load_state_dict(), or pass allow_pickle=True to save and load "
                "it with pickle",
                tree_path=str(path), type_name=name)
        self.pickled.append(str(path))
        data = pickle.dumps(obj, protocol=5)
        return {"$": "pickle", "type": name, **self._data(memoryview(data), path)}


def _bytes_view(array: np.ndarray) -> memoryview:
    """The memory of a contiguous array as a 1-D byte view, without copying."""
    if array.nbytes == 0:
        return memoryview(b"")
    try:
        return memoryview(array).cast("B")
    except (TypeError, ValueError):  # dtypes the buffer protocol cannot express
        return memoryview(array.reshape(-1).view(np.uint8))


class Decoder:
    """Rebuilds a state tree from a node; ``load_blob(i)`` supplies blob ``i``'s bytes.

    ``load_blob(i, into)`` may read straight into ``into`` (a writable byte view of an
    existing array, see ``target``) and must then return it.
    """

    def __init__(
        self,
        load_blob: Callable[[int, memoryview | None], memoryview | np.ndarray],
        *,
        allow_pickle: bool = False,
    ) -> None:
        self.load_blob = load_blob
        self.allow_pickle = allow_pickle

    def decode(self, node: Any, target: Any = None) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            targets = target if isinstance(target, (list, tuple)) and len(target) == len(node) else None
            return [self.decode(v, targets[i] if targets else None) for i, v in enumerate(node)]
        if not isinstance(node, dict):
            raise CorruptCheckpoint(f"unexpected node {node!r} in manifest")
        tag = node.get("$")
        if tag is None:
            sub = target if isinstance(target, dict) else {}
            return {k: self.decode(v, sub.get(k)) for k, v in node.items()}
        handler = getattr(self, f"_decode_{tag}", None)
        if handler is None:
            raise CorruptCheckpoint(f"unknown node type {tag!r} in manifest; a newer safepoint may have written it")
        return handler(node, target)

    def _decode_tuple(self, node: dict[str, Any], target: Any) -> tuple[Any, ...]:
        items = node["items"]
        targets = target if isinstance(target, (list, tuple)) and len(target) == len(items) else None
        return tuple(self.decode(v, targets[i] if targets else None) for i, v in enumerate(items))

    def _pairs(self, node: dict[str, Any], target: Any) -> list[tuple[Any, Any]]:
        sub = target if isinstance(target, dict) else {}
        pairs = []
        for k, v in node["items"]:
            key = self.decode(k)
            pairs.append((key, self.decode(v, sub.get(key) if _hashable(key) else None)))
        return pairs

    def _decode_dict(self, node: dict[str, Any], target: Any) -> dict[Any, Any]:
        return dict(self._pairs(node, target))

    def _decode_odict(self, node: dict[str, Any], target: Any) -> OrderedDict[Any, Any]:
        return OrderedDict(self._pairs(node, target))

    def _decode_float(self, node: dict[str, Any], target: Any) -> float:
        return _bits_float(node["bits"])

    def _decode_int(self, node: dict[str, Any], target: Any) -> int:
        return int(node["hex"], 16)

    def _decode_complex(self, node: dict[str, Any], target: Any) -> complex:
        real, imag = struct.unpack("<dd", bytes.fromhex(node["bits"]))
        return complex(real, imag)

    def _raw(self, node: dict[str, Any], into: memoryview | None = None) -> memoryview | np.ndarray | bytearray:
        if "b64" in node:
            return bytearray(_unb64(node["b64"]))  # writable, like arrays read from blobs
        return self.load_blob(int(node["blob"]), into)

    def _decode_bytes(self, node: dict[str, Any], target: Any) -> bytes:
        return bytes(self._raw(node))

    def _decode_bytearray(self, node: dict[str, Any], target: Any) -> bytearray:
        return bytearray(self._raw(node))

    def _decode_ndarray(self, node: dict[str, Any], target: Any) -> np.ndarray:
        dtype = decode_dtype(node["dtype"])
        shape = tuple(int(n) for n in node["shape"])
        order = node.get("order", "C")
        stored_shape = shape[::-1] if order == "F" else shape
        fits = (
            isinstance(target, np.ndarray)
            and target.dtype == dtype
            and target.shape == shape
            and target.flags.writeable
            and (target.flags.c_contiguous if order == "C" else target.flags.f_contiguous)
        )
        into = _bytes_view(target if order == "C" else target.T) if fits and target.nbytes else None
        raw = self._raw(node, into)
        count = int(np.prod(stored_shape, dtype=np.int64))
        expected = count * dtype.itemsize
        size = memoryview(raw).nbytes
        if size != expected:
            raise CorruptCheckpoint(f"array data has {size} bytes, expected {expected}")
        if fits:  # fill the caller's array in place (a blob may have been read straight into it)
            if into is not None and raw is not into:
                into[:] = raw
            return target
        if not expected:
            return np.empty(shape, dtype, order="F" if order == "F" else "C")
        buffer = raw if isinstance(raw, np.ndarray) else np.frombuffer(raw, dtype=np.uint8)
        array = buffer.view(dtype).reshape(stored_shape)
        return array.T if order == "F" else array

    def _decode_npscalar(self, node: dict[str, Any], target: Any) -> np.generic:
        dtype = decode_dtype(node["dtype"])
        data = _unb64(node["b64"])
        if len(data) != dtype.itemsize:
            raise CorruptCheckpoint(f"scalar data has {len(data)} bytes, expected {dtype.itemsize}")
        return np.ndarray((), dtype=dtype, buffer=data)[()].copy()

    def _decode_leaf(self, node: dict[str, Any], target: Any) -> Any:
        try:
            codec = codec_for_kind(node["kind"])
        except (KeyError, ImportError) as exc:
            raise UnsupportedType(
                f"this checkpoint holds {node['kind']} leaves; install the framework to load them",
                type_name=node["kind"]) from exc
        attrs = node.get("attrs") or {}
        # A live tensor of the same kind, dtype and shape is filled in place: no allocation.
        writable_view = getattr(codec, "writable_view", None)
        view = writable_view(target, attrs) if target is not None and writable_view else None
        array = self._decode_ndarray(node["array"], view)
        if view is not None and array is view:
            return target
        return codec.from_numpy(array, attrs)

    def _decode_pickle(self, node: dict[str, Any], target: Any) -> Any:
        if not self.allow_pickle:
            raise UnsafeCheckpoint(
                f"the checkpoint holds a pickled {node.get('type', 'object')}; loading it would "
                "run code from the checkpoint. Pass allow_pickle=True only if you trust it")
        return pickle.loads(self._raw(node))  # reads any buffer: no copy of a large blob


def _hashable(key: Any) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True


def no_blobs(index: int, into: Any) -> Any:
    """The ``load_blob`` of a Decoder for nodes that must be inline (metadata, scalars)."""
    raise CorruptCheckpoint(f"a node that must be inline refers to blob {index}")
