"""State trees to manifest nodes and blobs: zero-copy writes, mmap reads, in-place restore,
the inline/blob boundary, and what cannot be stored."""

from __future__ import annotations

import mmap
import os
import pickle
import threading
import tracemalloc
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from safepoint.checkpointer import Checkpointer
from safepoint.errors import SafepointError, StateMismatch, UnsupportedType
from safepoint.format import iter_tree_summary, prepare
from safepoint.knobs import INLINE_LIMIT
from safepoint.store import LocalStore
from safepoint.store.base import Buffer


class RecordingStore(LocalStore):
    """A LocalStore that keeps every buffer handed to write_blob."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.chunks: list[Any] = []

    def write_blob(self, key: str, chunks: Iterable[Buffer], *, durable: bool) -> None:
        chunks = list(chunks)
        self.chunks.extend(chunks)
        super().write_blob(key, chunks, durable=durable)


def _address(buffer: Any) -> int:
    return np.frombuffer(buffer, np.uint8).ctypes.data


@pytest.mark.parametrize("dtype", ["<f8", "<i4", ">i4", "M8[ns]", [("a", "<i4"), ("b", "<f8")]])
def test_large_arrays_are_written_from_their_own_memory(tmp_path: Path, dtype: Any) -> None:
    array = np.zeros(100_000, dtype=dtype)
    store = RecordingStore(tmp_path)
    Checkpointer("zc", location=store).save(1, {"weights": array})
    assert len(store.chunks) == 1
    chunk = store.chunks[0]
    assert isinstance(chunk, memoryview)
    assert chunk.nbytes == array.nbytes
    assert _address(chunk) == array.ctypes.data  # the array's own bytes, not a copy
    base = chunk.obj
    while base is not array and isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    assert base is array


def test_a_plain_array_is_handed_over_as_a_view_of_itself(tmp_path: Path) -> None:
    array = np.arange(10_000, dtype=np.float64)
    store = RecordingStore(tmp_path)
    Checkpointer("zc", location=store).save(1, {"w": array})
    assert store.chunks[0].obj is array


def test_fortran_arrays_are_written_without_a_copy(tmp_path: Path) -> None:
    array = np.asfortranarray(np.arange(20_000, dtype=np.float32).reshape(100, 200))
    store = RecordingStore(tmp_path)
    ckpt = Checkpointer("zc", location=store)
    ckpt.save(1, {"w": array})
    assert _address(store.chunks[0]) == array.ctypes.data
    restored = ckpt.restore().state["w"]
    assert restored.flags.f_contiguous and np.array_equal(restored, array)


def test_small_arrays_live_in_the_manifest_and_large_ones_in_blobs() -> None:
    at_limit = np.zeros(INLINE_LIMIT, np.uint8)
    over = np.zeros(INLINE_LIMIT + 1, np.uint8)
    prepared = prepare({"at": at_limit, "over": over, "b": b"x" * (INLINE_LIMIT + 1)})
    assert "b64" in prepared.node["at"]
    assert prepared.node["over"]["blob"] == 0
    assert prepared.node["b"] == {"$": "bytes", "blob": 1}
    assert [b.tree_path for b in prepared.blobs] == ["state['over']", "state['b']"]


def test_mmap_restore_gives_read_only_arrays_backed_by_the_file(tmp_path: Path) -> None:
    array = np.arange(50_000, dtype=np.int64)
    store = LocalStore(tmp_path)
    ckpt = Checkpointer("mm", location=store)
    ckpt.save(1, {"a": array, "small": np.arange(3)})
    state = ckpt.restore(mmap=True).state
    mapped = state["a"]
    assert not mapped.flags.writeable
    with pytest.raises(ValueError):
        mapped[0] = 1
    base: Any = mapped
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)
    # the array is the file: a change to the file shows through the array
    manifest = ckpt.manifest(1)
    file, offset, _, _ = manifest.blobs[0]["ranges"][0]
    path = store.path(f"mm/{manifest.files[file][0]}")
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), np.int64(-7).tobytes(), offset + 8)
    assert mapped[1] == -7
    np.testing.assert_array_equal(state["small"], np.arange(3))  # inline arrays are plain


@pytest.mark.parametrize("size", [16, 200_000])
@pytest.mark.parametrize("order", ["C", "F"])
def test_restore_into_fills_existing_arrays_in_place(tmp_path: Path, size: int, order: str) -> None:
    saved = np.asarray(np.random.default_rng(0).random((size // 8, 8)), order=order)
    ckpt = Checkpointer("into", location=tmp_path)
    ckpt.save(3, {"w": saved, "n": 5})
    target = np.zeros_like(saved, order=order)
    live = {"w": target, "n": 0}
    tracemalloc.start()
    try:
        restored = ckpt.restore(into=live)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert restored.state["w"] is target
    assert restored.state["n"] == 5
    np.testing.assert_array_equal(target, saved)
    assert peak < max(saved.nbytes // 4, 64 << 10), "restore allocated a second copy of the array"


@pytest.mark.parametrize("wrong", [np.zeros(10_000, np.float64), np.zeros(9_999, np.float32),
                                   np.zeros((100, 100), np.float32)])
def test_restore_into_an_array_that_does_not_fit_is_refused(tmp_path: Path, wrong: np.ndarray) -> None:
    ckpt = Checkpointer("into", location=tmp_path)
    ckpt.save(1, {"w": np.arange(10_000, dtype=np.float32)})
    with pytest.raises(StateMismatch, match=r"state\['w'\]: the target holds") as info:
        ckpt.restore(into={"w": wrong})
    assert info.value.tree_path == "state['w']"
    assert not wrong.any()  # untouched
    with pytest.raises(StateMismatch):
        ckpt.restore(into={"w": np.zeros(10_000, np.float32), "missing": 1})


def test_restore_into_a_read_only_array_is_refused(tmp_path: Path) -> None:
    ckpt = Checkpointer("into", location=tmp_path)
    ckpt.save(1, {"w": np.arange(10_000, dtype=np.float32)})
    frozen = np.zeros(10_000, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(StateMismatch, match="read-only"):
        ckpt.restore(into={"w": frozen})


def test_ints_of_any_size_round_trip(tmp_path: Path) -> None:
    values = [0, -1, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 10**5000, -(7**9000)]
    ckpt = Checkpointer("ints", location=tmp_path)
    ckpt.save(1, {"v": values, "keys": {10**5000: "big key"}})
    state = ckpt.restore().state
    assert state["v"] == values and all(type(v) is int for v in state["v"])
    assert state["keys"] == {10**5000: "big key"}


class Foo:
    pass


def test_unsupported_values_are_named_by_their_path() -> None:
    state = {"model": {"layers": [1, 2, 3, Foo()]}}
    with pytest.raises(UnsupportedType) as info:
        prepare(state)
    message = str(info.value)
    assert message.startswith("state['model']['layers'][3]: cannot store a Foo")
    assert "allow_pickle=True" in message
    assert info.value.tree_path == "state['model']['layers'][3]"
    assert info.value.type_name.endswith(".Foo")


@pytest.mark.parametrize(("value", "described"), [
    (object(), "an object (builtins.object)"),
    (Foo(), "a Foo (test_format_tree.Foo)"),
    (type("Apple", (), {})(), "an Apple (test_format_tree.Apple)"),
    (lambda: 1, "a function (builtins.function)"),
])
def test_the_type_is_named_with_its_article(value: Any, described: str) -> None:
    with pytest.raises(UnsupportedType, match=r"^state\['x'\]: cannot store (.*?);") as info:
        prepare({"x": value})
    assert str(info.value).split("cannot store ", 1)[1].startswith(described + ";")


class Model:
    def __init__(self) -> None:
        self.weights = [1.0, 2.0]
        self.layers = [{"name": "a"}, {"name": "b", "lock": threading.Lock()}]


def _pickle_failure(state: Any) -> UnsupportedType:
    with pytest.raises(UnsupportedType) as info:
        prepare(state, allow_pickle=True)
    assert isinstance(info.value, SafepointError) and isinstance(info.value, TypeError)
    assert not isinstance(info.value, pickle.PicklingError)
    assert "allow_pickle=True" in str(info.value)
    assert "leave it out of the state and create it again after a resume" in str(info.value)
    return info.value


def test_a_value_pickle_refuses_is_named_by_its_path() -> None:
    error = _pickle_failure({"model": {"hook": lambda x: x, "ok": 1}})
    assert str(error).startswith("state['model']['hook']: cannot pickle a function "
                                 "(builtins.function) even with allow_pickle=True (")
    assert error.tree_path == "state['model']['hook']"
    assert isinstance(error.__cause__, pickle.PicklingError | AttributeError)

    error = _pickle_failure({"model": {"lock": threading.Lock()}})
    assert str(error).startswith("state['model']['lock']: cannot pickle a lock (_thread.lock)")


def test_the_part_of_an_object_that_pickle_refuses_is_named() -> None:
    error = _pickle_failure({"model": Model()})
    assert str(error).startswith(
        "state['model'].layers[1]['lock']: cannot pickle a lock (_thread.lock), inside a Model "
        "(test_format_tree.Model) at state['model'], even with allow_pickle=True")
    assert error.tree_path == "state['model'].layers[1]['lock']"
    assert error.type_name == "_thread.lock"


@pytest.mark.parametrize("value", [np.array([object()], dtype=object), {1, 2}, object(),
                                   {"k": lambda: 1}, {frozenset(): 1}])
def test_values_without_a_format_need_pickle(value: Any) -> None:
    with pytest.raises(UnsupportedType):
        prepare({"x": value})


def test_a_tree_that_contains_itself_is_refused() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(UnsupportedType, match="contains itself"):
        prepare(loop)


def test_tree_summary_shows_dtypes_shapes_and_sizes(tmp_path: Path) -> None:
    ckpt = Checkpointer("summary", location=tmp_path)
    ckpt.save(1, {
        "be": np.zeros((10, 2), dtype=">i4"),
        "le": np.zeros(3, dtype="<f8"),
        "rec": np.zeros(2, dtype=[("x", "<f4"), ("y", ">u2")]),
        "text": np.array(["ab", "c"]),
        "raw": b"x" * (INLINE_LIMIT + 10),
        "small": b"abc",
        "nan": float("nan"),
        "big": 2**70,
        "scalar": np.float16(1.5),
        "empty": (),
    })
    manifest = ckpt.manifest(1)
    rows = {row[0]: row[1:] for row in iter_tree_summary(manifest.body["tree"], blobs=manifest.blobs)}
    assert rows["state['be']"] == ("ndarray", "int32 (big-endian)", "(10, 2)", 80)
    assert rows["state['le']"] == ("ndarray", "float64", "(3,)", 24)
    assert rows["state['rec']"] == ("ndarray", "[('x', '<f4'), ('y', '>u2')]", "(2,)", 12)
    assert rows["state['text']"] == ("ndarray", "<U2", "(2,)", 16)
    assert rows["state['raw']"] == ("bytes", "", "", INLINE_LIMIT + 10)
    assert rows["state['small']"] == ("bytes", "", "", 3)
    assert rows["state['nan']"] == ("float", "", "nan", 0)
    assert rows["state['big']"] == ("int", "", str(2**70), 0)
    assert rows["state['scalar']"] == ("numpy scalar", "float16", "()", 2)
    assert rows["state['empty']"] == ("tuple", "", "0 items", 0)


def test_dtypes_that_look_alike_keep_their_own_description(tmp_path: Path) -> None:
    """Descriptions are remembered by dtype (and dtypes by description): dtypes that are
    close but not equal, asked for again and again in one tree, each keep their own."""
    from safepoint.format.dtypes import decode_dtype

    dtypes: list[Any] = ["<f4", ">f4", "M8[ns]", "M8[us]", "S4", "U1", "V4", [("a", "<i2"), ("b", "<i2")],
                         np.dtype("<f4", metadata={"unit": "m"})]
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dtypes += [ml_dtypes.bfloat16, "V2", "<f2"]
    state = {f"{i}-{round}": np.zeros(3000, dtype=d) for round in range(3) for i, d in enumerate(dtypes)}
    ckpt = Checkpointer("alike", location=tmp_path)
    ckpt.save(1, state)
    ckpt.save(2, state)
    restored = ckpt.restore().state
    for key, array in state.items():
        assert restored[key].dtype == array.dtype and restored[key].dtype.str == array.dtype.str, key
        assert type(restored[key].dtype) is type(array.dtype), key
    for _ in range(2):  # a refused description is refused every time, never remembered
        with pytest.raises(SafepointError, match="Python objects"):
            decode_dtype("|O")
