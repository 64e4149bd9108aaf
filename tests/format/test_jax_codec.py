"""The jax leaf codec: bit-exact round trips, typed PRNG keys, and end to end via Checkpointer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from safepoint.errors import StateMismatch  # noqa: E402
from safepoint.format._jax import CODECS  # noqa: E402  (needs jax)

CODEC = CODECS[0]
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def round_trip(x: Any) -> Any:
    array, attrs = CODEC.to_numpy(x)
    assert isinstance(array, np.ndarray) and array.dtype.kind != "V"  # plain numpy for the format
    return CODEC.from_numpy(array, attrs)


def random_bits(shape: tuple[int, ...], dtype: Any) -> Any:
    """A jax array of arbitrary bit patterns of ``dtype`` (NaNs included)."""
    dtype = np.dtype(dtype)
    raw = np.random.default_rng(0).integers(0, 256, int(np.prod(shape)) * dtype.itemsize)
    return jnp.asarray(raw.astype(np.uint8).view(dtype).reshape(shape))


def assert_bit_equal(restored: Any, original: Any) -> None:
    assert isinstance(restored, jax.Array)
    assert restored.dtype == original.dtype and restored.shape == original.shape
    carrier = UINT[original.dtype.itemsize]
    np.testing.assert_array_equal(
        np.asarray(restored).view(carrier), np.asarray(original).view(carrier)
    )


@pytest.mark.parametrize(
    "dtype", ["float32", "bfloat16", "float16", "int32", "uint8", "bool", "float8_e4m3fn"]
)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3)], ids=str)
def test_arrays_round_trip_bit_exactly(dtype: str, shape: tuple[int, ...]) -> None:
    original = (jnp.arange(int(np.prod(shape))) % 2).astype(bool).reshape(shape)
    if dtype != "bool":
        original = random_bits(shape, dtype)
    assert_bit_equal(round_trip(original), original)


def test_bfloat16_is_stored_as_uint16_with_its_name() -> None:
    array, attrs = CODEC.to_numpy(jnp.ones(3, dtype=jnp.bfloat16))
    assert array.dtype == np.uint16 and attrs == {"dtype": "bfloat16"}


def test_typed_keys_round_trip() -> None:
    for key in (jax.random.key(7), jax.random.split(jax.random.key(1, impl="rbg"), 3)):
        array, attrs = CODEC.to_numpy(key)
        assert array.dtype == np.uint32 and "prng_impl" in attrs
        restored = CODEC.from_numpy(array, attrs)
        assert restored.dtype == key.dtype and restored.shape == key.shape
        assert jax.random.key_impl(restored) == jax.random.key_impl(key)
        np.testing.assert_array_equal(jax.random.key_data(restored), jax.random.key_data(key))
        last = (restored.reshape(-1)[-1], key.reshape(-1)[-1])
        assert jnp.array_equal(jax.random.uniform(last[0]), jax.random.uniform(last[1]))


def test_raw_uint32_keys_are_ordinary_arrays() -> None:
    key = jax.random.PRNGKey(3)
    array, attrs = CODEC.to_numpy(key)
    assert attrs == {"dtype": "uint32"}
    restored = CODEC.from_numpy(array, attrs)
    assert jnp.array_equal(jax.random.normal(restored, (4,)), jax.random.normal(key, (4,)))


def test_64_bit_arrays_are_not_silently_narrowed() -> None:
    if jax.config.jax_enable_x64:
        pytest.skip("64-bit types are enabled in this process")
    with pytest.raises(StateMismatch, match="jax_enable_x64"):
        CODEC.from_numpy(np.arange(3, dtype=np.int64), {"dtype": "int64"})


def test_end_to_end_through_the_checkpointer(tmp_path: Path) -> None:
    checkpointer_module = pytest.importorskip("safepoint.checkpointer")
    params = {
        "w": random_bits((4, 3), "bfloat16"),
        "b": jnp.zeros(3, jnp.float32),
        "key": jax.random.key(42),
        "raw_key": jax.random.PRNGKey(1),
    }
    checkpointer = checkpointer_module.Checkpointer("jax", location=str(tmp_path))
    checkpointer.save(1, {"params": params, "step": 1})
    for mmap in (False, True):
        restored = checkpointer.restore(mmap=mmap).state
        assert restored["step"] == 1
        for name in ("w", "b", "raw_key"):
            assert_bit_equal(restored["params"][name], params[name])
        key = restored["params"]["key"]
        assert jnp.array_equal(jax.random.normal(key, (3,)), jax.random.normal(params["key"], (3,)))


def test_jax_arrays_as_shards_restore_into_jax_blocks(tmp_path: Path) -> None:
    """A jax array copies what it is made from: the block is filled before it is made."""
    from safepoint import Checkpointer, Shard

    whole = jnp.arange(40.0).reshape(8, 5)
    ckpt = Checkpointer("j", location=tmp_path)
    ckpt.save(1, {"w": Shard(whole[:8], (0, 0), (8, 5))})
    got = ckpt.restore(into={"w": Shard(jnp.zeros((4, 5)), (2, 0), (8, 5))}).state["w"]
    assert isinstance(got.data, jax.Array) and got.offsets == (2, 0)
    assert np.array_equal(np.asarray(got.data), np.asarray(whole)[2:6])
    full = ckpt.restore().state["w"]
    assert isinstance(full, jax.Array) and np.array_equal(np.asarray(full), np.asarray(whole))
