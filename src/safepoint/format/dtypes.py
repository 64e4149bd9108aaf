"""Numpy dtypes as JSON, and back: every dtype but ``object``, exactly (byte order,
structured fields, sub-arrays, datetimes, ``ml_dtypes`` types).

A string is numpy's ``dtype.str``; a structured dtype is an object with ``names``,
``formats``, ``offsets`` and ``itemsize`` (``titles`` and ``aligned`` when set, and a
``descr`` for people to read); a sub-array is ``{"subdtype", "shape"}``; an ``ml_dtypes``
type is ``{"ml_dtypes": "bfloat16"}``. :func:`decode_dtype` validates what it reads: a
manifest cannot make it build an object dtype, an absurd itemsize or a deep nesting.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from safepoint.errors import CorruptCheckpoint, UnsupportedType

ML_DTYPES = {
    "bfloat16": 2, "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e4m3b11fnuz": 1,
    "float8_e5m2": 1, "float8_e5m2fnuz": 1, "float8_e3m4": 1, "float8_e4m3": 1,
    "float8_e8m0fnu": 1, "float4_e2m1fn": 1, "float6_e2m3fn": 1, "float6_e3m2fn": 1,
    "int2": 1, "int4": 1, "uint2": 1, "uint4": 1,
}
"""The ml_dtypes types a manifest may name, with their item sizes in bytes."""

_MAX_ITEMSIZE = 1 << 30
_MAX_FIELDS = 10_000
_MAX_NESTING = 32


_TEXTS: dict[np.dtype, str] = {}  # dtypes described by a string, as described
_BY_TEXT: dict[str, np.dtype] = {}  # and back (the string as a manifest holds it)
_CACHED = 512  # most entries each cache keeps (dtypes with metadata are not the same key)


def encode_dtype(dtype: np.dtype) -> Any:
    """A JSON description of a numpy dtype that :func:`decode_dtype` rebuilds exactly.

    ``TypeError`` for object dtypes (they hold Python objects, not bytes).
    """
    text = _TEXTS.get(dtype)
    if text is not None:
        return text
    spec = _encode(dtype)
    if type(spec) is str and len(_TEXTS) < _CACHED:
        _TEXTS[dtype] = spec
    return spec


def _encode(dtype: np.dtype) -> Any:
    if type(dtype).__module__.startswith("ml_dtypes") or dtype.type.__module__.startswith("ml_dtypes"):
        return {"ml_dtypes": dtype.name}
    if dtype.fields is not None:
        names = list(dtype.names or ())
        spec: dict[str, Any] = {
            "descr": _descr_to_json(dtype.descr), "itemsize": dtype.itemsize, "names": names,
            "offsets": [dtype.fields[n][1] for n in names],
            "formats": [_encode(dtype.fields[n][0]) for n in names]}
        entries: dict[str, tuple[Any, ...]] = dict(dtype.fields)  # (dtype, offset[, title])
        titles = [entries[n][2] if len(entries[n]) > 2 else None for n in names]
        if any(t is not None for t in titles):
            spec["titles"] = titles
        if dtype.isalignedstruct:
            spec["aligned"] = True
        return spec
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        return {"subdtype": _encode(base), "shape": list(shape)}
    if dtype.kind == "O":
        raise TypeError("object arrays")
    return dtype.str


def _descr_to_json(descr: Any) -> Any:
    return [[name, _descr_to_json(fmt) if isinstance(fmt, list) else fmt, *rest]
            for name, fmt, *rest in descr]


def decode_dtype(spec: Any) -> np.dtype:
    """The dtype described by :func:`encode_dtype`'s output; never one holding objects.

    Damage raises :class:`CorruptCheckpoint`; an ml_dtypes type when ml_dtypes is not
    installed raises :class:`UnsupportedType` (the checkpoint is fine, this process is not).
    """
    if type(spec) is str:
        known = _BY_TEXT.get(spec)
        if known is not None:
            return known
    try:
        dtype = _decode(spec, 0)
    except (CorruptCheckpoint, UnsupportedType):
        raise
    except (TypeError, ValueError, KeyError, OverflowError, RecursionError) as exc:
        raise CorruptCheckpoint(f"unreadable dtype {_short(spec)} in manifest ({exc})") from exc
    if dtype.hasobject:
        raise CorruptCheckpoint(f"manifest names a dtype holding Python objects: {_short(spec)}")
    if dtype.itemsize > _MAX_ITEMSIZE:
        raise CorruptCheckpoint(f"manifest names a dtype of {dtype.itemsize} bytes per item")
    if type(spec) is str and len(_BY_TEXT) < _CACHED:
        _BY_TEXT[spec] = dtype
    return dtype


def itemsize_of(spec: Any) -> int:
    """The item size of a stored dtype, without needing ml_dtypes installed."""
    if isinstance(spec, dict) and "ml_dtypes" in spec:
        name = spec["ml_dtypes"]
        if name not in ML_DTYPES:
            raise CorruptCheckpoint(f"unknown ml_dtypes dtype {_short(name)} in manifest")
        return ML_DTYPES[name]
    return decode_dtype(spec).itemsize


def _decode(spec: Any, depth: int) -> np.dtype:
    if depth > _MAX_NESTING:
        raise CorruptCheckpoint("manifest names a dtype nested too deeply")
    if isinstance(spec, str):
        if len(spec) > 64:
            raise CorruptCheckpoint(f"unreadable dtype {_short(spec)} in manifest")
        return np.dtype(spec)
    if not isinstance(spec, dict):
        raise CorruptCheckpoint(f"unreadable dtype {_short(spec)} in manifest")
    if "ml_dtypes" in spec:
        name = spec["ml_dtypes"]
        if not isinstance(name, str) or name not in ML_DTYPES:
            raise CorruptCheckpoint(f"unknown ml_dtypes dtype {_short(name)} in manifest")
        try:
            import ml_dtypes
        except ImportError as exc:
            raise UnsupportedType(
                f"this checkpoint holds {name} arrays; install ml_dtypes to load them "
                "(pip install ml_dtypes, or safepoint[jax])", type_name=name) from exc
        return np.dtype(getattr(ml_dtypes, name))
    if "subdtype" in spec:
        shape = spec["shape"]
        if not (isinstance(shape, list) and len(shape) <= 32
                and all(type(n) is int and 0 <= n < 1 << 31 for n in shape)):
            raise CorruptCheckpoint(f"bad sub-array shape {_short(shape)} in a dtype")
        return np.dtype((_decode(spec["subdtype"], depth + 1), tuple(shape)))
    if "names" in spec:
        names, formats, offsets = spec["names"], spec["formats"], spec["offsets"]
        if not (isinstance(names, list) and isinstance(formats, list) and isinstance(offsets, list)
                and len(names) == len(formats) == len(offsets) <= _MAX_FIELDS
                and all(isinstance(n, str) for n in names)
                and all(type(o) is int and 0 <= o <= _MAX_ITEMSIZE for o in offsets)
                and type(spec["itemsize"]) is int and 0 <= spec["itemsize"] <= _MAX_ITEMSIZE):
            raise CorruptCheckpoint("bad structured dtype in manifest")
        fields: dict[str, Any] = {
            "names": names,
            "formats": [_decode(f, depth + 1) for f in formats],
            "offsets": offsets,
            "itemsize": spec["itemsize"],
        }
        if "titles" in spec:
            fields["titles"] = spec["titles"]
        return np.dtype(fields, align=bool(spec.get("aligned")))  # type: ignore[call-overload]
    raise CorruptCheckpoint(f"unreadable dtype {_short(spec)} in manifest")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def dtype_label(spec: Any) -> tuple[str, int]:
    """A readable name for a stored dtype (with its byte order where not native) and its
    item size; works for ml_dtypes names without ml_dtypes installed."""
    if isinstance(spec, dict) and "ml_dtypes" in spec:
        return str(spec["ml_dtypes"]), itemsize_of(spec)
    dtype = decode_dtype(spec)
    if dtype.fields is not None or dtype.kind in "USV":
        return str(dtype), dtype.itemsize  # '<U5', '|S3', "[('x', '<f4'), ...]"
    label = dtype.name
    if dtype.byteorder in "<>":  # numpy writes the native order as "="
        label += " (big-endian)" if dtype.byteorder == ">" else " (little-endian)"
    return label, dtype.itemsize


__all__ = ["ML_DTYPES", "decode_dtype", "dtype_label", "encode_dtype", "itemsize_of"]
