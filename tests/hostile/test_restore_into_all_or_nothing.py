"""``restore(into=)`` is all or nothing on every backend: shapes, dtypes and every checksum
are checked before the first byte lands in a caller's array or object."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from safepoint import Checkpointer, CorruptCheckpoint, StateMismatch, knobs
from safepoint.store import Store


class Counter:
    """A live object that records whether it was loaded."""

    def __init__(self) -> None:
        self.loaded: list[Any] = []

    def state_dict(self) -> dict[str, Any]:
        return {"n": 1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded.append(state)


def _targets() -> dict[str, Any]:
    return {"a": np.full(5000, -1.0), "b": np.full(6000, -2.0), "obj": Counter()}


def _untouched(targets: dict[str, Any]) -> None:
    assert (targets["a"] == -1.0).all() and (targets["b"] == -2.0).all()
    assert targets["obj"].loaded == []


@pytest.fixture
def saved(store: Store, monkeypatch: pytest.MonkeyPatch) -> Checkpointer:
    monkeypatch.setattr(knobs, "PACK_BELOW", 1)  # a data file per array
    ckpt = Checkpointer("job", location=store)
    ckpt.save(1, {"a": np.arange(5000.0), "b": np.arange(6000.0), "obj": Counter()})
    return ckpt


def test_a_damaged_later_array_leaves_every_target_untouched(saved: Checkpointer, store: Store) -> None:
    manifest = saved.manifest(1)
    rel, size = manifest.files[1]  # the data of "b", read after "a"
    data = bytearray(store.read(f"job/{rel}"))
    data[size // 2] ^= 0xFF
    store.write_blob(f"job/{rel}", [bytes(data)], durable=False)
    targets = _targets()
    with pytest.raises(CorruptCheckpoint):
        saved.restore(step=1, into=targets)
    _untouched(targets)


def test_a_mismatch_anywhere_leaves_every_target_untouched(saved: Checkpointer) -> None:
    targets = _targets()
    targets["b"] = np.full(6001, -2.0)
    with pytest.raises(StateMismatch, match=r"state\['b'\]"):
        saved.restore(step=1, into=targets)
    assert (targets["a"] == -1.0).all() and targets["obj"].loaded == []


def test_a_fitting_restore_fills_in_place(saved: Checkpointer) -> None:
    targets = _targets()
    state = saved.restore(into=targets).state
    assert state["a"] is targets["a"] and (targets["a"] == np.arange(5000.0)).all()
    assert (targets["b"] == np.arange(6000.0)).all() and targets["obj"].loaded == [{"n": 1}]
