"""Leaf codecs: how array types of other frameworks (torch, jax) enter a state tree.

A codec turns a foreign array into a numpy array (a zero-copy view where the framework
allows it) plus a few JSON attributes, and back. The format layer stores the numpy array
exactly like any other array, so foreign arrays get the same raw blobs, checksums and mmap.

Codecs are looked up lazily: a codec is consulted only when its framework is already
imported by the caller (``sys.modules``), so safepoint never imports torch or jax itself.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class LeafCodec(Protocol):
    """Converts one foreign array type to numpy and back."""

    kind: str
    """Stable name written to the manifest, e.g. ``"torch.Tensor"``."""

    def matches(self, obj: Any) -> bool:
        """True if ``obj`` is a leaf this codec stores."""
        ...

    def to_numpy(self, obj: Any) -> tuple[np.ndarray, dict[str, Any]]:
        """The leaf as a numpy array (a view when possible) and JSON-able attributes."""
        ...

    def from_numpy(self, array: np.ndarray, attrs: dict[str, Any]) -> Any:
        """Rebuild the leaf from the stored array and attributes."""
        ...


# A codec may also define ``writable_view(obj, attrs) -> np.ndarray | None``: a writable numpy
# view of a live leaf's memory when ``obj`` can take a stored leaf with ``attrs`` in place
# (same framework dtype, on the CPU), else None. Restores into live trees then read blobs
# straight into the framework's own memory.


# A codec may also define ``device(obj) -> str``: where a live leaf's memory lives, "cpu" for
# host memory, else a device name ("cuda:0", "meta", "gpu"); a copy-on-write snapshot
# (snapshot="fork") refuses any other than "cpu". Without it, leaves count as host memory.


# A codec may also define ``describe(obj) -> (dtype name, shape) | None`` for a live leaf of
# its kind, so that a restore into it can refuse a saved leaf of another dtype or shape.

KNOWN_KINDS = frozenset({"torch.Tensor", "jax.Array"})
"""Every leaf kind a manifest may name (whether or not its framework is installed)."""

# framework module name -> module that defines CODECS: list[LeafCodec]
_CODEC_MODULES: dict[str, str] = {
    "torch": "safepoint.format._torch",
    "jax": "safepoint.format._jax",
}


def active_codecs() -> list[LeafCodec]:
    """The codecs whose framework is imported in this process."""
    codecs: list[LeafCodec] = []
    for framework, module_name in _CODEC_MODULES.items():
        if framework in sys.modules:
            codecs.extend(importlib.import_module(module_name).CODECS)
    return codecs


def codec_for_kind(kind: str) -> LeafCodec:
    """The codec that reads leaves written with ``kind``; imports its framework."""
    framework = kind.split(".", 1)[0]
    module_name = _CODEC_MODULES.get(framework)
    if module_name is None:
        raise KeyError(kind)
    for codec in importlib.import_module(module_name).CODECS:
        if codec.kind == kind:
            return codec
    raise KeyError(kind)
