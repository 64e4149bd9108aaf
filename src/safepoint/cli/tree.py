"""The rows ``safepoint show`` prints for a state tree, from its encoded form alone (no blob
is read): one row per leaf, except that a long container is one row ("list of 1,000 int").

Every row has the same keys (the ``--json`` schema of a tree row, docs/cli.md):
``path``, ``type``, ``dtype`` (empty without one), ``shape`` (a list of ints for arrays and
tensors, ``[]`` for a numpy scalar, else null), ``value`` (a scalar's value as text, else
null), ``nbytes`` (array or data bytes, summed over a summarized container) and ``items``
(a summarized or empty container's length, else null) with ``item_types`` (the types of
its items, the most frequent first).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from safepoint.errors import CorruptCheckpoint
from safepoint.format import iter_tree_summary
from safepoint.format.tree import decode_inline, key_text

SEQUENCE_LIMIT = 10
"""A list or tuple with more items than this is one row."""
MAPPING_LIMIT = 50
"""A dict with more keys than this is one row, unless its values are all arrays (a model's
state dict: each one is worth its row)."""

_ARRAYS = ("ndarray", "leaf", "sharded")
_CONTAINER_TYPES = {"tuple": "tuple", "dict": "dict", "odict": "OrderedDict"}


def _children(node: Any, path: str) -> tuple[str, list[tuple[str, Any]]] | None:
    """The container type and its (path, child) pairs; None for a leaf."""
    if isinstance(node, list):
        return "list", [(f"{path}[{i}]", v) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return None
    tag = node.get("$")
    if tag is None:
        return "dict", [(f"{path}[{key_text(k)}]", v) for k, v in node.items()]
    if tag == "tuple":
        return "tuple", [(f"{path}[{i}]", v) for i, v in enumerate(node["items"])]
    if tag == "perrank":  # a distributed save's per-rank value: one child per rank
        return "per rank", [(f"{path}<rank {i}>", v) for i, v in enumerate(node["ranks"])]
    if tag in ("dict", "odict"):
        pairs = []
        for k, v in node["items"]:
            try:
                key = key_text(decode_inline(k))
            except CorruptCheckpoint:
                key = "?"
            pairs.append((f"{path}[{key}]", v))
        return _CONTAINER_TYPES[tag], pairs
    return None


def _tag(node: Any) -> str | None:
    return node.get("$") if isinstance(node, dict) else None


def _leaf_row(node: Any, path: str, blobs: list[dict[str, Any]] | None) -> dict[str, Any]:
    _, kind, dtype, text, nbytes = next(iter_tree_summary(node, path, blobs=blobs))
    tag = _tag(node)
    shape: list[int] | None = None
    value: str | None = None
    if tag == "ndarray":
        shape = [int(n) for n in node["shape"]]
    elif tag == "leaf":
        shape = [int(n) for n in node["array"]["shape"]]
    elif tag == "sharded":
        shape = [int(n) for n in node["shape"]]
    elif tag == "npscalar":
        shape = []
        try:
            value = _short(repr(decode_inline(node).item()))
        except (CorruptCheckpoint, ValueError, TypeError):
            value = None
    elif tag not in ("bytes", "bytearray", "pickle"):
        value = text
    return {"path": path, "type": kind, "dtype": dtype, "shape": shape, "value": value,
            "nbytes": nbytes, "items": None, "item_types": None}


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _leaves(node: Any, path: str, blobs: list[dict[str, Any]] | None) -> Iterator[dict[str, Any]]:
    found = _children(node, path)
    if found is None:
        yield _leaf_row(node, path, blobs)
        return
    for child_path, child in found[1]:
        yield from _leaves(child, child_path, blobs)


def _type_of(node: Any, blobs: list[dict[str, Any]] | None) -> str:
    found = _children(node, "")
    return found[0] if found is not None else _leaf_row(node, "", blobs)["type"]


def _summarized(kind: str, pairs: list[tuple[str, Any]]) -> bool:
    if kind in ("list", "tuple"):
        return len(pairs) > SEQUENCE_LIMIT
    return len(pairs) > MAPPING_LIMIT and not all(_tag(v) in _ARRAYS for _, v in pairs)


def tree_rows(node: Any, path: str = "state", *, blobs: list[dict[str, Any]] | None = None,
              full: bool = False) -> list[dict[str, Any]]:
    """The rows of ``node`` (see the module docstring); ``full``: one per leaf, always."""
    rows: list[dict[str, Any]] = []

    def visit(node: Any, path: str) -> None:
        found = _children(node, path)
        if found is None:
            rows.append(_leaf_row(node, path, blobs))
            return
        kind, pairs = found
        if not pairs or (not full and _summarized(kind, pairs)):
            leaves = list(_leaves(node, path, blobs)) if pairs else []
            dtypes = {r["dtype"] for r in leaves}
            types = Counter(_type_of(child, blobs) for _, child in pairs)
            rows.append({"path": path, "type": kind,
                         "dtype": dtypes.pop() if len(dtypes) == 1 else "",
                         "shape": None, "value": None,
                         "nbytes": sum(r["nbytes"] for r in leaves), "items": len(pairs),
                         "item_types": [t for t, _ in types.most_common()]})
            return
        for child_path, child in pairs:
            visit(child, child_path)

    visit(node, path)
    return rows


def row_text(row: dict[str, Any]) -> str:
    """The shape/value cell of a row: ``(64, 64)``, ``0.25``, ``list of 1,000 int``."""
    if row["items"] is not None:
        if not row["items"]:
            return "0 items"
        types = row["item_types"] or []
        of = types[0] if len(types) == 1 else (
            "(" + ", ".join(types[:3]) + (", ..." if len(types) > 3 else "") + ")")
        return f"{row['type']} of {row['items']:,} {of}"
    if row["shape"] is not None:
        return str(tuple(row["shape"])) if row["value"] is None else row["value"]
    return row["value"] or ""


__all__ = ["MAPPING_LIMIT", "SEQUENCE_LIMIT", "row_text", "tree_rows"]
