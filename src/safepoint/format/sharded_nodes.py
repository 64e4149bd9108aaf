"""The state-tree nodes of distributed saves: a Shard's node and a PerRank value's node
as an :class:`~safepoint.format.tree.Encoder` writes them, and a ``sharded`` or ``perrank``
node as a :class:`~safepoint.format.tree.Decoder` reads it (into a target's block, reading
only the byte ranges that hold it). Kept apart from ``tree.py``, which calls them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from safepoint import knobs
from safepoint.errors import StateMismatch, UnsupportedType
from safepoint.format.codecs import LeafCodec, codec_for_kind
from safepoint.format.shards import (
    PerRank,
    Shard,
    block_view,
    check_sharded,
    local_view,
    plan_region,
)
from safepoint.format.tree import (
    Decoder,
    Encoder,
    TreePath,
    _describe_type,
    _fail,
    _mismatch,
    _path_text,
    _refuse_device_memory,
)


def encode_framework_shard(encoder: Encoder, obj: Any, path: TreePath | str,
                     codec: LeafCodec | None = None) -> dict[str, Any] | None:
    """The node of a framework's distributed array (a DTensor) as a Shard, else None."""
    codecs = [codec] if codec is not None else [c for c in encoder._codecs if c.matches(obj)]
    for found in codecs:
        as_shard = getattr(found, "as_shard", None)
        shard = as_shard(obj) if as_shard is not None else None
        if shard is not None:
            return encode_distributed(encoder, shard, path)
    return None

def encode_distributed(encoder: Encoder, obj: Shard | PerRank, path: TreePath | str) -> dict[str, Any]:
    """A Shard's node (its block as a ranged blob) or a PerRank value's node, noted for
    the merge of the ranks' parts (:func:`~safepoint.format.shards.merge_parts`)."""
    if encoder._in_per_rank:
        raise UnsupportedType(f"{path}: a {type(obj).__name__} inside a PerRank value; a "
                              "PerRank value is saved whole by each rank",
                              tree_path=str(path), type_name=type(obj).__name__)
    if isinstance(obj, PerRank):
        encoder._in_per_rank, only = True, encoder.shards_only
        encoder.shards_only = False
        try:
            placeholder = {"$": "perrank", "value": encoder.encode(obj.value, path)}
        finally:
            encoder._in_per_rank, encoder.shards_only = False, only
        encoder.per_rank.append([str(path), placeholder])
        return placeholder
    data, kind, attrs = obj.data, None, None
    if not isinstance(data, np.ndarray):
        codec = next((c for c in encoder._codecs if c.matches(data)), None)
        if codec is None:
            raise UnsupportedType(f"{path}: a Shard holds {_describe_type(data)}; a shard is "
                                  "a numpy, torch or jax array", tree_path=str(path),
                                  type_name=type(data).__name__)
        if encoder.host_only:
            _refuse_device_memory(codec, data, path)
        data, attrs = codec.to_numpy(data)
        kind = codec.kind
    array = np.ascontiguousarray(data)
    array_node = encoder._ndarray(array, path)
    if array_node.get("$") != "ndarray":
        raise UnsupportedType(f"{path}: a Shard of dtype {array.dtype} cannot be stored",
                              tree_path=str(path), type_name=str(array.dtype))
    if "blob" in array_node:
        step = max(1, knobs.SHARD_RANGE // max(array.dtype.itemsize, 1)) * array.dtype.itemsize
        encoder.blobs[array_node["blob"]].ranged = step
    node: dict[str, Any] = {"$": "shard", "shape": list(obj.global_shape),
                            "at": list(obj.offsets), "array": array_node}
    if kind is not None:
        node["kind"], node["attrs"] = kind, attrs
    encoder.shards.append([str(path), node])
    return node


def decode_sharded(decoder: Decoder, node: dict[str, Any], target: Any, path: Any, depth: int) -> Any:
    """A global array saved as shards: the whole array, or (into a :class:`Shard`
    target) just the target's block, reading only the byte ranges that hold it."""
    where = _path_text(path)
    dtype, shape, blocks = check_sharded(node, where, lambda entry, i: decoder._data(entry, (path, i)))
    if not decoder.build:
        return None
    kind, attrs = node.get("kind"), node.get("attrs") or {}
    region: tuple[int, ...] = (0,) * len(shape)
    own = False
    if target is not None and kind is not None and not isinstance(target, (Shard, np.ndarray)):
        as_shard = getattr(codec_for_kind(kind), "as_shard", None)
        shard = as_shard(target) if as_shard is not None else None
        if shard is not None:  # into a DTensor: its local tensor, in place
            view, filled = local_view(shard, dtype, shape, kind, attrs, where)
            if filled is not shard:
                raise StateMismatch(f"{where}: the target DTensor's local tensor cannot be "
                                    "filled in place (not on the CPU, or not contiguous)",
                                    tree_path=where)
            target, result, region = None, target, shard.offsets
            plan_region(view, region, blocks, _fill_part(decoder, dtype, own))
            return result
    if isinstance(target, Shard):
        view, result = local_view(target, dtype, shape, kind, attrs, where)
        region, own = target.offsets, result is not target
    elif isinstance(target, np.ndarray):
        if target.dtype != dtype or target.shape != shape:
            raise _mismatch(path, target, f"a {dtype} array of shape {shape}")
        if not target.flags.writeable:
            raise StateMismatch(f"{where}: the target array is read-only; pass a writable "
                                "array, or restore without into=", tree_path=where)
        view = result = target
    else:
        view, own = np.empty(shape, dtype), True
        result = view
    plan_region(view, region, blocks, _fill_part(decoder, dtype, own))
    if own and kind is not None:  # our own array: the framework's array of it
        codec = codec_for_kind(kind)
        if getattr(codec, "writable_view", None) is None:
            decoder.source.flush()  # a framework that copies (jax): fill the array first
        value = codec.from_numpy(view, attrs)
        if isinstance(result, Shard):
            result.data = value
        else:
            result = value
    return result

def _fill_part(decoder: Decoder, dtype: np.dtype[Any], own: bool) -> Callable[..., None]:
    def fill_part(dest: np.ndarray, block: Any, first: int, end: int,
                  start: tuple[int, ...], stop: tuple[int, ...]) -> None:
        decoder.source.fill_part(dest, block.index, block.data, first, end,
                              lambda raw: block_view(raw, dtype, block, start, stop), own=own)
    return fill_part

def decode_perrank(decoder: Decoder, node: dict[str, Any], target: Any, path: Any, depth: int) -> Any:
    """This rank's own value (saved by every rank), or all ranks' in a list."""
    ranks = node["ranks"]
    if type(ranks) is not list or not ranks:
        raise _fail(path, "a perrank node needs the list of every rank's value")
    if decoder.rank is None or not decoder.build or (
            decoder.rank[1] != len(ranks) and not isinstance(target, PerRank)):
        return [decoder.decode(v, None, (path, i), depth + 1) for i, v in enumerate(ranks)]
    rank, world = decoder.rank
    if world != len(ranks):  # the caller asked for its own: there is none
        where = _path_text(path)
        raise StateMismatch(
            f"{where}: a PerRank value saved by {len(ranks)} ranks cannot be restored on "
            f"{world}: there is no rank to take each one's from. Save it replicated (or "
            "derive it, e.g. an RNG from a seed and the step), or restore on "
            f"{len(ranks)} ranks", tree_path=where)
    sub = target.value if isinstance(target, PerRank) else target
    value = decoder.decode(ranks[rank], sub, (path, rank), depth + 1)
    return target if isinstance(target, PerRank) and value is sub else value


__all__ = ["decode_perrank", "decode_sharded", "encode_distributed", "encode_framework_shard"]
