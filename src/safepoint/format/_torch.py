"""Leaf codec for torch tensors; imported only when the caller has imported torch.

A CPU tensor becomes a zero-copy numpy view of its memory (strides and all: the format layer
decides whether to lay it out contiguously). A tensor on another device is copied to the CPU
first. Dtypes numpy lacks (bfloat16, the float8 kinds, complex32, ...) are stored as the
unsigned integers of the same width, bit for bit, with the torch dtype in the attributes.

On load every tensor is made on the CPU, whatever device it was saved from (the device is
recorded in the attributes for reference): restoring into a live model with
``load_state_dict`` copies it to the model's device, and a bare tensor moves with ``.to()``.
``requires_grad`` is kept, and an ``nn.Parameter`` comes back as an ``nn.Parameter``.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch

from safepoint.errors import CorruptCheckpoint, UnsupportedType

from .codecs import LeafCodec

# The dtypes Tensor.numpy() converts; any other is stored through a carrier below.
_NUMPY_DTYPES = frozenset(
    {
        torch.bool,
        torch.uint8,
        torch.uint16,
        torch.uint32,
        torch.uint64,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
    }
)
# Bit-exact carriers for dtypes numpy cannot hold, by element size in bytes.
_CARRIERS = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class TorchTensorCodec:
    """Stores ``torch.Tensor`` (and ``nn.Parameter``) leaves as numpy arrays."""

    kind = "torch.Tensor"

    def matches(self, obj: Any) -> bool:
        return isinstance(obj, torch.Tensor)

    def to_numpy(self, obj: Any) -> tuple[np.ndarray, dict[str, Any]]:
        tensor: torch.Tensor = obj
        if tensor.layout != torch.strided or tensor.is_quantized:
            raise UnsupportedType(
                f"cannot store a {tensor.layout} {_dtype_name(tensor.dtype)} tensor: only dense, "
                "non-quantized tensors are supported; convert it with .to_dense() or "
                ".dequantize() before saving",
                type_name="torch.Tensor",
            )
        attrs = {
            "dtype": _dtype_name(tensor.dtype),
            "device": str(tensor.device),
            "requires_grad": tensor.requires_grad,
            "parameter": isinstance(tensor, torch.nn.Parameter),
        }
        # resolve_conj/resolve_neg are no-ops unless a lazy conj()/neg() view is pending.
        tensor = tensor.detach().cpu().resolve_conj().resolve_neg()
        if tensor.dtype not in _NUMPY_DTYPES:
            tensor = tensor.view(_CARRIERS[tensor.dtype.itemsize])
        return tensor.numpy(), attrs

    def from_numpy(self, array: np.ndarray, attrs: dict[str, Any]) -> Any:
        # torch.from_numpy shares the array's memory, and tensors are expected to be
        # writable (an optimizer updates them in place): a read-only array (such as a
        # read-only mmap of the checkpoint) is copied first, since writing through it would
        # crash the process. A writable (copy-on-write) mmap stays zero-copy.
        array = np.require(array, requirements=["W"])
        tensor = torch.from_numpy(array)
        dtype = getattr(torch, str(attrs.get("dtype")), None)
        if not isinstance(dtype, torch.dtype):
            raise CorruptCheckpoint(
                f"a torch tensor leaf names an unknown dtype {attrs.get('dtype')!r}; the "
                "checkpoint is damaged or was written by a newer torch"
            )
        if tensor.dtype != dtype:
            tensor = tensor.view(dtype)
        if attrs.get("parameter"):
            return torch.nn.Parameter(tensor, requires_grad=attrs.get("requires_grad", True))
        return tensor.requires_grad_(attrs.get("requires_grad", False))

    def device(self, obj: Any) -> str:
        """``"cpu"`` for a tensor in host memory, else its device (``"cuda:0"``, ``"meta"``)."""
        tensor: torch.Tensor = obj
        return "cpu" if tensor.device.type == "cpu" else str(tensor.device)

    def describe(self, obj: Any) -> tuple[str, tuple[int, ...]] | None:
        """The dtype name and shape of a live tensor (None for anything else)."""
        if not isinstance(obj, torch.Tensor):
            return None
        return _dtype_name(obj.dtype), tuple(obj.shape)

    def as_shard(self, obj: Any) -> Any:
        """A DTensor as this rank's :class:`~safepoint.format.shards.Shard` of its global
        tensor (None for any other tensor); a Partial placement (pending reduction) is
        refused, since no rank holds its value."""
        dtensor = _dtensor_type()
        if dtensor is None or not isinstance(obj, dtensor):
            return None
        from torch.distributed.tensor import Partial
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        from safepoint.format.shards import Shard

        if any(isinstance(p, Partial) for p in obj.placements):
            raise UnsupportedType(
                f"a DTensor with a Partial placement ({obj.placements}) holds no value on any "
                "one rank; reduce it (.redistribute to Replicate or Shard) before saving",
                type_name="DTensor")
        _, offsets = compute_local_shape_and_global_offset(obj.shape, obj.device_mesh,
                                                           obj.placements)
        return Shard(obj.to_local(), tuple(offsets), tuple(obj.shape))

    def writable_view(self, obj: Any, attrs: dict[str, Any]) -> np.ndarray | None:
        """A numpy view of a CPU tensor's memory, when it can be filled in place."""
        if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
            return None
        if obj.layout != torch.strided or obj.is_quantized or _dtype_name(obj.dtype) != attrs.get("dtype"):
            return None
        if obj.is_conj() or obj.is_neg() or not obj.is_contiguous():
            return None
        tensor = obj.detach()
        if tensor.dtype not in _NUMPY_DTYPES:
            tensor = tensor.view(_CARRIERS[tensor.dtype.itemsize])
        return tensor.numpy()


def _dtensor_type() -> Any:
    """torch's DTensor class, if torch.distributed is built in (and already imported)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


CODECS: list[LeafCodec] = [TorchTensorCodec()]
