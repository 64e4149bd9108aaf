"""Checkpointer semantics: names and steps, StepExists and overwrite, listing and delete,
retention, gc, durability, should_save, preemption."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import safepoint
from safepoint import knobs
from safepoint.checkpointer import (
    Checkpointer,
    collect_garbage,
    committed_steps,
    list_names,
)
from safepoint.errors import CheckpointNotFound, InvalidName, StaleAttempt, StepExists
from safepoint.format import verify_checkpoint
from safepoint.store import LocalStore, Store
from safepoint.store import local as local_module


def _blobs_on_disk(store: Store, name: str, step: int) -> list[str]:
    return [f for f in store.list(f"{name}/{step:012d}") if f.endswith(".bin")]


# ----------------------------------------------------------------- names and steps


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", ".hidden", "", "a\x00b", "a\nb", "..", "-x"])
def test_names_that_could_escape_are_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidName):
        Checkpointer(name, location=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_path_as_the_name_is_a_location_shorthand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ckpt = Checkpointer("runs/exp1")
    assert ckpt.name == "exp1" and ckpt.store.root == tmp_path / "runs"
    absolute = Checkpointer(f"{tmp_path}/abs/exp2")
    assert absolute.name == "exp2" and absolute.store.root == tmp_path / "abs"
    monkeypatch.delenv("SAFEPOINT_DIR", raising=False)
    trailing = Checkpointer("exp3/")
    assert trailing.name == "exp3" and trailing.store.root == tmp_path / ".safepoint"
    with pytest.raises(InvalidName, match="after the bucket"):
        Checkpointer("s3://bucket")


@pytest.mark.parametrize("step", [-1, 1.0, "3", True, False, 2.5, np.float64(1), np.int64(-2)])
def test_steps_must_be_non_negative_ints(tmp_path: Path, step: Any) -> None:
    ckpt = Checkpointer("job", location=tmp_path)
    ckpt.save(0, {"x": 0})
    for call in (lambda: ckpt.save(step, {"x": 1}), lambda: ckpt.restore(step=step),
                 lambda: ckpt.delete(step), lambda: ckpt.manifest(step)):
        with pytest.raises(InvalidName, match="non-negative int"):
            call()
    with pytest.raises(InvalidName):
        ckpt.save(None, {"x": 1})  # type: ignore[arg-type]
    assert ckpt.steps() == [0]


def test_numpy_ints_are_steps(tmp_path: Path) -> None:
    ckpt = Checkpointer("job", location=tmp_path)
    ckpt.save(np.int64(12), {"x": 1})
    assert ckpt.steps() == [12] and type(ckpt.steps()[0]) is int
    assert ckpt.restore(step=np.int32(12)).step == 12


def test_large_step_numbers_sort_by_value(tmp_path: Path) -> None:
    ckpt = Checkpointer("job", location=tmp_path)
    for step in (9, 10**12 + 5):
        ckpt.save(step, {"s": step})
    assert ckpt.steps() == [9, 10**12 + 5]
    assert ckpt.restore().state == {"s": 10**12 + 5}


# ------------------------------------------------------------- save and overwrite


def test_save_restore_list_delete(store: Store) -> None:
    ckpt = Checkpointer("job", location=store)
    assert ckpt.steps() == [] and ckpt.latest_step() is None
    with pytest.raises(CheckpointNotFound) as info:
        ckpt.restore()
    assert isinstance(info.value, FileNotFoundError) and "job" in str(info.value)
    for step in (1, 5, 9):
        ckpt.save(step, {"step": step, "w": np.full(1000, step)}, metadata={"loss": 1 / step})
    assert ckpt.steps() == [1, 5, 9] == list(ckpt) and ckpt.latest_step() == 9
    restored = ckpt.restore()
    assert restored.step == 9 and restored.metadata == {"loss": 1 / 9}
    assert ckpt.restore(step=5).state["step"] == 5
    ckpt.delete(5)
    assert ckpt.steps() == [1, 9]
    listed = store.list("job")  # besides the steps: the writer's lease (and a lock file)
    assert [e for e in listed if e not in (".lock", "lease")] == [
        "000000000001", "000000000001.json", "000000000009", "000000000009.json", "latest.json"]
    assert "lease" in listed
    with pytest.raises(CheckpointNotFound):
        ckpt.delete(5)
    with pytest.raises(CheckpointNotFound):
        ckpt.restore(step=5)
    ckpt.delete_all()
    assert ckpt.steps() == [] and store.list("") == []


def test_existing_or_older_steps_need_overwrite(store: Store) -> None:
    ckpt = Checkpointer("job", location=store)
    ckpt.save(5, {"v": "five"})
    with pytest.raises(StepExists, match="already exists") as info:
        ckpt.save(5, {"v": "again"})
    assert info.value.step == 5 and isinstance(info.value, FileExistsError)
    with pytest.raises(StepExists, match="older than the newest step 5"):
        ckpt.save(3, {"v": "older"})
    assert ckpt.steps() == [5] and ckpt.restore().state == {"v": "five"}
    ckpt.save(3, {"v": "older"}, overwrite=True)
    assert ckpt.steps() == [3, 5]


def test_overwrite_replaces_atomically_and_removes_the_old_blobs(store: Store) -> None:
    ckpt = Checkpointer("job", location=store)
    ckpt.save(5, {"w": np.zeros(10_000), "b": np.ones(10_000)}, metadata={"v": 1})
    old_blobs = _blobs_on_disk(store, "job", 5)
    assert len(old_blobs) == 1  # two small arrays, one pack
    ckpt.save(5, {"w": np.full(10_000, 2.0)}, metadata={"v": 2}, overwrite=True)
    new_blobs = _blobs_on_disk(store, "job", 5)
    assert len(new_blobs) == 1 and not set(new_blobs) & set(old_blobs)
    assert store.list("job/000000000005") == new_blobs
    restored = ckpt.restore(step=5)
    assert restored.metadata == {"v": 2} and set(restored.state) == {"w"}
    assert (restored.state["w"] == 2.0).all()


def test_other_entries_under_the_name_are_left_alone(store: Store) -> None:
    store.commit("job/journal", b"owned by the run layer", durable=False)
    store.commit("job/notes/readme", b"x", durable=False)
    ckpt = Checkpointer("job", location=store, keep=1)
    ckpt.save(1, {"x": 1})
    ckpt.save(2, {"x": 2})
    ckpt.gc()
    assert ckpt.steps() == [2]
    assert store.read("job/journal") == b"owned by the run layer"
    assert list_names(store) == ["job"]
    assert committed_steps(store, "job") == [2]


# ---------------------------------------------------------------------- retention


def _save_steps(ckpt: Checkpointer, steps: range | list[int], losses: dict[int, float] | None = None) -> None:
    for step in steps:
        metadata = {"loss": losses[step]} if losses and step in losses else {}
        ckpt.save(step, {"step": step}, metadata=metadata)


def test_keep_last_n(store: Store) -> None:
    ckpt = Checkpointer("job", location=store, keep=3)
    _save_steps(ckpt, range(1, 8))
    assert ckpt.steps() == [5, 6, 7]
    assert [e for e in store.list("job") if e not in (".lock", "lease")] == [
        "000000000005.json", "000000000006.json", "000000000007.json", "latest.json"]


def test_removed_steps_data_goes_a_save_later_in_the_background(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A removed step's manifest goes at once; its data a save later (a reader may hold the
    manifest), on a thread of its own that the save does not wait for; wait() does."""
    ckpt = Checkpointer("job", location=tmp_path, keep=1)
    state = {"w": np.arange(1 << 18, dtype=np.float64)}  # 2 MiB: a data file of its own
    ckpt.save(1, state)
    ckpt.save(2, state)
    first = tmp_path / "job" / "000000000001"
    assert ckpt.steps() == [2] and first.exists()  # a reader of step 1 can still read it
    gate, entered = threading.Event(), threading.Event()
    real_delete = LocalStore.delete

    def gated(self: LocalStore, key: str) -> None:
        if key.startswith("job/000000000001"):
            entered.set()
            assert gate.wait(30)
        real_delete(self, key)

    monkeypatch.setattr(LocalStore, "delete", gated)
    ckpt.save(3, state)  # returns while the removal of step 1's data is held at the gate
    assert entered.wait(30) and first.exists() and ckpt.steps() == [3]
    gate.set()
    ckpt.wait()
    assert not first.exists() and (tmp_path / "job" / "000000000002").exists()
    ckpt.close()
    assert safepoint.check(tmp_path).ok


def test_a_step_saved_again_over_a_removed_one_keeps_its_data(tmp_path: Path) -> None:
    """Step 2 is removed (its data deferred), then saved again with overwrite=True and a
    better metric, so retention keeps it: the deferred removal must not take its data."""
    ckpt = Checkpointer("job", location=tmp_path, keep=1, keep_best=1, best_metric="loss")
    data = {n: {"w": np.full(1 << 18, float(n))} for n in (1, 2, 3)}
    for step, loss in ((1, 1.0), (2, 2.0), (3, 3.0)):
        ckpt.save(step, data[step], metadata={"loss": loss})
    assert ckpt.steps() == [1, 3]  # step 2's data goes a save later
    again = {"w": np.full(1 << 18, 22.0)}
    ckpt.save(2, again, metadata={"loss": 0.5}, overwrite=True)
    ckpt.save(4, data[3], metadata={"loss": 4.0})
    ckpt.wait()
    assert ckpt.steps() == [2, 4]
    assert (ckpt.restore(2).state["w"] == 22.0).all()
    ckpt.close()
    assert safepoint.check(tmp_path).ok


def test_a_writer_fenced_with_removals_pending_leaves_the_newer_ones_steps_whole(tmp_path: Path) -> None:
    old = Checkpointer("job", location=tmp_path, keep=1)
    state = {"w": np.arange(1 << 18, dtype=np.float64)}
    old.save(1, state)
    old.save(2, state)  # step 1's data is deferred to old's next save
    new = Checkpointer("job", location=tmp_path, takeover=True)  # keeps every step
    new.save(3, state)  # takes the lease over: old is fenced
    new.save(1, {"w": state["w"] + 1}, overwrite=True)  # into the folder old would remove
    with pytest.raises(StaleAttempt):
        old.save(4, state)
    old.wait()
    assert new.steps() == [1, 2, 3]
    assert (new.restore(1).state["w"] == state["w"] + 1).all()
    new.close()
    old.close()
    assert safepoint.check(tmp_path).ok


def test_keep_every_k_and_last_n_is_a_union(tmp_path: Path) -> None:
    ckpt = Checkpointer("job", location=tmp_path, keep=2, keep_every=5)
    _save_steps(ckpt, range(1, 13))
    assert ckpt.steps() == [5, 10, 11, 12]


@pytest.mark.parametrize(("mode", "best"), [("min", [2, 6]), ("max", [3, 7])])
def test_keep_best_by_metric(tmp_path: Path, mode: str, best: list[int]) -> None:
    losses = {1: 0.5, 2: 0.1, 3: 0.9, 4: 0.4, 5: float("nan"), 6: 0.2, 7: 0.8, 8: 0.3}
    ckpt = Checkpointer("job", location=tmp_path, keep_best=2, best_metric="loss", best_mode=mode)
    _save_steps(ckpt, range(1, 9), losses)
    assert ckpt.steps() == sorted({*best, 8})  # the newest step is always kept


def test_keep_best_reads_metrics_of_steps_saved_earlier(tmp_path: Path) -> None:
    losses = {1: 0.1, 2: 0.9, 3: 0.8, 4: 0.7}
    _save_steps(Checkpointer("job", location=tmp_path), range(1, 4), losses)
    ckpt = Checkpointer("job", location=tmp_path, keep_best=1, best_metric="loss", keep=1)
    ckpt.save(4, {"step": 4}, metadata={"loss": 0.7})
    assert ckpt.steps() == [1, 4]


def test_keep_best_with_an_overwritten_metric(tmp_path: Path) -> None:
    ckpt = Checkpointer("job", location=tmp_path, keep_best=1, best_metric="loss")
    _save_steps(ckpt, [1, 2, 3], {1: 0.1, 2: 0.5, 3: 0.6})
    assert ckpt.steps() == [1, 3]
    ckpt.save(1, {"step": 1}, metadata={}, overwrite=True)  # step 1 has no loss any more
    assert ckpt.steps() == [3]  # so it is no longer the best: 3 is, and the newest


def test_the_newest_step_survives_any_rule(tmp_path: Path) -> None:
    ckpt = Checkpointer("job", location=tmp_path, keep_every=100)
    _save_steps(ckpt, [1, 2, 3])
    assert ckpt.steps() == [3]


@pytest.mark.parametrize("kwargs", [{"keep": 0}, {"keep": -1}, {"keep": 1.5}, {"keep_every": 0},
                                    {"keep_best": 2}, {"keep_best": 1, "best_metric": "x", "best_mode": "avg"}])
def test_bad_retention_settings(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Checkpointer("job", location=tmp_path, **kwargs)


# -------------------------------------------------------------------------- gc


def _make_leftovers(store: LocalStore, ckpt: Checkpointer) -> list[Path]:
    ckpt.save(1, {"w": np.zeros(10_000)})
    folder = store.path("job/000000000001")
    crashed = store.path("job/000000000002")
    crashed.mkdir()
    leftovers = [folder / "deadbeef0000-0.bin", store.path("job/.000000000002.json.0123456789ab.tmp"),
                 crashed / "cafebabe0000-0.bin"]
    for path in leftovers:
        path.write_bytes(b"leftover")
    return leftovers


def test_gc_removes_leftovers_of_crashed_saves(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    ckpt = Checkpointer("job", location=store)
    leftovers = _make_leftovers(store, ckpt)
    assert ckpt.steps() == [1]  # leftovers are invisible
    removed = ckpt.gc()
    assert sorted(removed) == ["job/.000000000002.json.0123456789ab.tmp",
                               "job/000000000001/deadbeef0000-0.bin", "job/000000000002"]
    assert not any(path.exists() for path in leftovers)
    assert verify_checkpoint(store, "job", 1).ok
    assert ckpt.restore().step == 1


def test_a_dry_run_and_check_report_leftovers_without_removing_them(tmp_path: Path) -> None:
    """collect_garbage(dry_run=True) removed what it reported, and so did safepoint.check()
    without fix=True (a `safepoint verify` could delete a save in flight)."""
    from safepoint import check

    store = LocalStore(tmp_path)
    leftovers = _make_leftovers(store, Checkpointer("job", location=store))
    assert len(collect_garbage(store, "job", dry_run=True).removed) == 3
    report = check(store)
    assert report.ok and len(report.leftovers) == 3
    assert all(path.exists() for path in leftovers)
    assert len(check(store, fix=True).removed) == 3
    assert not any(path.exists() for path in leftovers)


def test_gc_spares_young_leftovers_that_may_be_a_save_in_flight(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    ckpt = Checkpointer("job", location=store)
    leftovers = _make_leftovers(store, ckpt)
    assert ckpt.gc(min_age=60) == []
    old = os.stat(leftovers[0]).st_mtime - 120
    for path in [*leftovers, leftovers[2].parent]:
        os.utime(path, (old, old))
    # another process's gc: the name's writer is running, so nothing goes, however old
    kept = collect_garbage(store, "job", min_age=60)
    assert kept.removed == [] and kept.kept  # (a temporary file is kept without a word)
    assert all("is running: a save may be in progress" in why for _, why in kept.kept)
    assert all(path.exists() for path in leftovers)
    assert len(collect_garbage(store, "job", min_age=60, writer=True).removed) == 3  # the writer's own


def test_gc_leaves_a_running_writers_leftovers_alone_however_old(tmp_path: Path) -> None:
    """``safepoint gc`` (``check(fix=True)``) from another process removes nothing a running
    writer may still be writing: a save of a large state may outlast any ``min_age``. Once
    the writer has stopped, the same leftovers go."""
    from safepoint import check

    store = LocalStore(tmp_path)
    ckpt = Checkpointer("job", location=store)
    leftovers = _make_leftovers(store, ckpt)
    old = os.stat(leftovers[0]).st_mtime - 3600
    for path in [*leftovers, leftovers[2].parent]:
        os.utime(path, (old, old))
    report = check(store, fix=True, min_age=60)
    assert report.removed == [] and all(path.exists() for path in leftovers)
    assert {f.what for f in report.findings if "is running" in f.detail} == {"kept"}
    ckpt.close()  # the lease is released: no writer
    assert len(check(store, fix=True, min_age=60).removed) == 3
    assert not any(path.exists() for path in leftovers)
    assert check(store).clean


def test_the_first_save_removes_only_old_leftovers(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    leftovers = _make_leftovers(store, Checkpointer("job", location=store))
    young, old_one = leftovers[0], leftovers[1]
    old = os.stat(old_one).st_mtime - knobs.LEFTOVER_MIN_AGE - 10
    os.utime(old_one, (old, old))
    ckpt = Checkpointer("job", location=store)
    ckpt.save(3, {"x": 3})
    ckpt.close()  # the sweep runs beside the saves; close() waits for it
    assert young.exists() and not old_one.exists()


def test_gc_never_deletes_a_damaged_checkpoint(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    ckpt = Checkpointer("job", location=store)
    ckpt.save(1, {"w": np.zeros(10_000)})
    manifest = store.path("job/000000000001.json")
    manifest.write_bytes(manifest.read_bytes()[:-5])
    assert ckpt.gc() == []
    assert len(store.list("job/000000000001")) == 1


# ------------------------------------------------------------------- durability


def _count_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(local_module.os, "fsync", counting)
    return calls


class _CountingStore(LocalStore):
    """A LocalStore that counts the protocol calls it receives."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.calls: Counter[str] = Counter()

    def list(self, prefix: str = "") -> list[str]:
        self.calls["list"] += 1
        return super().list(prefix)

    def stat(self, key: str) -> Any:
        self.calls["stat"] += 1
        return super().stat(key)

    def read(self, key: str, *, limit: int | None = None) -> bytes:
        self.calls["read"] += 1
        return super().read(key, limit=limit)

    def commit(self, key: str, data: bytes, *, durable: bool) -> None:
        self.calls["commit"] += 1
        super().commit(key, data, durable=durable)

    def publish(self, key: str, data: bytes, **how: Any) -> Any:
        self.calls["publish"] += 1
        return super().publish(key, data, **how)


def test_a_small_save_stats_twice_publishes_once_and_lists_nothing(tmp_path: Path) -> None:
    store = _CountingStore(tmp_path)
    ckpt = Checkpointer("job", location=store)
    for step in range(5):
        ckpt.save(step, {"step": step})
    store.calls.clear()
    ckpt.save(5, {"step": 5})
    # the newest step (once), the writer's lease ticket (still there?), then the commit
    assert store.calls == {"stat": 2, "publish": 1}
    store.calls.clear()
    ckpt.save(5, {"step": "again"}, overwrite=True)
    assert store.calls["read"] == 1  # the manifest it replaces, kept to roll back a failure


def test_durable_saves_fsync_and_durable_false_does_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_fsyncs(monkeypatch)
    state = {"w": np.zeros(10_000), "b": np.ones(10_000), "n": 1}
    Checkpointer("durable", location=tmp_path).save(1, state)
    assert len(calls) >= 4  # two blobs, the manifest, its folder
    calls.clear()
    fast = Checkpointer("fast", location=tmp_path, durable=False, keep=1)
    fast.save(1, state)
    fast.save(2, state, blocking=False)
    fast.wait()
    fast.save(2, state, overwrite=True)
    assert calls == []
    assert fast.restore().step == 2


# ---------------------------------------------------------------- should_save


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_should_save_by_steps_and_by_time(tmp_path: Path) -> None:
    clock = FakeClock()
    ckpt = Checkpointer("job", location=tmp_path, save_interval_steps=10,
                        save_interval_seconds=60, clock=clock)
    assert [s for s in range(1, 31) if ckpt.should_save(s)] == [10, 20, 30]
    clock.now += 59
    assert not ckpt.should_save(7)
    clock.now += 1
    assert ckpt.should_save(7)
    ckpt.save(7, {"x": 7})  # saving restarts the interval
    assert not ckpt.should_save(8)
    clock.now += 60
    assert ckpt.should_save(8)
    assert not Checkpointer("never", location=tmp_path).should_save(10)


def test_sigterm_asks_for_a_last_save(tmp_path: Path) -> None:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        ckpt = Checkpointer("job", location=tmp_path, handle_preemption=True)
        assert not ckpt.preempted and not ckpt.should_save(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert ckpt.preempted and ckpt.should_save(1)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_retention_rules_compose(tmp_path: Path) -> None:
    from safepoint import keep_best, keep_every, keep_last

    ckpt = Checkpointer("job", location=tmp_path,
                        keep=keep_last(2) | keep_every(5) | keep_best("loss", 1))
    losses = {s: abs(s - 3) + 0.5 for s in range(1, 13)}
    _save_steps(ckpt, range(1, 13), losses)
    assert ckpt.steps() == [3, 5, 10, 11, 12]
    both = Checkpointer("both", location=tmp_path, keep=keep_every(2) & keep_last(4))
    _save_steps(both, range(1, 11))
    assert both.steps() == [6, 8, 10]  # even, and among the newest four of those kept


def test_saves_go_on_after_deleting_the_newest_step_or_everything(tmp_path: Path) -> None:
    ckpt = Checkpointer("job", location=tmp_path)
    ckpt.save(1, {"n": 1})
    ckpt.save(2, {"n": 2})
    ckpt.delete(2)  # the newest-step record moves back to step 1
    ckpt.save(3, {"n": 3})
    assert ckpt.steps() == [1, 3] and ckpt.restore().state == {"n": 3}
    ckpt.delete_all()  # the name goes, the writer's lease with it
    ckpt.save(4, {"n": 4})  # a new lease, taken at this save
    assert ckpt.steps() == [4] and ckpt.restore().state == {"n": 4}
    ckpt.close()


def test_gc_never_removes_a_file_a_save_writes_meanwhile_into_an_old_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer resumed after a crash saves step 2 again, into the folder its crashed save
    left an hour ago, while its own sweep of old leftovers runs (min_age): the sweep removes
    the old leftover file, never the new one, nor the folder under it (it was removed whole,
    recursively, before)."""
    store = LocalStore(tmp_path)
    ckpt = Checkpointer("job", location=store)
    ckpt.save(1, {"x": 1})
    folder = store.path("job/000000000002")
    folder.mkdir()
    stale = folder / "cafebabe0000-0.bin"
    stale.write_bytes(b"leftover")
    old = time.time() - 7200
    for path in (stale, folder):
        os.utime(path, (old, old))
    fresh = folder / "0123456789ab-0.bin"
    real_scan = LocalStore.scan

    def scan_then_write(self: LocalStore, prefix: str = "") -> Any:
        entries = real_scan(self, prefix)
        if prefix == "job/000000000002" and not fresh.exists():
            fresh.write_bytes(b"the new save's data")  # right after gc looked
            os.utime(folder, (old, old))  # even if the folder still looks old
        return entries

    monkeypatch.setattr(LocalStore, "scan", scan_then_write)
    report = collect_garbage(store, "job", min_age=60, writer=True)
    assert fresh.read_bytes() == b"the new save's data" and not stale.exists()
    assert ("job/000000000002/cafebabe0000-0.bin", 8) in report.removed  # what went, not the folder
    assert ("job/000000000002", "a save wrote into it meanwhile") in report.kept
