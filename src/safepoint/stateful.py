"""The protocol for live objects in a state tree.

A *state tree* is nested dicts, lists and tuples whose leaves are plain values (None, bool,
int, float, complex, str, bytes, numpy arrays and scalars, torch tensors, jax arrays). A
*live object* is anything in such a tree that owns mutable state the caller wants saved and
later loaded back into the same object: a model, an optimizer, a data iterator, an RNG.

- :func:`capture` turns a tree holding live objects into a plain tree of their states.
- :func:`restore_into` loads a saved plain tree back into the live objects of a target tree,
  in place, after checking that the whole structure fits (so a mismatch touches nothing).

An object is live if it has ``state_dict()``/``load_state_dict(state)`` (the PyTorch
convention, :class:`Stateful`) or ``get_state()``/``set_state(state)``, or if it is one of
the RNGs adapted here: ``random.Random``, ``numpy.random.Generator``, any
``numpy.random.BitGenerator``, ``numpy.random.RandomState`` and ``torch.Generator``.

A live object may also define ``validate_state(state) -> None`` that raises ``ValueError``
when ``state`` would not fit it; :func:`restore_into` calls it for every object before it
loads anything, so a misfit anywhere leaves every object untouched.

This module never imports torch or jax: torch objects are recognised only when the caller
has already imported torch.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from safepoint import knobs
from safepoint.errors import StateMismatch, UnsupportedType

__all__ = ["GlobalRNG", "Stateful", "capture", "restore_into"]


@runtime_checkable
class Stateful(Protocol):
    """An object that saves and restores its own state (the PyTorch convention).

    ``state_dict()`` returns a state tree (it may hold tensors, arrays and other live
    objects, which are captured too); ``load_state_dict(state)`` loads such a tree back in
    place. Objects with ``get_state()``/``set_state(state)`` are accepted the same way.
    """

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class _Adapter:
    """How to read, write and check the state of one kind of live object."""

    get: Callable[[Any], Any]
    set: Callable[[Any, Any], None]
    check: Callable[[Any, Any], str | None]
    """Returns what is wrong with ``state`` for ``obj``, or None if it fits."""


def _check_user(obj: Any, state: Any, *, needs_mapping: bool) -> str | None:
    if needs_mapping and not isinstance(state, Mapping):
        return (
            f"{type(obj).__name__}.load_state_dict needs a dict, the checkpoint has {_kind(state)}"
        )
    validate = getattr(obj, "validate_state", None)
    if callable(validate):
        try:
            validate(state)
        except (ValueError, TypeError) as error:
            return str(error)
    return None


def _check_random(_rng: Any, state: Any) -> str | None:
    if not (isinstance(state, (tuple, list)) and len(state) == 3):
        return f"random.Random needs the 3-item tuple of Random.getstate(), the checkpoint has {_kind(state)}"
    return None


def _random_state(state: Any) -> tuple[Any, ...]:
    """``state`` as Random.setstate wants it: a format may hand tuples back as lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _check_bit_state(expected_name: str, state: Any) -> str | None:
    if not isinstance(state, Mapping) or "bit_generator" not in state:
        return f"a numpy RNG needs a bit generator state dict, the checkpoint has {_kind(state)}"
    if state["bit_generator"] != expected_name:
        return (
            f"the checkpoint holds a {state['bit_generator']} state but this RNG uses "
            f"{expected_name}; create the RNG with the same bit generator as when it was saved"
        )
    return None


def _set_bit_generator(bit_generator: np.random.BitGenerator, state: Any) -> None:
    bit_generator.state = dict(state)


_RANDOM = _Adapter(
    get=lambda r: r.getstate(),
    set=lambda r, s: r.setstate(_random_state(s)),
    check=_check_random,
)
_GENERATOR = _Adapter(
    get=lambda g: g.bit_generator.state,
    set=lambda g, s: _set_bit_generator(g.bit_generator, s),
    check=lambda g, s: _check_bit_state(g.bit_generator.state["bit_generator"], s),
)
_BIT_GENERATOR = _Adapter(
    get=lambda b: b.state,
    set=_set_bit_generator,
    check=lambda b, s: _check_bit_state(b.state["bit_generator"], s),
)
_RANDOM_STATE = _Adapter(
    get=lambda r: r.get_state(legacy=False),
    set=lambda r, s: r.set_state(dict(s)),
    check=lambda r, s: _check_bit_state(r.get_state(legacy=False)["bit_generator"], s),
)
_STATE_DICT = _Adapter(
    get=lambda o: o.state_dict(),
    set=lambda o, s: o.load_state_dict(s),
    check=lambda o, s: _check_user(o, s, needs_mapping=True),
)
_GET_STATE = _Adapter(
    get=lambda o: o.get_state(),
    set=lambda o, s: o.set_state(s),
    check=lambda o, s: _check_user(o, s, needs_mapping=False),
)


def _check_torch_generator(_generator: Any, state: Any) -> str | None:
    import torch  # already imported: the caller holds a torch Generator or tensor

    if not (isinstance(state, torch.Tensor) and state.dtype == torch.uint8):
        return f"torch.Generator needs a uint8 tensor from get_state(), the checkpoint has {_kind(state)}"
    return None


_TORCH_GENERATOR = _Adapter(
    get=lambda g: g.get_state(),
    set=lambda g, s: g.set_state(s),
    check=_check_torch_generator,
)


_PLAIN_TYPES = frozenset({
    type(None), bool, int, float, complex, str, bytes, bytearray, dict, list, tuple, np.ndarray,
})


def _adapter_for(obj: Any) -> _Adapter | None:
    """The adapter for a live object, or None if ``obj`` is a container or a plain leaf."""
    if type(obj) in _PLAIN_TYPES or isinstance(obj, type):
        return None  # plain leaves and containers (fast path); a class has no state of its own
    if isinstance(obj, random.Random):
        return _RANDOM
    if isinstance(obj, np.random.Generator):
        return _GENERATOR
    if isinstance(obj, np.random.BitGenerator):
        return _BIT_GENERATOR
    if isinstance(obj, np.random.RandomState):
        return _RANDOM_STATE
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Generator):
        return _TORCH_GENERATOR
    if isinstance(obj, Stateful):
        return _STATE_DICT
    if callable(getattr(obj, "get_state", None)) and callable(getattr(obj, "set_state", None)):
        return _GET_STATE
    return None


def capture(tree: Any) -> Any:
    """A new plain state tree: every live object in ``tree`` replaced by its state.

    Containers (dict and its subclasses, list, tuple and namedtuples) are rebuilt as plain
    dicts, lists and tuples; states are captured recursively, since a ``state_dict()`` may
    hold tensors or further live objects. Leaves are passed through as they are, not
    copied: a tensor in the result may still share memory with a live model. A tree that
    contains itself, or nests deeper than ``knobs.MAX_DEPTH``, raises
    :class:`~safepoint.errors.UnsupportedType` naming the place.
    """
    return _capture(tree, "state", set())


def _capture(tree: Any, path: str, active: set[int]) -> Any:
    kind = type(tree)
    if kind in _LEAF_TYPES:
        return tree
    adapter = _adapter_for(tree)
    if adapter is None and not isinstance(tree, (Mapping, list, tuple)):
        return tree
    if id(tree) in active:
        raise UnsupportedType(f"{path}: the state tree contains itself (a cycle)",
                              tree_path=path, type_name=kind.__name__)
    if len(active) >= knobs.MAX_DEPTH:
        raise UnsupportedType(
            f"{path}: the state tree nests more than {knobs.MAX_DEPTH} levels deep; flatten it",
            tree_path=path, type_name=kind.__name__)
    active.add(id(tree))
    try:
        if adapter is not None:
            return _capture(adapter.get(tree), path, active)
        if isinstance(tree, Mapping):
            return {key: value if type(value) in _LEAF_TYPES else
                    _capture(value, f"{path}[{key!r}]", active) for key, value in tree.items()}
        if isinstance(tree, list):
            return [value if type(value) in _LEAF_TYPES else
                    _capture(value, f"{path}[{i}]", active) for i, value in enumerate(tree)]
        return tuple(value if type(value) in _LEAF_TYPES else
                     _capture(value, f"{path}[{i}]", active) for i, value in enumerate(tree))
    finally:
        active.discard(id(tree))


_LEAF_TYPES = frozenset({type(None), bool, int, float, complex, str, bytes, bytearray, np.ndarray})


def restore_into(target: Any, state: Any, *, before_load: Callable[[], None] | None = None) -> Any:
    """Load the saved plain tree ``state`` into the live objects of ``target``, in place.

    ``target`` and ``state`` are walked together. Where ``target`` holds a live object, the
    saved state is loaded into it and the same object is kept in the result. Where it holds
    a dict, the result is a new dict, matched by key; a list or tuple is matched by index
    (lengths must agree) and rebuilt with the target's type. Where it holds a plain leaf,
    the result holds the saved value. Keys present in ``state`` but not in ``target`` are
    kept in the result, so nothing saved is dropped silently.

    The whole structure is checked before anything is loaded (including each object's
    ``validate_state``, if it has one). On a mismatch :class:`StateMismatch` names the
    path, e.g. ``state['model']['layers'][3]``, and no object has been touched.
    ``before_load`` runs after that check and before the first object is loaded (the
    checkpointer fills live arrays there). An error raised by an object's own
    ``load_state_dict`` after that check cannot be undone.
    """
    pending: list[tuple[_Adapter, Any, Any]] = []
    result = _plan(target, state, "state", pending)
    if before_load is not None:
        before_load()
    for adapter, obj, saved in pending:
        adapter.set(obj, saved)
    return result


def _plan(target: Any, saved: Any, path: str, pending: list[tuple[_Adapter, Any, Any]]) -> Any:
    """Check ``saved`` against ``target``, queue the loads and build the result tree."""
    adapter = _adapter_for(target)
    if adapter is not None:
        problem = adapter.check(target, saved)
        if problem is not None:
            raise StateMismatch(
                f"{path}: cannot load the saved state into this {type(target).__name__}: {problem}",
                tree_path=path,
            )
        pending.append((adapter, target, saved))
        return target
    if isinstance(target, Mapping):
        if not isinstance(saved, Mapping):
            raise _mismatch(path, "a dict", saved)
        result = {}
        for key, value in target.items():
            if key not in saved:
                raise StateMismatch(
                    f"{path}: the key {key!r} is in the target but not in the checkpoint "
                    f"(saved keys: {', '.join(map(repr, saved)) or 'none'}); remove it from "
                    "the target, or restore without a target to see what was saved",
                    tree_path=path,
                )
            result[key] = _plan(value, saved[key], f"{path}[{key!r}]", pending)
        result.update((key, value) for key, value in saved.items() if key not in target)
        return result
    if isinstance(target, (list, tuple)):
        if not isinstance(saved, (list, tuple)):
            raise _mismatch(path, f"a {type(target).__name__}", saved)
        if len(saved) != len(target):
            raise StateMismatch(
                f"{path}: the target has a {type(target).__name__} of {len(target)} items but "
                f"the checkpoint has {len(saved)}; make the target's structure match the "
                "saved one, or restore without a target to see what was saved",
                tree_path=path,
            )
        items = [
            _plan(value, saved_value, f"{path}[{index}]", pending)
            for index, (value, saved_value) in enumerate(zip(target, saved, strict=True))
        ]
        if isinstance(target, list):
            return items
        if hasattr(target, "_fields"):  # a namedtuple takes its fields as arguments
            return type(target)(*items)
        return type(target)(items)
    return saved


def _mismatch(path: str, expected: str, saved: Any) -> StateMismatch:
    return StateMismatch(
        f"{path}: the target has {expected} here but the checkpoint has {_kind(saved)}; "
        "make the target's structure match the saved one, or restore without a target to "
        "see what was saved",
        tree_path=path,
    )


def _kind(value: Any) -> str:
    """A short description of a saved value for error messages."""
    if isinstance(value, (list, tuple, Mapping)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a value of type {type(value).__name__}"


class GlobalRNG:
    """The process-wide RNGs as one live object: put ``{"rng": GlobalRNG()}`` in a tree.

    Captures and restores ``random``'s global state, numpy's legacy global state
    (``np.random.seed``/``np.random.rand``) and torch's global CPU generator
    (``torch.manual_seed``), each unless switched off. Torch is included only when the
    caller has already imported it. CUDA generators and generators a library keeps of its
    own are not global state here: put those objects in the tree themselves.

    Restoring loads whatever the checkpoint holds and leaves the other RNGs as they are.
    """

    def __init__(self, *, python: bool = True, numpy: bool = True, torch: bool = True) -> None:
        self.python = python
        self.numpy = numpy
        self.torch = torch

    def state_dict(self) -> dict[str, Any]:
        """The current global RNG states, keyed ``"python"``, ``"numpy"``, ``"torch"``."""
        state: dict[str, Any] = {}
        if self.python:
            state["python"] = random.getstate()
        if self.numpy:
            state["numpy"] = np.random.get_state(legacy=False)
        if self.torch and "torch" in sys.modules:
            state["torch"] = sys.modules["torch"].get_rng_state()
        return state

    def validate_state(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` if ``state`` was not made by :meth:`state_dict`."""
        unknown = set(state) - {"python", "numpy", "torch"}
        if unknown:
            raise ValueError(f"unknown global RNG names {sorted(unknown)}")
        problem = None
        if "python" in state:
            problem = _check_random(None, state["python"])
        if problem is None and "numpy" in state:
            problem = _check_bit_state("MT19937", state["numpy"])
        if problem is None and "torch" in state:
            problem = _check_torch_generator(None, state["torch"])
        if problem is not None:
            raise ValueError(problem)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set the global RNGs present in ``state``."""
        self.validate_state(state)
        if "python" in state:
            random.setstate(_random_state(state["python"]))
        if "numpy" in state:
            np.random.set_state(dict(state["numpy"]))
        if "torch" in state:
            import torch

            torch.set_rng_state(state["torch"])
