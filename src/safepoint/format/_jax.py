"""Leaf codec for jax arrays; imported only when the caller has imported jax.

An array is stored as ``np.asarray(x)`` (zero-copy for arrays on the CPU; arrays on an
accelerator are copied to the host). Dtypes that numpy knows only through ``ml_dtypes``
(bfloat16, the float8 kinds, int4, ...) are stored as the unsigned integers of the same
width, bit for bit, with the dtype's name in the attributes, so the format layer only ever
sees plain numpy dtypes. Typed PRNG keys (``jax.random.key``) are stored as their key data
with the name of their PRNG implementation, and rebuilt with ``jax.random.wrap_key_data``;
raw ``uint32`` keys (``jax.random.PRNGKey``) are ordinary arrays.

On load arrays are placed on jax's default device; the sharding they had is not recorded.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safepoint.errors import StateMismatch, UnsupportedType

from .codecs import LeafCodec

# Bit-exact carriers for ml_dtypes dtypes, by element size in bytes.
_CARRIERS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


class JaxArrayCodec:
    """Stores ``jax.Array`` leaves, typed PRNG keys included, as numpy arrays."""

    kind = "jax.Array"

    def matches(self, obj: Any) -> bool:
        return isinstance(obj, jax.Array)

    def to_numpy(self, obj: Any) -> tuple[np.ndarray, dict[str, Any]]:
        if not obj.is_fully_addressable:
            raise UnsupportedType(
                f"cannot store a jax array of shape {obj.shape} sharded across processes: this "
                "process holds only part of it; save its addressable part as a safepoint.Shard "
                "with a distributed Checkpointer (group=, see docs/distributed.md), or gather "
                "it (jax.experimental.multihost_utils.process_allgather) before saving",
                type_name="jax.Array",
            )
        if jnp.issubdtype(obj.dtype, jax.dtypes.prng_key):
            data = np.asarray(jax.random.key_data(obj))
            return data, {"prng_impl": str(jax.random.key_impl(obj))}
        array = np.asarray(obj)
        attrs = {"dtype": array.dtype.name}
        if array.dtype.kind == "V":  # an ml_dtypes dtype such as bfloat16
            array = array.view(_CARRIERS[array.dtype.itemsize])
        return array, attrs

    def device(self, obj: Any) -> str:
        """``"cpu"`` for an array wholly on CPU devices, else its platforms (``"gpu"``)."""
        platforms = sorted({device.platform for device in obj.devices()})
        return "cpu" if platforms == ["cpu"] else ", ".join(platforms)

    def from_numpy(self, array: np.ndarray, attrs: dict[str, Any]) -> Any:
        if "prng_impl" in attrs:
            return jax.random.wrap_key_data(jnp.asarray(array), impl=attrs["prng_impl"])
        dtype = np.dtype(attrs["dtype"])  # ml_dtypes names resolve: jax imports ml_dtypes
        if jax.dtypes.canonicalize_dtype(dtype) != dtype:
            raise StateMismatch(
                f"the checkpoint holds a jax array of dtype {dtype.name} but 64-bit types are disabled "
                "in this process, so jax would silently narrow it; call "
                "jax.config.update('jax_enable_x64', True) before restoring"
            )
        return jax.device_put(array.view(dtype))


CODECS: list[LeafCodec] = [JaxArrayCodec()]
