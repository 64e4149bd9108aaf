"""Sharded leaves: one rank's part of a global array, and values that differ per rank.

A distributed save has every rank encode its own state tree. A :class:`Shard` leaf (this
rank's block of a global array: its data, its offsets, the global shape) becomes a blob
in that rank's own data files, cut into byte ranges of about
:data:`~safepoint.knobs.SHARD_RANGE` bytes, each with its CRC-32C, so that a restore on
another world size reads only the ranges it needs and still verifies what it reads. A
:class:`PerRank` value is saved by every rank. Everything else is *replicated*: the
coordinator (rank 0) saves it once.

The coordinator merges the ranks' parts (:func:`merge_parts`) into one manifest, in which a
global array is one node naming every rank's shard, and a per-rank value one node per rank::

    {"$": "sharded", "dtype": "<f4", "shape": [1024, 64],
     "shards": [{"at": [0, 0], "shape": [512, 64], "blob": 3}, ...]}
    {"$": "perrank", "ranks": [<node of rank 0>, <node of rank 1>, ...]}

Packing, chunking and sharding fill the one model of byte ranges: a shard's blob is an
ordinary blob whose data file is its rank's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from safepoint import knobs
from safepoint.errors import CorruptCheckpoint, StateMismatch
from safepoint.format.codecs import KNOWN_KINDS, codec_for_kind
from safepoint.format.dtypes import decode_dtype

_SHAPE_ERROR = "offsets and global_shape must be sequences of non-negative ints"


class Shard:
    """This rank's block of a global array, for a distributed checkpoint.

    ``data``: the local block (numpy, torch or jax array); ``offsets``: where its first
    element sits in the global array; ``global_shape``: the global array's shape. Save
    ``{"w": Shard(local, (rank * 512, 0), (2048, 64))}`` from every rank; restore into a
    ``Shard`` of any layout (another world size) to read just that block, or without a
    target to get the whole global array.
    """

    __slots__ = ("data", "global_shape", "offsets")

    def __init__(self, data: Any, offsets: tuple[int, ...] | list[int],
                 global_shape: tuple[int, ...] | list[int]) -> None:
        shape = tuple(int(n) for n in getattr(data, "shape", ()))
        try:
            at = tuple(_index(n) for n in offsets)
            whole = tuple(_index(n) for n in global_shape)
        except TypeError:
            raise TypeError(f"Shard: {_SHAPE_ERROR}, got offsets={offsets!r}, "
                            f"global_shape={global_shape!r}") from None
        if not hasattr(data, "shape") or len(at) != len(shape) or len(whole) != len(shape):
            raise ValueError(
                f"Shard: a block of shape {shape} needs {len(shape)} offsets and a global shape "
                f"of {len(shape)} dimensions, got offsets={at} and global_shape={whole}")
        outside = [d for d in range(len(shape)) if at[d] + shape[d] > whole[d]]
        if outside:
            raise ValueError(
                f"Shard: the block of shape {shape} at offsets {at} does not fit in the global "
                f"shape {whole} (dimension {outside[0]}); give the global array's shape")
        self.data, self.offsets, self.global_shape = data, at, whole

    @property
    def shape(self) -> tuple[int, ...]:
        """The local block's shape."""
        return tuple(int(n) for n in self.data.shape)

    def __repr__(self) -> str:
        return (f"Shard({type(self.data).__name__} of shape {self.shape}, offsets={self.offsets}, "
                f"global_shape={self.global_shape})")


class PerRank:
    """A value that differs from rank to rank (a per-rank RNG, a rank's own counters): every
    rank saves its own, and a restore on the same world size gives each rank its own back.
    On another world size there is no rank to take it from: a restore into a ``PerRank``
    target refuses it (:class:`~safepoint.errors.StateMismatch`), one without gives the list
    of all ranks' values, as does a restore without ranks (one process, ``safepoint show``)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"PerRank({self.value!r})"


def _index(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise TypeError(value)
    return int(value)


# ------------------------------------------------------------------ merging parts


@dataclass
class Part:
    """What one rank wrote for a distributed save: its data files (keys relative to the
    name's folder, sizes), its blobs (ranges into those files), its shards and per-rank
    values (tree path, node)."""

    rank: int
    files: list[list[Any]]
    blobs: list[dict[str, Any]]
    shards: list[list[Any]]
    per_rank: list[list[Any]]
    pickled: list[str]
    save_id: str = ""

    @staticmethod
    def nodes(entries: list[list[Any]]) -> list[list[Any]]:
        """Copies of a tree's shard or per-rank nodes as they are before a merge (which
        changes the tree's own in place)."""
        return [[path, dict(node)] for path, node in entries]

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "files": self.files, "blobs": self.blobs,
                "shards": self.shards, "per_rank": self.per_rank, "pickled": self.pickled,
                "save_id": self.save_id}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Part:
        return cls(int(data["rank"]), data["files"], data["blobs"], data["shards"],
                   data["per_rank"], data["pickled"], str(data.get("save_id", "")))


def _remap(node: Any, offset: int) -> Any:
    """A copy of ``node`` whose blob indexes are ``offset`` higher (a rank's nodes in the
    global manifest, whose blob list is every rank's in turn)."""
    if type(node) is list:
        return [_remap(v, offset) for v in node]
    if type(node) is not dict:
        return node
    out = {k: _remap(v, offset) for k, v in node.items()}
    if "$" in node and type(node.get("blob")) is int:
        out["blob"] = node["blob"] + offset
    return out


def merge_parts(parts: list[Part], shards: list[list[Any]], per_rank: list[list[Any]],
                ) -> tuple[list[list[Any]], list[dict[str, Any]], list[str]]:
    """Merge every rank's part (the coordinator's first); ``shards`` and ``per_rank``: the
    coordinator's own nodes in its tree (``[path, node]``), changed in place into global
    ones (again identically, when a commit is retried); returns the global file table,
    blob list and pickled paths. Raises :class:`StateMismatch` when the ranks' states do not
    fit together (a shard path one rank lacks, shapes that differ, blocks that overlap or
    leave part of a global array uncovered)."""
    files: list[list[Any]] = []
    blobs: list[dict[str, Any]] = []
    pickled: list[str] = []
    shard_nodes: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    values: dict[str, list[Any]] = {}
    for part in parts:
        file_base, blob_base = len(files), len(blobs)
        files.extend(part.files)
        for blob in part.blobs:
            blobs.append({**blob, "ranges": [[fi + file_base, *rest] for fi, *rest in blob["ranges"]]})
        pickled.extend(part.pickled)  # other ranks encode their shards and PerRank values only
        for path, node in part.shards:
            shard_nodes.setdefault(path, []).append((part.rank, _remap(node, blob_base)))
        for path, node in part.per_rank:
            values.setdefault(path, []).append(_remap(node["value"], blob_base))
    own = {path: node for path, node in shards}
    for path, found in shard_nodes.items():
        if path not in own:
            raise StateMismatch(f"rank {found[0][0]} saved a Shard at {path}, which rank 0's state "
                             "does not have; every rank must save the same tree structure")
        node = own[path]
        merged = _merge_shards(path, found, len(parts))
        node.clear()
        node.update(merged)
    own_values = {path: node for path, node in per_rank}
    for path, nodes in values.items():
        if path not in own_values or len(nodes) != len(parts):
            raise StateMismatch(f"{path}: a PerRank value is saved by {len(nodes)} of {len(parts)} "
                             "ranks; every rank must save the same tree structure")
        node = own_values[path]
        node.clear()
        node.update({"$": "perrank", "ranks": nodes})
    return files, blobs, pickled


def _merge_shards(path: str, found: list[tuple[int, dict[str, Any]]], ranks: int) -> dict[str, Any]:
    first = found[0][1]
    head = {k: first.get(k) for k in ("shape", "kind", "attrs")}
    dtype = first["array"]["dtype"]
    seen: dict[tuple[tuple[int, ...], tuple[int, ...]], dict[str, Any]] = {}
    for rank, node in found:
        here = {k: node.get(k) for k in ("shape", "kind", "attrs")}
        if here != head or node["array"]["dtype"] != dtype:
            raise StateMismatch(
                f"{path}: rank {rank} saved a shard of a {node['array']['dtype']} array of "
                f"global shape {node['shape']}, rank {found[0][0]} of a {dtype} array of global "
                f"shape {first['shape']}; every rank must describe the same global array")
        array = node["array"]
        key = (tuple(node["at"]), tuple(array["shape"]))
        if key not in seen:  # a replicated block (several ranks hold it): saved once
            entry = {"at": node["at"], "shape": array["shape"]}
            entry.update({k: array[k] for k in ("blob", "b64") if k in array})
            seen[key] = entry
    shards = list(seen.values())
    problem = coverage_problem(first["shape"], [(s["at"], s["shape"]) for s in shards])
    if problem:
        raise StateMismatch(f"{path}: the {ranks} ranks' shards {problem}; each element of the "
                         "global array must be in exactly one block (identical blocks count once)")
    out: dict[str, Any] = {"$": "sharded", "dtype": dtype, "shape": first["shape"], "shards": shards}
    if first.get("kind") is not None:
        out["kind"], out["attrs"] = first["kind"], first.get("attrs") or {}
    return out


def coverage_problem(shape: list[int], blocks: list[tuple[list[int], list[int]]]) -> str | None:
    """Why ``blocks`` (offsets, shape) do not tile ``shape`` exactly, or None."""
    total = int(np.prod(shape, dtype=object))
    covered = sum(int(np.prod(b, dtype=object)) for _, b in blocks)
    if not blocks:
        return "are missing" if total else None
    lo = np.array([a for a, _ in blocks], dtype=np.int64).reshape(len(blocks), -1)
    hi = lo + np.array([b for _, b in blocks], dtype=np.int64).reshape(len(blocks), -1)
    nonempty = np.all(hi > lo, axis=1)
    lo, hi = lo[nonempty], hi[nonempty]
    for start in range(0, len(lo), 512):  # pairwise, in slabs: bounded memory
        a_lo, a_hi = lo[start : start + 512, None], hi[start : start + 512, None]
        overlap = np.all((a_lo < hi[None]) & (lo[None] < a_hi), axis=2)
        rows, cols = np.nonzero(overlap)
        clash = [(start + r, c) for r, c in zip(rows.tolist(), cols.tolist(), strict=True)
                 if start + r != c]
        if clash:
            i, j = clash[0]
            return (f"overlap: the block at {lo[i].tolist()} and the block at {lo[j].tolist()} "
                    "share elements")
    if covered != total:
        return f"cover {covered} of the global shape {shape}'s {total} elements"
    return None


# ------------------------------------------------------------------ decoding


def _fail(path: str, message: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"{path}: {message}")


def _ints(value: Any, count: int | None = None) -> tuple[int, ...] | None:
    if type(value) is not list or len(value) > knobs.MAX_DIMS or (
            count is not None and len(value) != count):
        return None
    if not all(type(n) is int and 0 <= n < 2**62 for n in value):
        return None
    return tuple(value)


@dataclass
class Block:
    """One saved shard of a global array, validated."""

    at: tuple[int, ...]
    shape: tuple[int, ...]
    index: int | None  # blob index, or None for inline data
    data: bytes | None


def check_sharded(node: dict[str, Any], path: str,
                  data_of: Callable[[dict[str, Any], int], tuple[bytes | None, int | None, int]],
                  ) -> tuple[np.dtype[Any], tuple[int, ...], list[Block]]:
    """Validate a ``sharded`` node (dtype, shape, every block inside it, their data sizes,
    an exact tiling); returns them."""
    dtype = decode_dtype(node["dtype"])
    shape = _ints(node["shape"])
    if shape is None:
        raise _fail(path, f"bad global shape {node['shape']!r}")
    listed = node["shards"]
    if type(listed) is not list or len(listed) > knobs.MAX_SHARDS:
        raise _fail(path, f"a sharded array needs a list of at most {knobs.MAX_SHARDS} shards")
    blocks = []
    for i, entry in enumerate(listed):
        if type(entry) is not dict:
            raise _fail(path, f"shard {i} is not an object")
        at, size = _ints(entry.get("at"), len(shape)), _ints(entry.get("shape"), len(shape))
        if at is None or size is None or any(a + n > g for a, n, g in zip(at, size, shape, strict=True)):
            raise _fail(path, f"shard {i} lies outside the global shape {list(shape)}")
        data, index, nbytes = data_of(entry, i)
        expected = int(np.prod(size, dtype=np.int64)) * dtype.itemsize
        if nbytes != expected:
            raise _fail(path, f"shard {i} has {nbytes} bytes, but {list(size)} {dtype} needs {expected}")
        blocks.append(Block(at, size, index, data))
    problem = coverage_problem(list(shape), [(list(b.at), list(b.shape)) for b in blocks])
    if problem:
        raise _fail(path, f"the shards {problem}")
    kind = node.get("kind")
    if kind is not None and (not isinstance(kind, str) or kind not in KNOWN_KINDS
                             or not isinstance(node.get("attrs", {}), dict)):
        raise _fail(path, f"unknown leaf kind {kind!r}")
    return dtype, shape, blocks


def _overlap(region_at: tuple[int, ...], region_shape: tuple[int, ...], block: Block
             ) -> tuple[tuple[slice, ...], tuple[int, ...], tuple[int, ...]] | None:
    """The part of ``block`` inside the region: (slices in the region, its start and stop in
    the block's own coordinates), or None."""
    lo = [max(a, b) for a, b in zip(region_at, block.at, strict=True)]
    hi = [min(a + n, b + m) for a, n, b, m in zip(region_at, region_shape, block.at, block.shape,
                                                 strict=True)]
    if any(h <= low for low, h in zip(lo, hi, strict=True)):
        return None
    into = tuple(slice(low - a, h - a) for low, h, a in zip(lo, hi, region_at, strict=True))
    start = tuple(low - b for low, b in zip(lo, block.at, strict=True))
    stop = tuple(h - b for h, b in zip(hi, block.at, strict=True))
    return into, start, stop


def plan_region(target: np.ndarray, region_at: tuple[int, ...], blocks: list[Block],
                fill_part: Callable[[np.ndarray, Block, int, int, tuple[int, ...], tuple[int, ...]], None],
                ) -> None:
    """Ask for every saved block's part of the region ``target`` covers (at ``region_at``):
    ``fill_part(destination, block, first byte, end byte, start, stop)``, where the bytes
    are the block's C-order bytes that hold its elements from ``start`` to ``stop``."""
    itemsize = target.dtype.itemsize
    for block in blocks:
        found = _overlap(region_at, target.shape, block)
        if found is None:
            continue
        into, start, stop = found
        strides = np.cumprod((1, *block.shape[:0:-1]), dtype=np.int64)[::-1]
        first = int(np.dot(start, strides)) * itemsize
        end = (int(np.dot([s - 1 for s in stop], strides)) + 1) * itemsize
        fill_part(target[into], block, first, end, start, stop)


def block_view(raw: np.ndarray, dtype: np.dtype[Any], block: Block, start: tuple[int, ...],
               stop: tuple[int, ...]) -> np.ndarray:
    """The elements ``start``..``stop`` of ``block`` from ``raw``: its C-order bytes from the
    first of them to the last (see :func:`plan_region`), as an array view."""
    flat = raw.view(dtype)
    strides = tuple(int(s) * dtype.itemsize for s in
                    np.cumprod((1, *block.shape[:0:-1]), dtype=np.int64)[::-1])
    shape = tuple(b - a for a, b in zip(start, stop, strict=True))
    return np.lib.stride_tricks.as_strided(flat, shape=shape, strides=strides, writeable=False)


def local_view(target: Shard, dtype: np.dtype[Any], shape: tuple[int, ...], kind: str | None,
               attrs: dict[str, Any], path: str) -> tuple[np.ndarray, Any]:
    """A writable numpy array to fill with ``target``'s block, and the value the restore
    returns: ``target`` itself when filled in place, else a new Shard of that array (whose
    data the caller turns into the framework's array once it is filled)."""
    if target.global_shape != shape:
        raise StateMismatch(
            f"{path}: the target Shard is a block of a global array of shape "
            f"{target.global_shape}, the checkpoint's array has shape {shape}; describe the "
            "saved array's global shape", tree_path=path)
    data = target.data
    view = data if isinstance(data, np.ndarray) else None
    codec = None
    if kind is not None and view is None:  # a numpy target needs no framework
        codec = codec_for_kind(kind)
        if getattr(codec, "writable_view", None) is not None:
            view = codec.writable_view(data, attrs)  # type: ignore[attr-defined]
    if view is not None:
        if view.dtype != dtype:
            raise StateMismatch(f"{path}: the target Shard holds {view.dtype} data, the "
                                f"checkpoint {dtype}; make them match", tree_path=path)
        if not view.flags.writeable:
            raise StateMismatch(f"{path}: the target Shard's array is read-only; pass a "
                                "writable one", tree_path=path)
        return view, target
    fresh = np.empty(target.shape, dtype)  # the caller makes the framework's array of it
    return fresh, Shard(fresh, target.offsets, target.global_shape)


__all__ = ["Block", "Part", "PerRank", "Shard", "block_view", "check_sharded",
           "coverage_problem", "local_view", "merge_parts", "plan_region"]
