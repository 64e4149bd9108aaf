"""Plain subtrees (JSON values that stand for themselves) take the fast path: checked a
container at a time, copied in C or shared, decoded without a walk. They must give exactly
what the full encoder gives: every type kept (bool, int, float, str, None, list, dict), and
everything else (tuples, subclasses, numpy scalars, "$" keys, non-str keys, non-finite
floats, ints beyond int64, cycles, excessive depth) left to the full encoder."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import math
import uuid
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safepoint import Checkpointer, knobs
from safepoint.errors import UnsupportedType
from safepoint.format.plain import dumps, loads, plain_json
from safepoint.format.tree import Encoder, is_plain, is_plain_node


class Color(enum.IntEnum):
    RED = 1


class Text(str):
    pass


class Plain(enum.Enum):
    A = 1


class Tag(enum.StrEnum):
    A = "a"


@dataclasses.dataclass
class Point:
    x: int
    y: int


def same(a: Any, b: Any) -> bool:
    """Equal, with the same type at every place (and NaN equal to NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


@pytest.mark.parametrize("value", [
    {}, [], {"a": 1, "b": [1.5, "x", None, True, False], "c": {"d": [[], {}]}},
    [-(2**63), 2**63 - 1, 0.0, -0.0, 1e308, "é", ""],
])
def test_plain_values_are_plain(value: Any) -> None:
    assert is_plain(value)
    assert is_plain_node(value)
    found = plain_json(value)
    if 2**63 - 1 in value:
        assert found is None  # beyond 53 bits: the C check leaves it to the Python one
        return
    assert found is not None
    assert same(loads(bytes(found)), value) and same(json.loads(bytes(found)), value)


@pytest.mark.parametrize("value", [
    (1, 2), [1, (2,)], {"$": 1}, {"a": {"$": "int"}}, {1: "a"}, {"a": {None: 1}},
    [2**63], [-(2**63) - 1], [float("nan")], {"x": float("inf")}, [-math.inf],
    OrderedDict(a=1), [np.float64(1.0)], [np.int64(1)], [b"bytes"], [1j],
])
def test_anything_else_takes_the_full_encoder(value: Any) -> None:
    assert not is_plain(value)
    assert plain_json(value) is None
    node = Encoder().encode(value)
    assert node != value or type(node) is not type(value)  # tagged: {"$": ...} somewhere


@pytest.mark.parametrize("value", [
    defaultdict(int, a=1), [Color.RED], [Text("x")], {Text("k"): 1}, {"a": {1, 2}},
    {"a": [{"b": {Text("k"): 1}}]},
])
def test_subclasses_and_sets_are_refused_as_before(value: Any) -> None:
    """json would write them as their base types; the full encoder refuses them."""
    assert not is_plain(value)
    assert plain_json(value) is None
    with pytest.raises(UnsupportedType):
        Encoder().encode(value)


def test_cycles_and_depth_are_left_to_the_full_encoder() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    assert not is_plain(cycle)
    deep: Any = []
    for _ in range(knobs.MAX_DEPTH + 1):
        deep = [deep]
    assert not is_plain(deep)
    assert not is_plain_node(deep)
    assert plain_json(cycle) is None and plain_json(deep) is None
    at_limit = deep[0][0]  # MAX_DEPTH containers: plain, on both paths alike
    assert plain_json(at_limit) is not None and is_plain(at_limit)
    assert plain_json(deep[0]) is None and not is_plain(deep[0])


@pytest.mark.parametrize("value", [
    [uuid.UUID(int=1)], {"when": datetime.datetime(2026, 1, 1)}, [Point(1, 2)], [Plain.A], [Tag.A],
    {"a": [(1, 2)]}, {"k": {"x": float("nan")}}, [np.zeros(2)], [memoryview(b"x")],
    [None, float("nan")], {"a": None, "b": [None, -math.inf]}, {"a": [{"b": [{"c": (None,)}]}]},
])
def test_the_c_check_refuses_what_orjson_would_write_as_something_else(value: Any) -> None:
    """orjson writes a UUID, a datetime, a dataclass, an Enum, a tuple or a NaN as plain
    JSON; none of them is plain, so none may take the fast path."""
    assert not is_plain(value)
    assert plain_json(value) is None


@pytest.mark.parametrize("value", [
    {"big": 2**60, "small": [1, 2]}, [{'"$': 1}], ["nullable"], {"a": "null", "b": None},
])
def test_what_the_c_check_cannot_tell_is_left_to_the_python_one(value: Any) -> None:
    """An int beyond 53 bits, a key ending in '"$' (the text search cannot tell it from a
    "$" key), "null" inside a str (the count of nulls cannot tell it from a NaN): still
    plain, still its own node."""
    assert plain_json(value) is None and is_plain(value)
    assert Encoder(share=True).encode(value) is value


@settings(max_examples=300, deadline=None)
@given(tree=st.recursive(st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**60), max_value=2**60),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5), st.sampled_from(["$", "x"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.tuples(inner),
                            st.dictionaries(st.one_of(st.sampled_from(["$", "a"]), st.text(max_size=3)),
                                            inner, max_size=4)), max_leaves=30))
def test_the_c_check_agrees_with_the_python_one(tree: Any) -> None:
    found = plain_json([tree])
    small = not any(type(v) is int and abs(v) >= 2**53 for v in _leaves(tree))
    assert (found is not None) == (is_plain([tree]) and small)
    if found is not None:
        assert same(loads(bytes(found)), [tree]) and same(json.loads(bytes(found)), [tree])


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [leaf for v in tree for leaf in _leaves(v)]
    return [tree]


@pytest.mark.parametrize("value", [
    {"big": 2**70, "neg": -(2**64) - 1, "u64": 2**64 - 1, "i64": -(2**63), "ns": 1_700_000_000_123_456_789},
    {"text": "\ud800 lone", "é": "ü", "emoji": "\U0001f600"},
    {"floats": [0.1, -0.0, 5e-324, 1.7976931348623157e308, 1e16, 123456789.123456789]},
])
def test_json_text_gives_back_exactly_what_was_written(value: Any) -> None:
    """orjson reads an int beyond 64 bits as a float and refuses lone surrogates: there the
    standard library writes or reads, so that every value comes back as it was."""
    text = dumps(value)
    assert same(loads(text), value)
    assert same(json.loads(text), value)  # strict JSON that any reader reads
    old = json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode()
    assert same(loads(old), value)  # manifests written by earlier versions


def test_json_text_refuses_what_is_not_strict_json() -> None:
    for text in (b"NaN", b"[Infinity]", b"[1,]", b'{"a":1}x', b"\xff"):
        with pytest.raises(ValueError):
            loads(text)


def test_a_plain_subtree_is_copied_unless_shared() -> None:
    tree = {"a": [1, 2], "b": {"c": "d"}}
    copied = Encoder().encode(tree)
    assert copied == tree and copied is not tree and copied["a"] is not tree["a"]
    assert Encoder(share=True).encode(tree) is tree
    mixed = {"plain": {"x": [1, 2]}, "array": np.zeros(3)}
    node = Encoder().encode(mixed)
    assert node["plain"] == mixed["plain"] and node["plain"] is not mixed["plain"]


leaves = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
    st.sampled_from(["$", "x"]),
)
trees = st.recursive(leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.tuples(inner, inner),
    st.dictionaries(st.one_of(st.sampled_from(["$", "a", "b"]), st.text(max_size=3)), inner, max_size=4),
    st.dictionaries(st.integers(-3, 3), inner, max_size=2),
), max_leaves=30)


@settings(max_examples=150, deadline=None)
@given(tree=trees)
def test_round_trips_keep_every_type(tmp_path_factory: pytest.TempPathFactory, tree: Any) -> None:
    store = tmp_path_factory.mktemp("plain")
    ckpt = Checkpointer("p", location=store, durable=False)
    state = {"tree": tree}
    ckpt.save(1, state)
    ckpt.save(2, state, blocking=False).wait()
    for step in (1, 2):
        assert same(ckpt.restore(step).state, state)


def test_restored_plain_state_is_the_callers_own(tmp_path: Path) -> None:
    ckpt = Checkpointer("p", location=tmp_path)
    state = {"history": [1.0, 2.0], "cfg": {"lr": 0.1}}
    pending = ckpt.save(1, state, blocking=False)
    state["history"].append(3.0)  # after the call: not in step 1
    state["cfg"]["lr"] = 9.9
    pending.wait()
    first, second = ckpt.restore(1).state, ckpt.restore(1).state
    assert first == {"history": [1.0, 2.0], "cfg": {"lr": 0.1}}
    first["history"].append(4.0)
    assert second["history"] == [1.0, 2.0]  # two restores share nothing
    manifest = ckpt.manifest(1)
    assert manifest.body["tree"]["history"] == [1.0, 2.0]
