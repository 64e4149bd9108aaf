"""``incremental="auto"``: full saves while the state changes everywhere, incremental ones
while most of it stays, switching each way from what the saves themselves measured."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import safepoint
from safepoint import Checkpointer, knobs
from safepoint.format import prepare, read_manifest
from safepoint.format.chunks import chunk_entries, quick_places, unchanged_share
from safepoint.store import LocalStore, Store
from state_checks import Counting, assert_identical

NAME = "auto"
CHUNK = 64 << 10


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knobs, "CHUNK_BYTES", CHUNK)


def state(seed: int, changed: int = 0) -> dict[str, Any]:
    """16 chunks of ``big``, ``changed`` of them differing from seed 0's; small values."""
    big = np.random.default_rng(0).random(16 * CHUNK // 8)
    rng = np.random.default_rng(seed)
    for i in range(changed):
        big[i * CHUNK // 8] = rng.random()
    return {"big": big, "step": seed}


def everywhere(seed: int) -> dict[str, Any]:
    return {"big": np.random.default_rng(seed).random(16 * CHUNK // 8), "step": seed}


def incremental(store: Store, step: int) -> bool:
    """Whether ``step`` was saved incrementally (its manifest names chunk files)."""
    return bool(chunk_entries(read_manifest(store, NAME, step)))


def closed_and_clean(ckpt: Checkpointer, store: Store) -> None:
    """Close ``ckpt``, collect what it deferred (the data of the step removed last, kept a
    save longer for readers), and check the store: nothing damaged, nothing left over."""
    ckpt.close()
    ckpt.gc()
    report = safepoint.check(store)
    assert report.clean, report.findings


def test_auto_switches_on_where_it_pays_and_off_where_it_does_not(
        make_store: Callable[[], Store]) -> None:
    store = make_store()
    counting = Counting(store)
    ckpt = Checkpointer(NAME, location=store, keep=2, incremental="auto")
    saved: dict[int, dict[str, Any]] = {}
    big = state(0)["big"].nbytes

    def save(step: int, value: dict[str, Any]) -> int:
        saved[step] = value
        ckpt.save(step, value)
        ckpt.wait()
        assert_identical(ckpt.restore(step).state, value)
        return counting.take()

    assert save(1, state(1)) >= big  # full: nothing to compare with yet
    assert save(2, state(2, changed=1)) >= big  # full, and it sees 15 of 16 chunks unchanged
    assert not incremental(store, 1) and not incremental(store, 2)
    assert save(3, state(3, changed=1)) >= big  # incremental: the first writes every chunk
    assert incremental(store, 3)
    assert save(4, state(4, changed=1)) <= 2 * CHUNK  # one chunk changed: one written
    assert incremental(store, 4)
    assert save(5, everywhere(5)) >= big  # everything changed: still incremental, measured
    assert incremental(store, 5)
    assert save(6, everywhere(6)) >= big  # ... and so a full save again
    assert not incremental(store, 6)
    assert save(7, everywhere(6)) >= big  # full, sees nothing changed
    assert save(8, everywhere(6)) >= big  # incremental: no kept step holds chunks yet
    assert save(9, everywhere(6)) == 0 and incremental(store, 9)
    assert ckpt.steps() == [8, 9]
    for step in ckpt.steps():
        assert_identical(ckpt.restore(step).state, saved[step])
    closed_and_clean(ckpt, store)


def test_a_state_that_changes_everywhere_is_never_chunked(tmp_path: Any) -> None:
    store = LocalStore(tmp_path)
    ckpt = Checkpointer(NAME, location=store, keep=3, incremental="auto")
    for step in range(6):
        ckpt.save(step, everywhere(step))
    assert not any(incremental(store, step) for step in ckpt.steps())
    assert not (tmp_path / NAME / "chunks").exists()
    assert_identical(ckpt.restore().state, everywhere(5))
    closed_and_clean(ckpt, store)


def test_only_a_state_with_large_leaves_is_measured(tmp_path: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from safepoint.checkpointer import core

    scanned: list[int] = []
    real = core.quick_places

    def counted(blobs: Any, seed: int) -> Any:
        scanned.append(len(blobs))
        return real(blobs, seed)

    monkeypatch.setattr(core, "quick_places", counted)
    store = LocalStore(tmp_path)
    ckpt = Checkpointer(NAME, location=store, incremental="auto")
    small = {"w": np.arange(100.0), "step": 1}
    for step in range(3):
        ckpt.save(step, small)
    assert scanned == []  # no leaf of a chunk: nothing to measure, no thread started
    ckpt.save(3, state(3))
    assert scanned == [1]
    assert not any(incremental(store, step) for step in ckpt.steps())
    ckpt.close()


def test_a_failed_measure_loses_that_save_s_measure_only(tmp_path: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from safepoint.checkpointer import core

    real = core.quick_places
    failing = [False]

    def flaky(blobs: Any, seed: int) -> Any:
        if failing[0]:
            raise MemoryError("no room to hash")
        return real(blobs, seed)

    monkeypatch.setattr(core, "quick_places", flaky)
    store = LocalStore(tmp_path)
    ckpt = Checkpointer(NAME, location=store, incremental="auto")
    ckpt.save(1, state(1))
    failing[0] = True
    ckpt.save(2, state(1))  # saved; measured nothing, and forgot nothing
    failing[0] = False
    ckpt.save(3, state(1))  # compared with save 1's measure
    ckpt.save(4, state(1))
    assert [incremental(store, step) for step in range(1, 5)] == [False, False, False, True]
    for step in range(1, 5):
        assert_identical(ckpt.restore(step).state, state(1))
    ckpt.close()


def test_an_incremental_save_without_large_leaves_chooses_nothing(tmp_path: Any) -> None:
    """A save that cut no chunk says nothing of what its chunks shared: the choice waits
    for one that did (it would read the save before's share otherwise)."""
    store = LocalStore(tmp_path)
    ckpt = Checkpointer(NAME, location=store, keep=3, incremental="auto")
    for step in range(3):
        ckpt.save(step, state(0))  # full, full (unchanged), incremental (the first)
    ckpt.save(3, {"w": np.arange(10.0), "step": 3})
    ckpt.save(4, state(0))  # still incremental: everything held by step 2
    assert [incremental(store, step) for step in (2, 4)] == [True, True]
    ckpt.close()


@pytest.mark.parametrize("snapshot", ["copy", "fork"])
def test_asynchronous_saves_switch_too(tmp_path: Any, snapshot: str) -> None:
    if snapshot == "fork" and not sys.platform.startswith("linux"):
        pytest.skip("snapshot='fork' is Linux only")
    store = LocalStore(tmp_path)
    ckpt = Checkpointer(NAME, location=store, keep=2, incremental="auto",
                        snapshot=snapshot)  # type: ignore[arg-type]
    modes = []
    for step in range(5):
        ckpt.save(step, state(step, changed=1), blocking=False).wait()
        modes.append(incremental(store, step))
    assert modes == [False, False, True, True, True]
    for step in ckpt.steps():
        assert_identical(ckpt.restore(step).state, state(step, changed=1))
    closed_and_clean(ckpt, store)


def test_a_reopened_name_starts_in_full_and_reuses_kept_chunks(tmp_path: Any) -> None:
    store = LocalStore(tmp_path)
    first = Checkpointer(NAME, location=store, keep=3, incremental="auto")
    for step in range(4):
        first.save(step, state(0))
    assert incremental(store, 3)
    first.close()
    counting = Counting(store)
    again = Checkpointer(NAME, location=store, keep=3, incremental="auto")
    again.save(4, state(0))  # full: what changed is not known yet
    again.save(5, state(0))
    assert counting.take() >= 2 * state(0)["big"].nbytes
    again.save(6, state(0))  # incremental: the kept step 3 holds every chunk
    assert incremental(store, 6) and counting.take() == 0
    closed_and_clean(again, store)


def test_the_measure_compares_places_and_says_when_it_cannot() -> None:
    base = prepare(state(0)).blobs
    places = quick_places(base, seed=7)
    assert len(places) == 16 and all(stop - start == CHUNK for _, start, stop in places)
    assert unchanged_share({}, places) is None
    assert unchanged_share(places, places) == 1.0
    assert unchanged_share(places, quick_places(prepare(state(1, changed=4)).blobs, 7)) == 0.75
    assert unchanged_share(places, quick_places(base, seed=8)) == 0.0  # another seed
    assert quick_places(prepare({"w": np.arange(10.0)}).blobs, 7) == {}


def test_incremental_takes_true_false_or_auto_and_may_change(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        Checkpointer(NAME, location=tmp_path, incremental="always")  # type: ignore[arg-type]
    store = LocalStore(tmp_path)
    ckpt = Checkpointer(NAME, location=store, incremental=np.True_)  # type: ignore[arg-type]
    assert ckpt.incremental is True
    ckpt.save(1, state(1))
    ckpt.incremental = False
    ckpt.save(2, state(1))
    ckpt.incremental = "auto"
    ckpt.save(3, state(1))
    assert [incremental(store, step) for step in (1, 2, 3)] == [True, False, False]
    ckpt.close()
