"""Property tests: any state tree saved with a Checkpointer restores exactly, on every backend.

"Exactly" means: the same types (tuple stays tuple, int keys stay ints, numpy scalars stay
numpy scalars), floats bit for bit (nan payloads, -0.0), arrays with the same dtype (byte
order and structure included), shape, memory order where it was C or Fortran, and bytes.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safepoint.checkpointer import Checkpointer
from safepoint.knobs import INLINE_LIMIT
from safepoint.store import LocalStore, Store

EXAMPLES = {"local": 80, "memory": 80, "s3": 15}

# ---------------------------------------------------------------------- strategies

any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)  # lone surrogates too
big_ints = st.integers(min_value=-(2**200), max_value=2**200) | st.sampled_from(
    [2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64]) | st.builds(
    lambda bits, sign: sign * (2**bits - 1), st.integers(60, 4000), st.sampled_from([1, -1]))
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [-0.0, struct.unpack("<d", bytes.fromhex("0100000000f87fff"))[0]])  # a nan with a payload
byte_strings = st.binary(max_size=16) | st.binary(min_size=INLINE_LIMIT + 1, max_size=INLINE_LIMIT + 300)

plain_dtypes = st.one_of(
    st.just(np.dtype(bool)),
    hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(endianness="?", sizes=(16, 32, 64)),
    hnp.complex_number_dtypes(endianness="?"),
    hnp.datetime64_dtypes(endianness="?"),
    hnp.timedelta64_dtypes(endianness="?"),
    hnp.unicode_string_dtypes(endianness="?", min_len=1, max_len=6),
    hnp.byte_string_dtypes(min_len=1, max_len=6),
)
dtypes = plain_dtypes | hnp.array_dtypes(plain_dtypes, min_size=1, max_size=3) | hnp.nested_dtypes(
    plain_dtypes, max_leaves=4)
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4) | st.tuples(
    st.integers(65, 80), st.just(64))  # 4160+ items: always a blob unless itemsize is 0


void_dtypes = st.sampled_from([np.dtype("V3"), np.dtype("V0"), np.dtype([]),
                               np.dtype([("raw", "V2"), ("n", ">i2")])])


@st.composite
def void_arrays(draw: st.DrawFn, shape: tuple[int, ...]) -> np.ndarray:
    """Arrays of opaque bytes (hypothesis cannot make void elements itself)."""
    dtype = draw(void_dtypes)
    if dtype.itemsize == 0:
        return np.zeros(shape, dtype)
    seed = draw(st.integers(0, 2**32 - 1))
    data = np.random.default_rng(seed).bytes(int(np.prod(shape)) * dtype.itemsize)
    return np.frombuffer(data, dtype).reshape(shape).copy()


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    shape = draw(shapes)
    if draw(st.integers(0, 9)) == 0:
        array = draw(void_arrays(shape))
    else:
        array = draw(hnp.arrays(draw(dtypes), shape))
    layout = draw(st.sampled_from(["C", "F", "strided", "swapped"]))
    if layout == "F":
        return np.asfortranarray(array)
    if layout == "strided" and array.ndim >= 1:
        return array[::2]
    if layout == "swapped" and array.ndim >= 2:
        return np.swapaxes(array, 0, array.ndim - 1)
    return array


@st.composite
def numpy_scalars(draw: st.DrawFn) -> np.generic:
    if draw(st.integers(0, 9)) == 0:
        return draw(void_arrays(()))[()]
    return draw(hnp.arrays(draw(dtypes), ()))[()]


leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), big_ints, floats,
    st.complex_numbers(allow_nan=True, allow_infinity=True),
    any_text, byte_strings, byte_strings.map(bytearray), arrays(), arrays(), numpy_scalars(),
)
keys = any_text | st.integers() | st.tuples(st.integers(), any_text) | st.just("$")


def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(any_text, children, max_size=4),
        st.dictionaries(keys, children, max_size=4),
    )


state_trees = st.recursive(leaves, containers, max_leaves=12)

# ---------------------------------------------------------------------- exact equality


def assert_same(saved: Any, restored: Any, path: str = "state") -> None:
    """Equal in type and value, floats and arrays bit for bit."""
    assert type(restored) is type(saved), f"{path}: {type(saved)} came back as {type(restored)}"
    if isinstance(saved, float):
        assert struct.pack("<d", saved) == struct.pack("<d", restored), path
    elif isinstance(saved, complex):
        assert struct.pack("<dd", saved.real, saved.imag) == struct.pack(
            "<dd", restored.real, restored.imag), path
    elif isinstance(saved, np.ndarray):
        assert restored.dtype == saved.dtype and restored.dtype.str == saved.dtype.str, path
        assert restored.dtype.descr == saved.dtype.descr, path
        assert restored.shape == saved.shape, path
        assert restored.tobytes() == saved.tobytes(), path
        if saved.flags.f_contiguous and not saved.flags.c_contiguous:
            assert restored.flags.f_contiguous, f"{path}: Fortran order was lost"
        else:
            assert restored.flags.c_contiguous, path
        assert restored.flags.writeable, f"{path}: a restored array is read-only"
    elif isinstance(saved, np.generic):
        assert restored.dtype == saved.dtype, path
        assert np.asarray(restored).tobytes() == np.asarray(saved).tobytes(), path
    elif isinstance(saved, (list, tuple)):
        assert len(restored) == len(saved), path
        for i, (a, b) in enumerate(zip(saved, restored, strict=True)):
            assert_same(a, b, f"{path}[{i}]")
    elif isinstance(saved, dict):
        assert len(restored) == len(saved), path
        for (ka, va), (kb, vb) in zip(saved.items(), restored.items(), strict=True):
            assert_same(ka, kb, f"{path} key {ka!r}")
            assert_same(va, vb, f"{path}[{ka!r}]")
    else:
        assert restored == saved, path


# ---------------------------------------------------------------------- the properties

_names = (f"tree{i}" for i in itertools.count())


def _check_round_trips(backend: str, trees: st.SearchStrategy[Any], check: Callable[[Any], None]) -> None:
    run = settings(max_examples=EXAMPLES[backend], deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    run(given(trees)(check))()


def _save_and_restore(store: Store, backend: str) -> Callable[[Any], None]:
    def check(tree: Any) -> None:
        ckpt = Checkpointer(next(_names), location=store, durable=False)
        ckpt.save(7, {"tree": tree}, metadata={"backend": backend})
        restored = ckpt.restore(step=7)
        assert restored.step == 7
        assert restored.metadata == {"backend": backend}
        assert_same({"tree": tree}, restored.state)

    return check


def test_any_state_tree_round_trips(store: Store, backend: str) -> None:
    _check_round_trips(backend, state_trees, _save_and_restore(store, backend))


def test_arrays_of_every_dtype_and_layout_round_trip(store: Store, backend: str) -> None:
    _check_round_trips(backend, st.lists(arrays(), min_size=1, max_size=4),
                       _save_and_restore(store, backend))


def test_any_state_tree_round_trips_through_an_async_save(store: Store, backend: str) -> None:
    if backend == "s3":
        pytest.skip("the blocking property covers s3; the async path is store-independent")

    def check(tree: Any) -> None:
        ckpt = Checkpointer(next(_names), location=store, durable=False)
        ckpt.save(1, {"tree": tree}, blocking=False)
        ckpt.wait()
        assert_same({"tree": tree}, ckpt.restore().state)

    _check_round_trips(backend, state_trees, check)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(array=arrays())
def test_mmap_restores_read_only_arrays_with_the_same_contents(tmp_path, array: np.ndarray) -> None:
    ckpt = Checkpointer(next(_names), location=LocalStore(tmp_path), durable=False)
    ckpt.save(1, {"a": array})
    restored = ckpt.restore(mmap=True).state["a"]
    assert restored.dtype == array.dtype and restored.shape == array.shape
    assert restored.tobytes() == array.tobytes()
