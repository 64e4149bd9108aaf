"""Compare two steps of a name, and export one step into a format other tools load.

:func:`diff_steps` says which leaves were added, removed or changed between two steps. It
decides from the two manifests alone: a leaf's place in the tree, its type, dtype and
shape, and for data the size and CRC-32C of every byte range (``docs/format.md``), so that
identical arrays are never read. With ``values=True`` it then reads the changed numeric
leaves of both steps (and only those) to report their largest absolute difference.

:func:`export_step` writes one step's state as an ``.npz`` file, a ``.safetensors`` file
or a torch ``.pt`` file (``docs/export.md``): every array bit for bit, and a clear
:class:`~safepoint.errors.SafepointError` naming the leaf where the target format cannot
hold it.

torch and safetensors are imported only by the calls that need them.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import secrets
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from safepoint.checkpointer import Checkpointer
from safepoint.errors import (
    CheckpointNotFound,
    InvalidName,
    SafepointError,
    UnsafeCheckpoint,
    UnsupportedType,
)
from safepoint.format import Manifest, check_tree, iter_tree_summary, load_tree
from safepoint.format.dtypes import ML_DTYPES, decode_dtype
from safepoint.format.tree import decode_inline, key_text
from safepoint.store import Location

Status = Literal["added", "removed", "changed"]
ExportFormat = Literal["npz", "safetensors", "torch"]

FORMATS: dict[str, ExportFormat] = {
    ".npz": "npz", ".safetensors": "safetensors", ".pt": "torch", ".pth": "torch"}
"""File suffixes :func:`export_step` recognises, and the format each one means."""

_FORMAT_NAMES: dict[str, ExportFormat] = {
    "npz": "npz", "safetensors": "safetensors", "torch": "torch", "pt": "torch", "pth": "torch"}

SAFETENSORS_DTYPES = frozenset({
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64", "bfloat16", "float8_e4m3fn", "float8_e4m3fnuz",
    "float8_e5m2", "float8_e5m2fnuz", "complex64"})
"""The numpy dtype names (``ml_dtypes`` ones included) written to ``.safetensors`` files."""

_TORCH_FROM_NUMPY = frozenset({
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64", "complex64", "complex128"})
_TORCH_FROM_ML = frozenset({
    "bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
    "float8_e8m0fnu"})
_CARRIERS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


# =========================================================================== diff


@dataclass(frozen=True)
class LeafInfo:
    """One leaf of one step, as ``safepoint show`` lists it."""

    type: str
    """``ndarray``, ``torch.Tensor``, ``numpy scalar``, ``int``, ``str``, ``bytes``, ..."""
    dtype: str
    """The dtype's name (``float32``, ``bfloat16``); empty for leaves without one."""
    shape: tuple[int, ...] | None
    """The shape of an array or tensor (``()`` for a numpy scalar); None for other leaves."""
    value: str | None
    """A scalar's value, abridged as ``show`` prints it; None for arrays and data."""
    nbytes: int
    """Bytes of array or data payload (0 for plain values)."""

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "dtype": self.dtype,
                "shape": None if self.shape is None else list(self.shape),
                "value": self.value, "nbytes": self.nbytes}


@dataclass(frozen=True)
class LeafDiff:
    """A leaf that differs between the two steps."""

    path: str
    """Its place in the tree, as in ``safepoint show``: ``state['model']['w']``."""
    status: Status
    a: LeafInfo | None
    """The leaf in step ``a`` (None when it was added)."""
    b: LeafInfo | None
    """The leaf in step ``b`` (None when it was removed)."""
    changes: tuple[str, ...] = ()
    """What differs, for a changed leaf: any of ``type``, ``dtype``, ``shape``, ``value``
    (a scalar), ``data`` (the bytes of an array or a bytes value), ``order`` (C or Fortran
    memory order), ``attrs`` (a tensor's ``requires_grad``, device, ...)."""
    max_abs_diff: int | float | None = None
    """``max |b - a|`` over the elements, for a changed numeric leaf of the same shape in
    both steps when values were compared; an int for integer and bool leaves, a float
    otherwise (``nan`` when a nan faces a number; equal nans count as equal)."""

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "status": self.status, "changes": list(self.changes),
                "a": None if self.a is None else self.a.to_json(),
                "b": None if self.b is None else self.b.to_json(),
                "max_abs_diff": _json_number(self.max_abs_diff)}


@dataclass(frozen=True)
class StepDiff:
    """What :func:`diff_steps` found between steps ``a`` and ``b`` of ``name``."""

    name: str
    location: str
    a: int
    b: int
    leaves: list[LeafDiff]
    """Every leaf that differs, in tree order (step ``b``'s, with removed leaves where
    they stood in step ``a``)."""
    unchanged: int
    """How many leaves are the same in both steps."""
    values: bool
    """Whether the changed numeric leaves were read to compute ``max_abs_diff``."""

    @property
    def added(self) -> list[LeafDiff]:
        return [d for d in self.leaves if d.status == "added"]

    @property
    def removed(self) -> list[LeafDiff]:
        return [d for d in self.leaves if d.status == "removed"]

    @property
    def changed(self) -> list[LeafDiff]:
        return [d for d in self.leaves if d.status == "changed"]

    @property
    def identical(self) -> bool:
        return not self.leaves

    def to_json(self) -> dict[str, Any]:
        """A plain-JSON dict (non-finite differences as the strings ``"nan"``, ``"inf"``)."""
        return {
            "name": self.name, "location": self.location, "a": self.a, "b": self.b,
            "values": self.values, "identical": self.identical,
            "counts": {"added": len(self.added), "removed": len(self.removed),
                       "changed": len(self.changed), "unchanged": self.unchanged},
            "leaves": [d.to_json() for d in self.leaves],
        }


def _json_number(value: int | float | None) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


@dataclass
class _Leaf:
    path: str
    node: Any
    info: LeafInfo
    signature: str
    data: Any


def diff_steps(name: str, a: int, b: int, *, location: Location = None,
               values: bool = True) -> StepDiff:
    """Which leaves were added, removed or changed from step ``a`` to step ``b`` of ``name``.

    Leaves are matched by their tree path (as ``safepoint show`` prints it) and compared
    from the manifests alone: type, dtype, shape, scalar values, and the size and CRC-32C
    of the stored bytes of arrays and data, so that unchanged arrays are never read. Two
    leaves whose bytes have equal checksums count as equal (a change escapes only if it
    leaves every CRC-32C the same: about one chance in four billion per leaf). With
    ``values=True`` the changed numeric leaves of both steps, and only those, are read and
    verified to compute :attr:`LeafDiff.max_abs_diff`.

    Raises :class:`~safepoint.errors.CheckpointNotFound` for a missing name or step and
    :class:`~safepoint.errors.CorruptCheckpoint` for a damaged one.
    """
    ckpt = Checkpointer(name, location=location)
    steps = _steps_of(ckpt)
    ma, mb = _manifest(ckpt, a, steps), _manifest(ckpt, b, steps)
    leaves_a = {leaf.path: leaf for leaf in _leaves(ma)}
    leaves_b = {leaf.path: leaf for leaf in _leaves(mb)}
    diffs: list[LeafDiff] = []
    unchanged = 0
    to_compare: list[tuple[int, _Leaf, _Leaf]] = []
    for path in _merged_order(list(leaves_a), list(leaves_b)):
        la, lb = leaves_a.get(path), leaves_b.get(path)
        if la is None:
            assert lb is not None
            diffs.append(LeafDiff(path, "added", None, lb.info))
        elif lb is None:
            diffs.append(LeafDiff(path, "removed", la.info, None))
        elif la.signature == lb.signature:
            unchanged += 1
        else:
            diffs.append(LeafDiff(path, "changed", la.info, lb.info, _changes(la, lb)))
            if values and _comparable(la, lb):
                to_compare.append((len(diffs) - 1, la, lb))
    if to_compare:
        got_a = _read_values(ckpt, ma, [la for _, la, _ in to_compare])
        got_b = _read_values(ckpt, mb, [lb for _, _, lb in to_compare])
        for (index, _, _), va, vb in zip(to_compare, got_a, got_b, strict=True):
            old = diffs[index]
            diffs[index] = LeafDiff(old.path, old.status, old.a, old.b, old.changes,
                                    _max_abs_diff(va, vb))
    return StepDiff(name=ckpt.name, location=ckpt.store.url, a=int(a), b=int(b), leaves=diffs,
                    unchanged=unchanged, values=values)


def _steps_of(ckpt: Checkpointer) -> list[int]:
    steps = ckpt.steps()
    if not steps:
        raise CheckpointNotFound(
            f"no checkpoint named {ckpt.name!r} in {ckpt.store.url}; `safepoint ls "
            f"{ckpt.store.url}` lists what is there", name=ckpt.name)
    return steps


def _check_step_arg(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise InvalidName(f"step must be a non-negative int, not {step!r}", name=repr(step))
    return int(step)


def _missing_step(ckpt: Checkpointer, step: int, steps: list[int]) -> CheckpointNotFound:
    return CheckpointNotFound(
        f"{ckpt.name!r} has no step {step} in {ckpt.store.url}; its steps are "
        f"{_step_list(steps)}", name=ckpt.name, step=step)


def _step_list(steps: list[int], limit: int = 12) -> str:
    if len(steps) <= limit:
        return ", ".join(map(str, steps))
    return (f"{', '.join(map(str, steps[: limit // 2]))}, ... "
            f"{', '.join(map(str, steps[-limit // 2 :]))} ({len(steps)} in all)")


def _manifest(ckpt: Checkpointer, step: int, steps: list[int]) -> Manifest:
    step = _check_step_arg(step)
    if step not in steps:
        raise _missing_step(ckpt, step, steps)
    manifest = ckpt.manifest(step)
    check_tree(manifest, ckpt.store)
    return manifest


def _leaf_nodes(node: Any) -> Iterator[Any]:
    """The leaf nodes of a tree, in the order :func:`iter_tree_summary` lists them."""
    if isinstance(node, list):
        if not node:
            yield node
        for v in node:
            yield from _leaf_nodes(v)
        return
    if not isinstance(node, dict):
        yield node
        return
    tag = node.get("$")
    if tag is None:
        if not node:
            yield node
        for v in node.values():
            yield from _leaf_nodes(v)
    elif tag == "tuple":
        if not node["items"]:
            yield node
        for v in node["items"]:
            yield from _leaf_nodes(v)
    elif tag in ("dict", "odict"):
        if not node["items"]:
            yield node
        for _, v in node["items"]:
            yield from _leaf_nodes(v)
    else:
        yield node


def _leaves(manifest: Manifest) -> list[_Leaf]:
    tree, blobs = manifest.body["tree"], manifest.blobs
    rows = iter_tree_summary(tree, blobs=blobs)
    leaves, seen = [], set()
    for (path, kind, dtype, shape_text, nbytes), node in zip(rows, _leaf_nodes(tree), strict=True):
        unique, n = path, 1
        while unique in seen:  # abridged keys can make two paths alike
            n += 1
            unique = f"{path} #{n}"
        seen.add(unique)
        data = _data_of(node, blobs)
        leaves.append(_Leaf(unique, node, _info(node, kind, dtype, shape_text, nbytes),
                            _signature(node, data), data))
    return leaves


def _array_node(node: Any) -> dict[str, Any] | None:
    """The ndarray node of an array or tensor leaf, else None."""
    if isinstance(node, dict):
        if node.get("$") == "ndarray":
            return node
        if node.get("$") == "leaf":
            return node["array"]
    return None


def _info(node: Any, kind: str, dtype: str, shape_text: str, nbytes: int) -> LeafInfo:
    array = _array_node(node)
    if array is not None:
        return LeafInfo(kind, dtype, tuple(int(n) for n in array["shape"]), None, nbytes)
    if isinstance(node, dict) and node.get("$") == "npscalar":
        return LeafInfo(kind, dtype, (), _short(str(decode_inline(node))), nbytes)
    return LeafInfo(kind, dtype, None, shape_text or None, nbytes)


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _signature(node: Any, data: Any) -> str:
    """The leaf's node as canonical text, its blob reference (an index, which differs from
    step to step) replaced by ``data``, what identifies the blob's bytes."""
    if not isinstance(node, (dict, list)):
        return f"{type(node).__name__}:{node!r}"
    if isinstance(node, dict) and isinstance(node.get("blob"), int):
        node = {**node, "blob": data}
    elif isinstance(node, dict) and node.get("$") == "leaf" and "blob" in node["array"]:
        node = {**node, "array": {**node["array"], "blob": data}}
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def _changes(la: _Leaf, lb: _Leaf) -> tuple[str, ...]:
    a, b = la.info, lb.info
    changes = [what for what, differs in (
        ("type", a.type != b.type), ("dtype", a.dtype != b.dtype),
        ("shape", a.shape != b.shape)) if differs]
    array_a, array_b = _array_node(la.node), _array_node(lb.node)
    if array_a is not None and array_b is not None:
        if _attrs(la.node) != _attrs(lb.node):
            changes.append("attrs")
        if array_a.get("order", "C") != array_b.get("order", "C"):
            changes.append("order")
        if "dtype" not in changes and "shape" not in changes and la.data != lb.data:
            changes.append("data")
    elif a.value is not None or b.value is not None:
        if a.value != b.value or not changes:
            changes.append("value")
    elif la.data != lb.data:
        changes.append("data")
    return tuple(changes) or ("data",)


def _attrs(node: Any) -> dict[str, Any]:
    """A tensor leaf's attributes other than its dtype (requires_grad, device, ...)."""
    if isinstance(node, dict) and node.get("$") == "leaf":
        return {k: v for k, v in (node.get("attrs") or {}).items() if k != "dtype"}
    return {}


def _data_of(node: Any, blobs: list[dict[str, Any]]) -> Any:
    """What identifies a leaf's stored bytes: its base64 text, or its blob's size and the
    length and CRC-32C of each byte range; None for a leaf without data."""
    holder = _array_node(node)
    if holder is None:
        holder = node if isinstance(node, dict) and "$" in node else None
    if holder is None:
        return None
    if "b64" in holder:
        return holder["b64"]
    index = holder.get("blob")
    if type(index) is int and 0 <= index < len(blobs):
        blob = blobs[index]
        return [blob["size"], [[r[2], r[3]] for r in blob["ranges"]]]
    return None


def _is_number_node(node: Any) -> bool:
    if type(node) in (int, float):
        return True
    return isinstance(node, dict) and node.get("$") in ("int", "float")


def _comparable(la: _Leaf, lb: _Leaf) -> bool:
    """Whether both leaves are numeric and of one shape (so a difference can be computed)."""
    if _is_number_node(la.node) and _is_number_node(lb.node):
        return True
    if la.info.shape is None or la.info.shape != lb.info.shape:
        return False
    return _numeric_node(la.node) and _numeric_node(lb.node)


def _numeric_node(node: Any) -> bool:
    """Whether an array, tensor or numpy scalar node holds numbers (bool included)."""
    if not isinstance(node, dict):
        return False
    if node.get("$") == "leaf":
        attrs = node.get("attrs") or {}
        name = attrs.get("dtype")
        if "prng_impl" in attrs or name is None:  # jax key data: uint32 words
            return True
        return isinstance(name, str) and (name in ML_DTYPES or _numpy_numeric_name(name))
    spec = node.get("dtype")
    if isinstance(spec, dict):
        return "ml_dtypes" in spec
    try:
        return decode_dtype(spec).kind in "biufc"
    except SafepointError:
        return False


def _numpy_numeric_name(name: str) -> bool:
    try:
        return np.dtype(name).kind in "biufc"
    except TypeError:
        return False


def _read_values(ckpt: Checkpointer, manifest: Manifest, leaves: list[_Leaf]) -> list[Any]:
    """The values of ``leaves`` of one step, read in one pass over its data files (each
    range verified), as numpy arrays (tensors through their stored arrays) or numbers."""
    nodes = []
    for leaf in leaves:
        array = _array_node(leaf.node)
        nodes.append(leaf.node if array is None else array)
    loaded = load_tree(ckpt.store, manifest, node=nodes, mmap=True).tree
    out = []
    for leaf, value in zip(leaves, loaded, strict=True):
        if isinstance(leaf.node, dict) and leaf.node.get("$") == "leaf":
            value = _typed_view(value, (leaf.node.get("attrs") or {}).get("dtype"))
        out.append(value)
    return out


def _typed_view(array: np.ndarray, dtype_name: Any) -> np.ndarray | None:
    """A tensor leaf's stored array as its own dtype (bfloat16 is stored as uint16 bits);
    None when that dtype needs ml_dtypes and it is not installed (no difference then)."""
    if isinstance(dtype_name, str) and dtype_name in ML_DTYPES:
        try:
            return array.view(decode_dtype({"ml_dtypes": dtype_name}))
        except UnsupportedType:
            return None
    return array


def _max_abs_diff(x: Any, y: Any) -> int | float | None:
    if not isinstance(x, (np.ndarray, np.generic)) and not isinstance(y, (np.ndarray, np.generic)):
        return _number_diff(x, y)
    xa, ya = np.asarray(x), np.asarray(y)
    kx, ky = _kind(xa.dtype), _kind(ya.dtype)
    if xa.shape != ya.shape or kx is None or ky is None:
        return None
    if kx == ky == "int":
        return _int_diff(xa, ya) if xa.size else 0
    if not xa.size:
        return 0.0
    wide_input = any(d.type in (np.longdouble, np.clongdouble) for d in (xa.dtype, ya.dtype))
    if "complex" in (kx, ky):
        wide: type = np.clongdouble if wide_input else np.complex128
    else:
        wide = np.longdouble if wide_input else np.float64
    with np.errstate(invalid="ignore", over="ignore"):
        xw: np.ndarray = xa.astype(wide)
        yw: np.ndarray = ya.astype(wide)
        same = (xw == yw) | (np.isnan(xw) & np.isnan(yw))
        return float(np.where(same, 0, np.abs(xw - yw)).max())


def _number_diff(x: Any, y: Any) -> int | float | None:
    """``|y - x|`` of two plain numbers (not bools); None for anything else."""
    numbers = (int, float)
    if type(x) not in numbers or type(y) not in numbers:
        return None
    if type(x) is int and type(y) is int:
        return abs(x - y)
    if x == y or (x != x and y != y):  # equal, or both nan
        return 0.0
    try:
        return float(abs(x - y))
    except OverflowError:  # a float against an int too large for a float
        return math.inf


def _kind(dtype: np.dtype) -> str | None:
    if _is_ml_dtype(dtype):
        return "int" if dtype.name.startswith(("int", "uint")) else "float"
    return {"b": "int", "i": "int", "u": "int", "f": "float", "c": "complex"}.get(dtype.kind)


def _int_diff(x: np.ndarray, y: np.ndarray) -> int:
    """``max |x - y|`` of two integer (or bool) arrays, exactly, whatever their widths."""
    def u64(a: np.ndarray) -> bool:
        return a.dtype.kind == "u" and a.dtype.itemsize == 8

    if (u64(x) or u64(y)) and "i" in (x.dtype.kind, y.dtype.kind):
        # uint64 against a signed type: a difference may need 65 bits
        return max(abs(int(p) - int(q)) for p, q in zip(x.ravel().tolist(), y.ravel().tolist(),
                                                         strict=True))
    if u64(x) or u64(y):
        ux, uy = x.astype(np.uint64), y.astype(np.uint64)
    else:  # int64 mapped onto uint64 in order: every difference then fits exactly
        top = np.uint64(1 << 63)
        ux = x.astype(np.int64).view(np.uint64) ^ top
        uy = y.astype(np.int64).view(np.uint64) ^ top
    return int(np.where(ux > uy, ux - uy, uy - ux).max())


def _merged_order(a: list[str], b: list[str]) -> list[str]:
    """Every path of ``a`` and ``b`` once: ``b``'s order, with the paths only ``a`` has
    where they stood in ``a``."""
    merged: list[str] = []
    matcher = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag in ("delete", "replace"):
            merged += a[i1:i2]
        if tag in ("equal", "insert", "replace"):
            merged += b[j1:j2]
    seen: set[str] = set()
    return [p for p in merged if not (p in seen or seen.add(p))]  # type: ignore[func-returns-value]


# ========================================================================= export


@dataclass(frozen=True)
class ExportedEntry:
    """One leaf written by :func:`export_step`."""

    path: str
    """Its place in the tree, as in ``safepoint show``."""
    key: str | None
    """Its key in the file (``.npz`` and ``.safetensors``); None in a ``.pt`` file, which
    keeps the tree's own nesting."""
    kind: Literal["array", "metadata", "value"]
    """``array``: an array or tensor entry; ``metadata``: a plain value in the safetensors
    header metadata, as JSON; ``value``: a plain value kept as it is (``.pt``)."""
    type: str
    """The leaf's type in the state: ``ndarray``, ``torch.Tensor``, ``numpy scalar``,
    ``int``, ``str``, ``None``, ..."""
    dtype: str
    """The dtype of what was written (``float32``, ``bfloat16``); empty for plain values."""
    shape: tuple[int, ...] | None
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "key": self.key, "kind": self.kind, "type": self.type,
                "dtype": self.dtype,
                "shape": None if self.shape is None else list(self.shape), "nbytes": self.nbytes}


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_step` wrote."""

    name: str
    location: str
    step: int
    path: str
    """The file written (absolute)."""
    format: ExportFormat
    size: int
    """The file's size in bytes."""
    entries: list[ExportedEntry]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """``(tree path, why)`` of each leaf not written: empty containers in ``.npz`` and
    ``.safetensors`` files, and with ``skip_unsupported=True`` the leaves the format cannot
    hold."""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "location": self.location, "step": self.step,
                "path": self.path, "format": self.format, "size": self.size,
                "entries": [e.to_json() for e in self.entries],
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped]}


class _Refused(Exception):
    """A leaf the target format cannot hold (raised while walking, turned into an error)."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(why)
        self.path, self.why = path, why


_HINT = {
    "npz": "export to .safetensors or .pt instead",
    "safetensors": "export to .npz or .pt instead",
    "torch": "export to .npz instead",
}


def export_format(to: str | os.PathLike[str], format: str | None = None) -> ExportFormat:
    """The format :func:`export_step` writes for ``to`` and ``format``."""
    if format is not None:
        found = _FORMAT_NAMES.get(str(format).lower().lstrip("."))
        if found is None:
            raise SafepointError(
                f"unknown export format {format!r}; use npz, safetensors or torch")
        return found
    suffix = Path(to).suffix.lower()
    found = FORMATS.get(suffix)
    if found is None:
        raise SafepointError(
            f"cannot tell the export format from {os.fspath(to)!r}: name the file .npz, "
            ".safetensors or .pt, or give the format (npz, safetensors, torch)")
    return found


def export_step(
    name: str,
    *,
    step: int | None = None,
    to: str | os.PathLike[str],
    format: str | None = None,
    location: Location = None,
    overwrite: bool = False,
    skip_unsupported: bool = False,
) -> ExportResult:
    """Write one step's state (the newest intact one without ``step``) to the file ``to``.

    The format comes from the suffix (``.npz``, ``.safetensors``, ``.pt`` or ``.pth``)
    unless ``format`` (``"npz"``, ``"safetensors"`` or ``"torch"``) is given:

    - ``.npz``: one array per leaf, as ``numpy.savez`` writes them (``np.load`` reads them;
      no pickle). Plain numbers, bools and strings become 0-d arrays; bytes become uint8
      arrays.
    - ``.safetensors``: one tensor per array leaf; plain values (None, bools, numbers,
      strings) go into the header metadata as JSON text, under their key.
    - ``.pt``: ``torch.save`` of the state with its nesting kept, every array as a tensor;
      ``torch.load(path)`` (``weights_only=True``, the default) reads it.

    Keys of ``.npz`` and ``.safetensors`` files are the keys along a leaf's path joined
    with ``.``: ``state['model']['fc.weight']`` is ``model.fc.weight``, ``state['layers'][0]``
    is ``layers.0``, a state that is one leaf is ``state``. A leaf the format cannot hold
    raises :class:`~safepoint.errors.SafepointError` naming its path (with
    ``skip_unsupported=True`` it is left out and listed in :attr:`ExportResult.skipped`).
    The file appears complete or not at all; an existing file is replaced only with
    ``overwrite=True``.
    """
    fmt = export_format(to, format)
    target = Path(to).expanduser().absolute()
    _check_target(target, overwrite)
    ckpt = Checkpointer(name, location=location)
    steps = _steps_of(ckpt)
    if step is not None:
        step = _check_step_arg(step)
        if step not in steps:
            raise _missing_step(ckpt, step, steps)
    try:
        restored = ckpt.restore(step)
    except UnsafeCheckpoint as exc:
        where = ", ".join(exc.leaves[:5]) or "some leaves"
        raise SafepointError(
            f"{ckpt.name!r} in {ckpt.store.url} holds values stored with pickle ({where}); "
            "no export format holds arbitrary Python objects. Restore it in Python with "
            "allow_pickle=True (only if you trust it) and save the parts you need") from exc
    refused: list[tuple[str, str]] = []  # (path, why) of leaves the format cannot hold
    empty: list[tuple[str, str]] = []
    if fmt == "torch":
        torch = _import_torch()
        tree, entries = _torch_tree(torch, restored.state, refused)
    else:
        flat = _flatten(restored.state, fmt, refused, empty)
    if refused and not skip_unsupported:
        raise _refusal(refused, fmt)
    if fmt == "torch":
        _save_torch(torch, tree, target)
    else:
        entries = (_write_npz if fmt == "npz" else _write_safetensors)(flat, target)
    return ExportResult(name=ckpt.name, location=ckpt.store.url, step=restored.step,
                        path=str(target), format=fmt, size=target.stat().st_size,
                        entries=entries, skipped=empty + refused)


def _refusal(refused: list[tuple[str, str]], fmt: ExportFormat) -> SafepointError:
    path, why = refused[0]
    more = ""
    if len(refused) > 1:
        others = ", ".join(p for p, _ in refused[1:4]) + (", ..." if len(refused) > 4 else "")
        more = f" ({len(refused) - 1} more leaves cannot be written either: {others})"
    return SafepointError(
        f"{path}: {why}{more}; {_HINT[fmt]}, or pass --skip-unsupported "
        "(skip_unsupported=True) to leave such leaves out")


def _check_target(target: Path, overwrite: bool) -> None:
    if target.is_dir():
        raise SafepointError(f"{target} is a folder; give the path of the file to write")
    if not target.parent.is_dir():
        raise SafepointError(f"cannot write {target}: the folder {target.parent} does not exist")
    if target.exists() and not overwrite:
        raise SafepointError(
            f"{target} exists; pass --force (overwrite=True) to replace it")


@contextlib.contextmanager
def _atomic(target: Path) -> Iterator[Path]:
    """A temporary path next to ``target``, renamed to it once written and flushed."""
    temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        yield temp
        with open(temp, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


# -------------------------------------------------------- flattening (npz, safetensors)


@dataclass
class _Flat:
    path: str
    key: str
    type: str
    value: Any  # an np.ndarray, or a plain value bound for the safetensors metadata


def _key_part(key: Any, path: str) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
        return str(int(key))
    raise _Refused(path, f"a dict key of type {type(key).__name__} ({key_text(key)}) cannot "
                         "be part of a key in the file; only str and int keys can")


def _flatten(state: Any, fmt: ExportFormat, refused: list[tuple[str, str]],
             empty: list[tuple[str, str]]) -> list[_Flat]:
    """The leaves of ``state`` with their keys in the file, converted for ``fmt``; leaves
    the format cannot hold go to ``refused``, empty containers to ``empty``."""
    flat: list[_Flat] = []
    owners: dict[str, str] = {}

    def visit(value: Any, path: str, parts: tuple[str, ...]) -> None:
        if isinstance(value, (dict, list, tuple)):
            items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
            if not items:
                empty.append((path, f"an empty {type(value).__name__}: nothing to write"))
            for key, item in items:
                sub = f"{path}[{key_text(key)}]"
                try:
                    part = _key_part(key, sub)
                except _Refused as exc:
                    refused.append((exc.path, exc.why))
                    continue
                visit(item, sub, (*parts, part))
            return
        key = ".".join(parts) if parts else "state"
        try:
            if not key:
                raise _Refused(path, "its key in the file would be empty")
            converted = _flat_value(value, path, fmt)
        except _Refused as exc:
            refused.append((exc.path, exc.why))
            return
        if key in owners:
            raise SafepointError(
                f"{owners[key]} and {path} would both be the key {key!r} in the file; "
                "export to .pt, which keeps the nesting as it is")
        owners[key] = path
        flat.append(_Flat(path, key, _type_name(value), converted))

    visit(state, "state", ())
    return flat


def _flat_value(value: Any, path: str, fmt: ExportFormat) -> Any:
    """``value`` as a numpy array for the file (or a JSON-able value for the safetensors
    metadata); :class:`_Refused` where the format cannot hold it."""
    array = _to_numpy(value, path)
    where = "an .npz file" if fmt == "npz" else "a .safetensors file"
    if array is not None:
        if fmt == "npz":
            if array.dtype.hasobject:
                raise _Refused(path, f"{where} cannot hold an object array without pickle")
            if _is_ml_dtype(array.dtype):
                raise _Refused(path, f"{where} cannot record the dtype {array.dtype.name} "
                                     "(numpy would read it back as raw bytes)")
            return array
        if array.dtype.name not in SAFETENSORS_DTYPES or array.dtype.fields is not None:
            raise _Refused(path, f"{where} cannot hold a {_dtype_text(array.dtype)} array "
                                 "(it holds bool, integers, floats, bfloat16, float8 and "
                                 "complex64)")
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        return _c_order(array)
    if fmt == "safetensors":
        if value is None or type(value) in (bool, int, float, str):
            return value
        raise _Refused(path, f"{where} holds arrays, and plain values as JSON text in its "
                             f"metadata, but not a {type(value).__name__}")
    # npz: plain values become 0-d arrays, as np.savez makes them
    if isinstance(value, (bytes, bytearray)):
        return np.frombuffer(bytes(value), np.uint8).copy()
    if type(value) in (bool, int, float, complex, str):
        try:
            made = np.asarray(value)
        except OverflowError:
            made = np.asarray(None)
        if made.dtype.hasobject or (value == value and made[()].item() != value):
            raise _Refused(path, f"{where} cannot hold the {type(value).__name__} "
                                 f"{_short(repr(value))} exactly as an array")
        return made
    raise _Refused(path, f"{where} holds arrays, and numbers, bools and strings as 0-d "
                         f"arrays, but not {_describe(value)}")


def _describe(value: Any) -> str:
    if value is None:
        return "None"
    return f"a {type(value).__module__}.{type(value).__qualname__}" \
        if type(value).__module__ != "builtins" else f"a {type(value).__name__}"


def _dtype_text(dtype: np.dtype) -> str:
    return str(dtype) if dtype.fields is not None else dtype.name


def _c_order(array: np.ndarray) -> np.ndarray:
    """``array`` in C order (0-d stays 0-d, unlike ``np.ascontiguousarray``)."""
    return array if array.flags.c_contiguous else array.copy(order="C")


def _is_ml_dtype(dtype: np.dtype) -> bool:
    return dtype.type.__module__.startswith("ml_dtypes")


def _to_numpy(value: Any, path: str) -> np.ndarray | None:
    """An array or tensor leaf (numpy scalars as 0-d arrays) as a numpy array, bit for bit;
    None for other values."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, np.generic):
        return np.asarray(value)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return _tensor_to_numpy(value, path)
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(value, jax.Array):
        return np.asarray(value)
    return None


def _tensor_to_numpy(tensor: Any, path: str) -> np.ndarray:
    torch = sys.modules["torch"]
    tensor = tensor.detach().cpu().resolve_conj().resolve_neg()
    name = str(tensor.dtype).removeprefix("torch.")
    if name in _TORCH_FROM_NUMPY:
        return tensor.numpy()
    if name in _TORCH_FROM_ML and name in ML_DTYPES:
        ml_dtype = decode_dtype({"ml_dtypes": name})  # UnsupportedType without ml_dtypes
        carrier = getattr(torch, f"uint{8 * tensor.element_size()}")
        return tensor.view(carrier).numpy().view(ml_dtype)
    raise _Refused(path, f"a {name} tensor has no numpy equivalent")


# ------------------------------------------------------------------------ writers


def _write_npz(flat: list[_Flat], target: Path) -> list[ExportedEntry]:
    entries = []
    with _atomic(target) as temp, zipfile.ZipFile(
            temp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for item in flat:  # what np.savez writes: KEY.npy members, stored uncompressed
            with archive.open(item.key + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, item.value, allow_pickle=False)
            entries.append(_array_entry(item.path, item.key, item.type, item.value))
    return entries


def _write_safetensors(flat: list[_Flat], target: Path) -> list[ExportedEntry]:
    try:
        import safetensors.numpy
    except ImportError as exc:
        raise SafepointError("writing .safetensors files needs the safetensors package "
                             "(pip install safetensors)") from exc
    tensors: dict[str, np.ndarray] = {}
    metadata: dict[str, str] = {}
    entries = []
    for item in flat:
        if isinstance(item.value, np.ndarray):
            tensors[item.key] = item.value
            entries.append(_array_entry(item.path, item.key, item.type, item.value))
        else:
            metadata[item.key] = json.dumps(item.value)
            entries.append(ExportedEntry(item.path, item.key, "metadata", item.type, "", None, 0))
    with _atomic(target) as temp:
        try:
            safetensors.numpy.save_file(tensors, temp, metadata=metadata or None)
        except Exception as exc:  # SafetensorError and the like: one line, not a traceback
            if isinstance(exc, OSError):
                raise
            raise SafepointError(f"safetensors could not write {target}: {exc}") from exc
    return entries


def _type_name(value: Any) -> str:
    """A leaf's type as ``safepoint show`` names it."""
    if value is None:
        return "None"
    if isinstance(value, np.ndarray):
        return "ndarray"
    if isinstance(value, np.generic):
        return "numpy scalar"
    kind = type(value)
    if kind.__module__.split(".")[0] in ("torch", "jax", "jaxlib"):
        return "torch.Tensor" if kind.__module__.startswith("torch") else "jax.Array"
    return kind.__name__


def _array_entry(path: str, key: str | None, type_name: str, array: np.ndarray) -> ExportedEntry:
    return ExportedEntry(path, key, "array", type_name, _dtype_text(array.dtype),
                         tuple(array.shape), int(array.nbytes))


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise SafepointError(
            "writing .pt files needs torch (pip install safepoint[torch])") from exc
    return torch


def _torch_tree(torch: Any, state: Any, refused: list[tuple[str, str]]
                ) -> tuple[Any, list[ExportedEntry]]:
    """``state`` with its nesting kept, every array and numpy scalar as a tensor; leaves a
    ``.pt`` file cannot hold go to ``refused`` (and are left out)."""
    entries: list[ExportedEntry] = []
    omit = object()

    def convert(value: Any, path: str) -> Any:
        if isinstance(value, dict):
            out: dict[Any, Any] = OrderedDict() if isinstance(value, OrderedDict) else {}
            for key, item in value.items():
                got = convert(item, f"{path}[{key_text(key)}]")
                if got is not omit:
                    out[key] = got
            return out
        if isinstance(value, (list, tuple)):
            items = [convert(item, f"{path}[{i}]") for i, item in enumerate(value)]
            items = [item for item in items if item is not omit]
            return items if isinstance(value, list) else tuple(items)
        try:
            return leaf(value, path)
        except _Refused as exc:
            refused.append((exc.path, exc.why))
            return omit

    def leaf(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensor = value.detach()  # a plain tensor, as in a state dict
            entries.append(ExportedEntry(path, None, "array", "torch.Tensor",
                                         str(tensor.dtype).removeprefix("torch."),
                                         tuple(tensor.shape),
                                         tensor.element_size() * tensor.nelement()))
            return tensor
        array = _to_numpy(value, path)
        if array is not None:
            tensor = _numpy_to_tensor(torch, array, path)
            entries.append(_array_entry(path, None, _type_name(value), array))
            return tensor
        if value is None or type(value) in (bool, int, float, complex, str, bytes, bytearray):
            entries.append(ExportedEntry(path, None, "value", _type_name(value), "", None, 0))
            return value
        raise _Refused(path, f"a torch state dict file holds tensors and plain values, not "
                             f"{_describe(value)}")

    return convert(state, "state"), entries


def _save_torch(torch: Any, tree: Any, target: Path) -> None:
    with _atomic(target) as temp:
        try:
            torch.save(tree, temp)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise SafepointError(f"torch.save could not write {target}: {exc}") from exc


def _numpy_to_tensor(torch: Any, array: np.ndarray, path: str) -> Any:
    name = array.dtype.name
    if array.dtype.fields is None and array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    if not array.flags.writeable:
        array = array.copy()
    if name in _TORCH_FROM_NUMPY and array.dtype.fields is None:
        return torch.from_numpy(array)
    dtype = getattr(torch, name, None) if name in _TORCH_FROM_ML else None
    if dtype is not None and _is_ml_dtype(array.dtype):
        carrier = _CARRIERS[array.dtype.itemsize]
        return torch.from_numpy(_c_order(array).view(carrier)).view(dtype)
    raise _Refused(path, f"a torch tensor cannot hold a {_dtype_text(array.dtype)} array")


__all__ = [
    "FORMATS",
    "SAFETENSORS_DTYPES",
    "ExportFormat",
    "ExportResult",
    "ExportedEntry",
    "LeafDiff",
    "LeafInfo",
    "StepDiff",
    "diff_steps",
    "export_format",
    "export_step",
]
