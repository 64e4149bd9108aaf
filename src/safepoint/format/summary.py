"""What ``safepoint show`` prints about a state tree: one row per leaf, from the manifest
alone (no blob is read). Call it on a tree that :func:`~safepoint.format.read.check_tree`
accepted: it never fails on an intact checkpoint."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from typing import Any

from safepoint.errors import CorruptCheckpoint
from safepoint.format.dtypes import dtype_label
from safepoint.format.tree import decode_inline, key_text

Row = tuple[str, str, str, str, int]
"""(path, type, dtype, shape or value, bytes)."""


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _value_text(value: Any) -> str:
    if type(value) is int and value.bit_length() > 128:
        return f"<{value.bit_length()}-bit int>"
    return _short(repr(value))


def _count(shape: Any) -> int:
    count = 1
    for n in shape:
        count *= int(n)
    return count


def iter_tree_summary(
    node: Any, path: str = "state", *, blobs: list[dict[str, Any]] | None = None
) -> Iterator[Row]:
    """One row per leaf of a node (see :data:`Row`)."""
    if isinstance(node, list):
        if not node:
            yield path, "list", "", "0 items", 0
        for i, v in enumerate(node):
            yield from iter_tree_summary(v, f"{path}[{i}]", blobs=blobs)
        return
    if not isinstance(node, dict):
        yield path, type(node).__name__, "", _value_text(node), 0
        return
    tag = node.get("$")
    if tag is None:
        if not node:
            yield path, "dict", "", "0 items", 0
        for k, v in node.items():
            yield from iter_tree_summary(v, f"{path}[{key_text(k)}]", blobs=blobs)
    elif tag == "tuple":
        if not node["items"]:
            yield path, "tuple", "", "0 items", 0
        for i, v in enumerate(node["items"]):
            yield from iter_tree_summary(v, f"{path}[{i}]", blobs=blobs)
    elif tag in ("dict", "odict"):
        if not node["items"]:
            yield path, "dict", "", "0 items", 0
        for k, v in node["items"]:
            try:
                key = _value_text(decode_inline(k))
            except CorruptCheckpoint:
                key = "?"
            yield from iter_tree_summary(v, f"{path}[{key}]", blobs=blobs)
    elif tag == "ndarray":
        label, itemsize = dtype_label(node["dtype"])
        shape = tuple(node["shape"])
        yield path, "ndarray", label, str(shape), _count(shape) * itemsize
    elif tag == "npscalar":
        label, itemsize = dtype_label(node["dtype"])
        yield path, "numpy scalar", label, "()", itemsize
    elif tag == "leaf":
        inner = node["array"]
        shape = tuple(inner["shape"])
        label, itemsize = dtype_label(inner["dtype"])
        dname = str((node.get("attrs") or {}).get("dtype") or label)
        yield path, node["kind"], dname, str(shape), _count(shape) * itemsize
    elif tag == "sharded":  # a global array in blocks (a distributed save)
        shape = tuple(node["shape"])
        label, itemsize = dtype_label(node["dtype"])
        dname = str((node.get("attrs") or {}).get("dtype") or label)
        kind = f"{node.get('kind') or 'ndarray'} in {len(node['shards'])} shards"
        yield path, kind, dname, str(shape), _count(shape) * itemsize
    elif tag == "perrank":
        for rank, value in enumerate(node["ranks"]):
            yield from iter_tree_summary(value, f"{path}<rank {rank}>", blobs=blobs)
    elif tag in ("bytes", "bytearray", "pickle"):
        yield path, str(node.get("type", tag)), "", "", _data_size(node, blobs)
    elif tag in ("int", "float", "complex"):
        yield path, tag, "", _value_text(decode_inline(node)), 0
    else:
        yield path, str(tag), "", "", 0


def _data_size(node: dict[str, Any], blobs: list[dict[str, Any]] | None) -> int:
    if "b64" in node:
        try:
            return len(base64.b64decode(node["b64"], validate=True))
        except (binascii.Error, ValueError):
            return 0
    index = node.get("blob")
    if blobs is not None and type(index) is int and 0 <= index < len(blobs):
        return int(blobs[index]["size"])
    return 0


__all__ = ["Row", "iter_tree_summary"]
