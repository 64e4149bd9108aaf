"""Distributed checkpoints with store-coordinated ranks (threads of one process): sharded
save and restore round trips, resharding onto other world sizes, failures, and the tools."""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import safepoint
from safepoint import Checkpointer, PerRank, SaveFailed, Shard, StateMismatch, StoreGroup, knobs
from safepoint.format import read_manifest
from safepoint.format.read import FileSet

SHAPE = (301, 77)  # neither dimension divides evenly
FULL = np.arange(SHAPE[0] * SHAPE[1], dtype=np.float32).reshape(SHAPE) * 0.5


def bounds(total: int, ranks: int, rank: int, uneven: bool = False) -> tuple[int, int]:
    """Rank ``rank``'s slice of ``total`` rows: even (torch.chunk-like) or deliberately lopsided."""
    if uneven:
        cuts = [0, *sorted({max(1, total * (i * i) // (ranks * ranks)) for i in range(1, ranks)}), total]
        cuts = (cuts + [total] * ranks)[: ranks + 1]
        return cuts[rank], cuts[rank + 1]
    return total * rank // ranks, total * (rank + 1) // ranks


def block(layout: str, ranks: int, rank: int) -> tuple[tuple[int, int], tuple[slice, slice]]:
    """Offsets and slices of rank ``rank``'s block of FULL in ``layout``."""
    if layout == "rows":
        a, b = bounds(SHAPE[0], ranks, rank)
        return (a, 0), (slice(a, b), slice(None))
    if layout == "columns":
        a, b = bounds(SHAPE[1], ranks, rank)
        return (0, a), (slice(None), slice(a, b))
    if layout == "uneven":
        a, b = bounds(SHAPE[0], ranks, rank, uneven=True)
        return (a, 0), (slice(a, b), slice(None))
    if layout == "grid":  # 2-D blocks: rows by rank pairs, columns by parity
        rows = max(1, ranks // 2)
        r0, r1 = bounds(SHAPE[0], rows, min(rank // 2, rows - 1)) if ranks > 1 else (0, SHAPE[0])
        if ranks == 1:
            return (0, 0), (slice(None), slice(None))
        if ranks % 2 and rank == ranks - 1:  # the odd one out takes a full row band
            r0, r1 = bounds(SHAPE[0], rows + 1, rows)
            return (r0, 0), (slice(r0, r1), slice(None))
        if ranks % 2:
            r0, r1 = bounds(SHAPE[0], rows + 1, rank // 2)
        c0, c1 = bounds(SHAPE[1], 2, rank % 2)
        return (r0, c0), (slice(r0, r1), slice(c0, c1))
    raise AssertionError(layout)


def run_ranks(count: int, work: Callable[[int, StoreGroup], Any], *, timeout: float = 30.0) -> list[Any]:
    """Run ``work(rank, group)`` on ``count`` threads sharing one StoreGroup launch."""
    run_id = uuid.uuid4().hex
    results: list[Any] = [None] * count

    def one(rank: int) -> None:
        try:
            results[rank] = work(rank, StoreGroup(rank, count, run_id, timeout=timeout, poll=0.002))
        except BaseException as exc:  # reported to the test
            results[rank] = exc

    threads = [threading.Thread(target=one, args=(r,)) for r in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout * 3)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return results


def ok(results: list[Any]) -> list[Any]:
    for r, value in enumerate(results):
        if isinstance(value, BaseException):
            raise AssertionError(f"rank {r} failed: {value!r}") from value
    return results


def save_sharded(root: Path, ranks: int, layout: str, step: int = 1, *, blocking: bool = True,
                 scale: float = 1.0, extra: Any = None, name: str = "job") -> None:
    def work(rank: int, group: StoreGroup) -> int:
        offsets, where = block(layout, ranks, rank)
        ckpt = Checkpointer(name, location=root, group=group, keep=2)
        state = {"w": Shard((FULL * scale)[where].copy(), offsets, SHAPE), "step": step,
                 "lr": 0.25, "seen": PerRank(rank * 100 + step)}
        if extra is not None:
            state["extra"] = extra
        ckpt.save(step, state, blocking=blocking).wait()
        ckpt.close()
        return rank

    ok(run_ranks(ranks, work))


def restore_sharded(root: Path, ranks: int, layout: str, *, name: str = "job",
                    per_rank: bool = True) -> list[Any]:
    def work(rank: int, group: StoreGroup) -> tuple[np.ndarray, np.ndarray, Any]:
        offsets, where = block(layout, ranks, rank)
        local = np.full(FULL[where].shape, -1, np.float32)
        target: dict[str, Any] = {"w": Shard(local, offsets, SHAPE), "step": 0, "lr": 0.0}
        if per_rank:
            target["seen"] = PerRank(None)
        restored = Checkpointer(name, location=root, group=group).restore(into=target)
        assert restored.state["w"].data is local  # filled in place
        return local, FULL[where], restored

    return ok(run_ranks(ranks, work))


LAYOUTS = ["rows", "columns", "uneven", "grid"]


@pytest.mark.parametrize("saved, restored", [(4, 2), (2, 4), (3, 2), (2, 3), (1, 3), (3, 1), (2, 2)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_restore_on_another_world_size_is_bit_exact(tmp_path: Path, saved: int, restored: int,
                                                    layout: str) -> None:
    save_sharded(tmp_path, saved, layout)
    for other in LAYOUTS:  # any saved layout onto any other layout
        got = restore_sharded(tmp_path, restored, other, per_rank=saved == restored)
        for rank, (local, expected, result) in enumerate(got):
            assert np.array_equal(local, expected)
            assert result.state["step"] == 1 and result.state["lr"] == 0.25
            if saved == restored:
                assert result.state["seen"] == rank * 100 + 1
    whole = Checkpointer("job", location=tmp_path).restore()  # one process: the global array
    assert np.array_equal(whole.state["w"], FULL)
    assert whole.state["seen"] == [r * 100 + 1 for r in range(saved)]
    assert safepoint.check(tmp_path).ok


def test_each_rank_gets_its_own_per_rank_value_back(tmp_path: Path) -> None:
    save_sharded(tmp_path, 3, "rows", step=7)
    got = restore_sharded(tmp_path, 3, "rows")
    assert [r.state["seen"] for _, _, r in got] == [7, 107, 207]


def test_a_per_rank_target_on_another_world_size_is_refused(tmp_path: Path) -> None:
    save_sharded(tmp_path, 3, "rows")
    with pytest.raises(AssertionError) as failed:
        restore_sharded(tmp_path, 2, "rows", per_rank=True)
    assert isinstance(failed.value.__cause__, StateMismatch)
    assert "saved by 3 ranks cannot be restored on 2" in str(failed.value.__cause__)
    got = restore_sharded(tmp_path, 2, "rows", per_rank=False)  # not asked for: all of them
    assert got[0][2].state["seen"] == [1, 101, 201]


def test_replicated_blocks_are_saved_once(tmp_path: Path) -> None:
    """Ranks that hold the same block (replicated: DTensor's Replicate) write it once."""
    def work(rank: int, group: StoreGroup) -> None:
        half = rank % 2
        a, b = bounds(SHAPE[0], 2, half)
        ckpt = Checkpointer("job", location=tmp_path, group=group)
        ckpt.save(1, {"w": Shard(FULL[a:b].copy(), (a, 0), SHAPE)})

    ok(run_ranks(4, work))
    node = read_manifest(safepoint.checkpointer.core.open_store(tmp_path), "job", 1).body["tree"]["w"]
    assert node["$"] == "sharded" and len(node["shards"]) == 2
    assert np.array_equal(Checkpointer("job", location=tmp_path).restore().state["w"], FULL)


def test_async_sharded_save_and_retention(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        save_sharded(tmp_path, 3, "uneven", step=step, blocking=False, scale=step)
    reader = Checkpointer("job", location=tmp_path)
    assert reader.steps() == [2, 3]  # keep=2, applied by the coordinator
    assert np.array_equal(reader.restore().state["w"], FULL * 3)
    assert safepoint.check(tmp_path).ok
    reader.gc()  # the removed step's data goes a save later, or with gc: every rank's files
    assert not list((tmp_path / "job").glob("000000000001*"))


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read"])
def test_restore_reads_only_the_byte_ranges_it_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     mapped: bool) -> None:
    """Every byte a restore takes from a data file is verified first, so the bytes checked
    are the bytes read, whether a map of the file serves them or a read into a buffer."""
    monkeypatch.setattr(knobs, "SHARD_RANGE", 64 << 10)
    big = (4096, 512)  # 8 MiB of float32 over 4 ranks
    data = np.random.default_rng(0).standard_normal(big).astype(np.float32)

    def save(rank: int, group: StoreGroup) -> None:
        a, b = bounds(big[0], 4, rank)
        Checkpointer("big", location=tmp_path, group=group).save(1, {"w": Shard(data[a:b].copy(), (a, 0), big)})

    ok(run_ranks(4, save))
    store_type = type(safepoint.checkpointer.core.open_store(tmp_path))
    monkeypatch.setattr(store_type, "supports_mmap", mapped)
    checked: dict[int, int] = {}  # bytes verified, by rank (its parts are small: no pool)
    reads: list[int] = []
    lock = threading.Lock()
    ranks = threading.local()  # counts only the ranks' own calls, never another thread's
    original_check, original_read = FileSet._check, store_type.read_range

    def counting_check(self: FileSet, key: str, data: Any, expected: str, blob: dict[str, Any]) -> None:
        rank = getattr(ranks, "rank", None)
        if rank is not None:
            with lock:
                checked[rank] = checked.get(rank, 0) + memoryview(data).nbytes
        original_check(self, key, data, expected, blob)

    def counting_read(self: Any, key: str, offset: int, out: Any) -> int:
        got = original_read(self, key, offset, out)
        if getattr(ranks, "rank", None) is not None:
            with lock:
                reads.append(got)
        return got

    monkeypatch.setattr(FileSet, "_check", counting_check)
    monkeypatch.setattr(store_type, "read_range", counting_read)

    def restore(rank: int, group: StoreGroup) -> int:
        a, b = bounds(big[0], 3, rank)  # 4 -> 3: every rank straddles saved blocks
        local = np.empty((b - a, big[1]), np.float32)
        ranks.rank = rank
        try:
            Checkpointer("big", location=tmp_path, group=group).restore(into={"w": Shard(local, (a, 0), big)})
        finally:
            ranks.rank = None
        assert np.array_equal(local, data[a:b])
        return local.nbytes

    needed = ok(run_ranks(3, restore))
    got = [checked.get(rank, 0) for rank in range(3)]
    assert len(checked) == 3
    for nbytes, verified in zip(needed, got, strict=True):
        assert nbytes <= verified <= nbytes + 2 * 2 * (64 << 10)  # at most one range too many at each edge
    big_reads = sum(n for n in reads if n >= 64 << 10)
    assert big_reads == (0 if mapped else sum(got))  # a map copies nothing before the fill


def test_a_failing_rank_leaves_no_checkpoint_and_every_rank_raises(tmp_path: Path) -> None:
    save_sharded(tmp_path, 3, "rows", step=1)

    def work(rank: int, group: StoreGroup) -> None:
        offsets, where = block("rows", 3, rank)
        value: Any = object() if rank == 1 else 1  # not storable: rank 1 fails to encode
        with Checkpointer("job", location=tmp_path, group=group) as ckpt:
            ckpt.save(2, {"w": Shard(FULL[where].copy(), offsets, SHAPE), "bad": PerRank(value)})

    results = run_ranks(3, work)
    assert all(isinstance(r, Exception) for r in results)
    assert "rank 1" in str(results[0]) and "cannot store" in str(results[0])
    assert isinstance(results[2], SaveFailed) and "rank 1" in str(results[2])
    assert Checkpointer("job", location=tmp_path).steps() == [1]
    assert not (tmp_path / "job" / "000000000002").exists() or not any(
        (tmp_path / "job" / "000000000002").iterdir())
    assert safepoint.check(tmp_path).ok


def test_shards_that_do_not_tile_the_array_are_refused(tmp_path: Path) -> None:
    def overlap(rank: int, group: StoreGroup) -> None:
        with Checkpointer("job", location=tmp_path, group=group) as ckpt:
            ckpt.save(1, {"w": Shard(FULL[rank : rank + 200].copy(), (rank, 0), SHAPE)})

    results = run_ranks(2, overlap)
    assert isinstance(results[0], StateMismatch) and isinstance(results[1], SaveFailed)
    assert "overlap" in str(results[0]) and "rank 0" in str(results[1])
    assert Checkpointer("job", location=tmp_path).latest_step() is None

    def disagree(rank: int, group: StoreGroup) -> None:
        shape = SHAPE if rank == 0 else (SHAPE[0] + 1, SHAPE[1])
        a, b = bounds(SHAPE[0], 2, rank)
        with Checkpointer("job", location=tmp_path, group=group) as ckpt:
            ckpt.save(1, {"w": Shard(FULL[a:b].copy(), (a, 0), shape)})

    results = run_ranks(2, disagree)
    assert isinstance(results[0], StateMismatch) and isinstance(results[1], SaveFailed)
    assert "same global array" in str(results[0]) and "same global array" in str(results[1])
    assert safepoint.check(tmp_path).ok


def test_damage_in_one_ranks_block_makes_every_rank_fall_back_together(tmp_path: Path) -> None:
    save_sharded(tmp_path, 2, "rows", step=1)
    save_sharded(tmp_path, 2, "rows", step=2, scale=2.0)
    manifest = read_manifest(safepoint.checkpointer.core.open_store(tmp_path), "job", 2)
    node = manifest.body["tree"]["w"]["shards"][1]  # rank 1's block of step 2
    rel = manifest.files[manifest.blobs[node["blob"]]["ranges"][0][0]][0]
    path = tmp_path / "job" / rel
    raw = bytearray(path.read_bytes())
    raw[10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.warns(safepoint.CorruptCheckpointWarning):
        got = restore_sharded(tmp_path, 2, "rows")
    for local, expected, result in got:
        assert result.step == 1  # rank 0's block of step 2 was intact: it fell back too
        assert np.array_equal(local, expected)
    report = safepoint.check(tmp_path)
    assert not report.ok and "checksum mismatch" in str(report.findings)


def test_torch_tensors_as_shards(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    full = torch.arange(SHAPE[0] * SHAPE[1], dtype=torch.bfloat16).reshape(SHAPE)

    def save(rank: int, group: StoreGroup) -> None:
        a, b = bounds(SHAPE[0], 2, rank)
        Checkpointer("t", location=tmp_path, group=group).save(1, {"w": Shard(full[a:b].clone(), (a, 0), SHAPE)})

    ok(run_ranks(2, save))

    def restore(rank: int, group: StoreGroup) -> bool:
        a, b = bounds(SHAPE[1], 3, rank)
        local = torch.zeros(SHAPE[0], b - a, dtype=torch.bfloat16)
        got = Checkpointer("t", location=tmp_path, group=group).restore(
            into={"w": Shard(local, (0, a), SHAPE)})
        return got.state["w"].data is local and bool(torch.equal(local, full[:, a:b]))

    assert ok(run_ranks(3, restore)) == [True, True, True]
    whole = Checkpointer("t", location=tmp_path).restore().state["w"]
    assert isinstance(whole, torch.Tensor) and torch.equal(whole, full)


def test_tools_understand_sharded_checkpoints(tmp_path: Path) -> None:
    save_sharded(tmp_path, 4, "grid")
    report = safepoint.check(tmp_path)
    assert report.ok and report.checked and report.checked[0].checked_bytes >= FULL.nbytes
    from typer.testing import CliRunner

    from safepoint.cli import app
    shown = CliRunner().invoke(app, ["show", "job", "--location", str(tmp_path), "--json"])
    assert shown.exit_code == 0, shown.output
    body = json.loads(shown.output)
    assert body["step"] == 1 and body["format_version"] == 4
    rows = {row["path"]: row for row in body["tree"]}
    assert rows["state['w']"]["type"] == "ndarray in 4 shards"
    assert rows["state['w']"]["shape"] == list(SHAPE)
    assert rows["state['seen']<rank 2>"]["value"] == "201"
    exported = CliRunner().invoke(app, ["export", "job", "--to", str(tmp_path / "out.npz"),
                                        "--location", str(tmp_path)])
    assert exported.exit_code == 0, exported.output
    assert np.array_equal(np.load(tmp_path / "out.npz")["w"], FULL)
    listed = CliRunner().invoke(app, ["verify", "--location", str(tmp_path)])
    assert listed.exit_code == 0, listed.output


def test_a_single_process_shard_must_cover_the_array(tmp_path: Path) -> None:
    ckpt = Checkpointer("one", location=tmp_path)
    ckpt.save(1, {"w": Shard(FULL, (0, 0), SHAPE)})
    assert np.array_equal(ckpt.restore().state["w"], FULL)
    with pytest.raises(StateMismatch, match="cover"):
        ckpt.save(2, {"w": Shard(FULL[:10], (0, 0), SHAPE)})
    assert ckpt.steps() == [1]


@pytest.mark.parametrize("offsets, shape, message", [
    ((0,), SHAPE, "needs 2 offsets"),
    ((300, 0), SHAPE, "does not fit"),
    ((-1, 0), SHAPE, "non-negative"),
])
def test_bad_shard_descriptions_are_refused(offsets: Any, shape: Any, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        Shard(FULL[:10], offsets, shape)


def test_store_group_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rank"):
        StoreGroup(3, 3, "x")
    with pytest.raises(ValueError, match="run_id"):
        StoreGroup(0, 2, "")


def test_every_layout_pair_tiles() -> None:
    """The test's own layouts are exact tilings (so the round trips above test something)."""
    for layout, ranks in itertools.product(LAYOUTS, range(1, 6)):
        seen = np.zeros(SHAPE, np.int32)
        for rank in range(ranks):
            _, where = block(layout, ranks, rank)
            seen[where] += 1
        assert (seen == 1).all(), (layout, ranks)


def test_a_leftover_manifest_of_the_step_is_replaced_by_the_holder(tmp_path: Path) -> None:
    """A coordinator that died after writing its step's manifest, before the newest-step
    record: the next launch's save of that step retries its commit, merging again."""
    save_sharded(tmp_path, 3, "rows", step=1)
    (tmp_path / "job" / "000000000002.json").write_bytes(
        (tmp_path / "job" / "000000000001.json").read_bytes())
    save_sharded(tmp_path, 3, "columns", step=2, scale=2.0)
    restored = Checkpointer("job", location=tmp_path).restore()
    assert restored.step == 2 and np.array_equal(restored.state["w"], FULL * 2)
    assert restored.state["seen"] == [2, 102, 202]
    assert safepoint.check(tmp_path).ok


def test_sharded_checkpoints_on_an_fsspec_store() -> None:
    """memory:// through the fsspec backend: the ranks' files, the exchange and the range
    reads of a restore onto another layout go through fsspec."""
    location = f"memory://sharded-{uuid.uuid4().hex}"

    def save(rank: int, group: StoreGroup) -> None:
        offsets, where = block("rows", 3, rank)
        with Checkpointer("job", location=location, group=group) as ckpt:
            ckpt.save(1, {"w": Shard(FULL[where].copy(), offsets, SHAPE), "lr": 0.5})

    ok(run_ranks(3, save))

    def restore(rank: int, group: StoreGroup) -> bool:
        offsets, where = block("columns", 2, rank)
        local = np.zeros(FULL[where].shape, np.float32)
        with Checkpointer("job", location=location, group=group) as ckpt:
            ckpt.restore(into={"w": Shard(local, offsets, SHAPE), "lr": 0.0})
        return bool(np.array_equal(local, FULL[where]))

    assert ok(run_ranks(2, restore)) == [True, True]
    assert np.array_equal(Checkpointer("job", location=location).restore().state["w"], FULL)
    assert safepoint.check(location).ok
