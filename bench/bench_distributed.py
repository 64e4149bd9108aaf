"""Distributed benchmarks: a sharded state saved by every rank of a gloo process group, with
safepoint (``Checkpointer(group=TorchGroup())``, ``Shard`` leaves) against
``torch.distributed.checkpoint`` (DCP, ``DTensor`` leaves on a 1-D CPU device mesh), on the
same tensors in the same run.

Three comparisons, each as ratios safepoint ÷ DCP with their per-round spreads:

1. A sharded durable save on 2 and on 4 ranks. Every save fsyncs: safepoint by default,
   DCP through ``FileSystemWriter(sync_files=True)`` (its default, given explicitly).
2. A resharded restore: a checkpoint saved by 4 ranks, loaded by 2 ranks into their own
   (twice as large) blocks, in place: ``restore(into={"w": Shard(buf, ...)})`` against
   ``dcp.load`` into ``DTensor``s of the 2-rank layout. Every result is checked bit for bit
   against the rank's own blocks, outside the timing. Warm page cache: the checkpoints
   were just written (dropping the cache needs root).
3. The blocking time of an asynchronous save (until ``save(blocking=False)`` returns)
   against ``dcp.async_save`` (until it returns its future), on 2 and 4 ranks, with DCP's
   default stager (new copies each call) and with one reused stager (cached copies); the
   background write is awaited outside the timing.

The ranks are processes spawned with ``torch.multiprocessing`` (spawn start method), one
world of 4 then one of 2. Each timed call starts at a barrier, after an ``os.sync()``, and
lasts until the slowest rank returns (the maximum over the ranks); one untimed round comes
first (the steady state), then the rounds, interleaved. Skipped when torch (with
torch.distributed, DCP and DTensor) is not installed.
"""

from __future__ import annotations

import datetime
import gc
import itertools
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import Case, GiB, MiB, Report, Section, Skip, format_bytes
from bench.bench_core import optional

TENSORS = 4  # sharded float32 matrices, row-sharded across the ranks
TILES = 8  # each matrix is generated in TILES row tiles (seeded by tile): any world size
#            dividing TILES can make its own block without the others'
WORLDS = (4, 2)  # the 4-rank world runs first: it writes the checkpoint the 2-rank one reshards
SAVE, ASYNC, RESTORE = "save", "async", "restore"
SP_SAVE, DCP_SAVE = "safepoint", "dcp.save"
SP_ASYNC = "safepoint save(blocking=False)"
DCP_ASYNC = "dcp.async_save"
DCP_ASYNC_CACHED = "dcp.async_save, cached staging"
SP_RESTORE = "safepoint restore(into=Shard)"
SP_RESTORE_DTENSOR = "safepoint restore(into=DTensor)"
DCP_LOAD = "dcp.load into DTensor"


@dataclass(frozen=True)
class Config:
    """What every rank needs to know (sent to the spawned processes)."""

    root: str
    rows: int  # global rows of each sharded matrix (a multiple of TILES)
    cols: int
    replicated_rows: int  # rows of the small replicated matrix
    repeat: int

    @property
    def sharded_bytes(self) -> int:
        return TENSORS * self.rows * self.cols * 4

    @property
    def replicated_bytes(self) -> int:
        return (self.replicated_rows + TENSORS) * self.cols * 4 + 8


def layout(total: int, repeat: int, root: Path) -> Config:
    """About ``total`` bytes of sharded float32 matrices (and a small replicated part)."""
    per_tensor = max(total // TENSORS, TILES * 4)
    cols = 1024 if per_tensor >= 8 * MiB else 64
    rows = max(TILES, per_tensor // (4 * cols) // TILES * TILES)
    return Config(str(root), rows, cols, replicated_rows=max(1, min(256, rows // 64)), repeat=repeat)


# ------------------------------------------------------------------- in every rank


def make_state(torch: Any, config: Config, rank: int, world: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """This rank's blocks of the sharded matrices (rows ``rank * rows/world`` on) and the
    replicated part, the same whatever the world size: each row tile has its own seed."""
    rows = config.rows // world
    tile = config.rows // TILES
    blocks = {}
    for t in range(TENSORS):
        local = torch.empty(rows, config.cols, dtype=torch.float32)
        for j in range(rank * rows // tile, (rank + 1) * rows // tile):
            generator = torch.Generator().manual_seed(1 + t * 64 + j)
            start = j * tile - rank * rows
            torch.rand(tile, config.cols, generator=generator, out=local[start : start + tile])
        blocks[f"layer{t}.weight"] = local
    generator = torch.Generator().manual_seed(12345)
    replicated: dict[str, Any] = {f"layer{t}.norm": torch.rand(config.cols, generator=generator)
                                  for t in range(TENSORS)}
    replicated["embedding"] = torch.rand(config.replicated_rows, config.cols, generator=generator)
    replicated["step"] = torch.tensor(1234, dtype=torch.int64)
    return blocks, replicated


class Ranks:
    """The collective helpers of one rank: barriers and the slowest rank's time."""

    def __init__(self, torch: Any, dist: Any, rank: int, world: int) -> None:
        self.torch, self.dist, self.rank, self.world = torch, dist, rank, world

    def barrier(self) -> None:
        self.dist.barrier()

    def slowest(self, seconds: float) -> float:
        value = self.torch.tensor([seconds], dtype=self.torch.float64)
        self.dist.all_reduce(value, op=self.dist.ReduceOp.MAX)
        return float(value.item())

    def sample(self, case: Case) -> float:
        """One collective timing: ``before`` (untimed), an ``os.sync()`` so that no earlier
        write is still draining, a barrier, ``run`` on every rank (timed, the garbage
        collector paused), then ``after`` (untimed). The slowest rank's time."""
        given = case.before() if case.before is not None else None
        if self.rank == 0:
            os.sync()
        self.barrier()
        gc.disable()
        try:
            start = time.perf_counter()
            output = case.run(given)
            elapsed = time.perf_counter() - start
        finally:
            gc.enable()
        elapsed = self.slowest(elapsed)
        if case.after is not None:
            case.after(output)
        self.barrier()
        return elapsed

    def compare(self, cases: Mapping[str, Case], repeat: int) -> dict[str, list[float]]:
        """One untimed round (the steady state: buffers allocated and touched, code paths
        warm), then every case ``repeat`` times, interleaved round by round as
        :func:`bench.compare` does (each round starts one case later); every rank runs the
        same order."""
        names = list(cases)
        for name in names:
            self.sample(cases[name])
        samples: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(repeat):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(self.sample(cases[name]))
        return samples


def _check(torch: Any, what: str, expected: Mapping[str, Any], got: Mapping[str, Any]) -> None:
    for key, tensor in expected.items():
        if not torch.equal(tensor, got[key]):
            raise AssertionError(f"{what}: {key} differs from what was saved")


class World:
    """One rank of a world: its process groups, its state (as Shard and as DTensor leaves),
    and the sections it times."""

    def __init__(self, rank: int, world: int, config: Config, launched: float) -> None:
        import torch
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.device_mesh import init_device_mesh

        from safepoint.integrations.torch_distributed import TorchGroup

        self.torch, self.dist, self.dcp = torch, dist, dcp
        self.rank, self.world, self.config, self.launched = rank, world, config, launched
        self.root = Path(config.root)
        self.phases: list[tuple[str, float]] = []
        self.ranks = Ranks(torch, dist, rank, world)
        self.mesh = init_device_mesh("cpu", (world,))
        self.group = TorchGroup()  # safepoint's own gloo group over the same ranks
        self.async_pg = dist.new_group(backend="gloo")  # DCP's background collectives: their own
        self.phase("start-up (spawn, imports, process groups)")
        self.global_shape = (config.rows, config.cols)
        self.offsets = (rank * (config.rows // world), 0)
        self.blocks, self.replicated = make_state(torch, config, rank, world)
        self.sp_state, self.dcp_state = self.ours(self.blocks), self.theirs(self.blocks)
        self.counter = itertools.count()
        self.phase("the state")

    def phase(self, name: str) -> None:
        """The end of a phase, in wall-clock seconds since the launch."""
        self.phases.append((name, time.time() - self.launched))

    def ours(self, blocks: Mapping[str, Any]) -> dict[str, Any]:
        from safepoint import Shard

        return {**{k: Shard(v, self.offsets, self.global_shape) for k, v in blocks.items()},
                **self.replicated}

    def theirs(self, blocks: Mapping[str, Any]) -> dict[str, Any]:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor import Shard as Sharded

        return {**{k: DTensor.from_local(v, self.mesh, [Sharded(0)], run_check=False,
                                         shape=self.torch.Size(self.global_shape),
                                         stride=(self.config.cols, 1))
                   for k, v in blocks.items()}, **self.replicated}

    def fresh(self, stem: str) -> Callable[[], Path]:
        return lambda: self.root / f"{stem}-{self.world}-{next(self.counter)}"

    def writer(self, path: Path) -> Any:
        return self.dcp.FileSystemWriter(path, sync_files=True)  # DCP's default, said explicitly

    def rank0_removes(self, path: Path) -> None:
        self.ranks.barrier()  # every rank is done with the files
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)

    def saves(self) -> dict[str, list[float]]:
        """1. A sharded durable save."""
        from safepoint import Checkpointer

        sp = Checkpointer("save", location=self.root / f"sp-{self.world}", group=self.group)
        sp.save(0, {"warm-up": 1})  # the first save takes the name's lease: not timed
        steps = itertools.count(1)
        self.dcp.save({"warm-up": self.torch.zeros(4)},
                      storage_writer=self.writer(self.root / f"dcp-warm-up-{self.world}"))

        def sp_save(_: Any) -> int:
            step = next(steps)
            sp.save(step, self.sp_state)
            return step

        def sp_drop(step: int) -> None:
            if self.rank == 0:  # the coordinator holds the name's lease
                sp.delete(step)

        def dcp_save(path: Path) -> Path:
            self.dcp.save(self.dcp_state, storage_writer=self.writer(path))
            return path

        try:
            return self.ranks.compare({
                SP_SAVE: Case(sp_save, after=sp_drop),
                DCP_SAVE: Case(dcp_save, self.fresh("dcp-save"), self.rank0_removes),
            }, self.config.repeat)
        finally:
            sp.close()
            self.phase("saves")

    def async_saves(self) -> dict[str, list[float]]:
        """3. The caller's blocking time of an asynchronous save, in the steady state."""
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        from safepoint import Checkpointer

        sp = Checkpointer("async", location=self.root / f"sp-{self.world}", group=self.group, keep=1)
        steps = itertools.count()
        # DCP's staging copies kept across calls (its default stager makes new ones each call;
        # FileSystemWriter(cache_staged_state_dict=True) pins memory: it needs an accelerator)
        stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                              use_async_staging=False, use_non_blocking_copy=False))

        def dcp_async(path: Path) -> tuple[Any, Path]:
            return self.dcp.async_save(self.dcp_state, checkpoint_id=path,
                                       process_group=self.async_pg), path

        def dcp_async_cached(path: Path) -> tuple[Any, Path]:
            return self.dcp.async_save(self.dcp_state, checkpoint_id=path,
                                       process_group=self.async_pg, async_stager=stager), path

        def dcp_finish(output: tuple[Any, Path]) -> None:
            future, path = output
            future.result()
            self.rank0_removes(path)

        cases = {
            SP_ASYNC: Case(lambda _: sp.save(next(steps), self.sp_state, blocking=False),
                           after=lambda pending: pending.wait()),
            DCP_ASYNC: Case(dcp_async, self.fresh("dcp-async"), dcp_finish),
            DCP_ASYNC_CACHED: Case(dcp_async_cached, self.fresh("dcp-cached"), dcp_finish),
        }
        try:
            return self.ranks.compare(cases, self.config.repeat)
        finally:
            sp.close()
            stager.close()
            self.phase("async saves")

    def write_to_reshard(self) -> None:
        """The checkpoints the smaller world reshards (untimed)."""
        from safepoint import Checkpointer

        with Checkpointer("reshard", location=self.root / "sp-reshard", group=self.group) as ckpt:
            ckpt.save(0, self.sp_state)
        self.dcp.save(self.dcp_state, storage_writer=self.writer(self.root / "dcp-reshard"))
        self.phase("checkpoints to reshard")

    def restores(self) -> tuple[dict[str, list[float]], dict[str, int]]:
        """2. A resharded restore of the larger world's checkpoints, in place: the timings,
        and how many results of each method were checked bit-exact against this rank's
        blocks (all of them)."""
        from safepoint import Checkpointer

        torch = self.torch
        buffers = {k: torch.empty_like(v) for k, v in self.blocks.items()}
        copies = {k: torch.zeros_like(v) for k, v in self.replicated.items()}
        sp = Checkpointer("reshard", location=self.root / "sp-reshard", group=self.group)
        sp_into = {**self.ours(buffers), **copies}
        checked: dict[str, int] = {}

        def blank() -> None:
            for tensor in [*buffers.values(), *copies.values()]:
                tensor.fill_(-1)  # the restore must really fill them

        def sp_restore(_: Any) -> dict[str, Any]:
            restored = sp.restore(into=sp_into)
            return {k: restored.state[k] for k in self.replicated}

        def dtensors() -> dict[str, Any]:
            blank()
            return {**self.theirs(buffers), **copies}

        def sp_restore_dtensors(into: dict[str, Any]) -> dict[str, Any]:
            restored = sp.restore(into=into)
            return {k: restored.state[k] for k in self.replicated}

        def dcp_load(into: dict[str, Any]) -> dict[str, Any]:
            self.dcp.load(into, storage_reader=self.dcp.FileSystemReader(self.root / "dcp-reshard"))
            return {k: into[k] for k in self.replicated}

        def check(name: str) -> Callable[[dict[str, Any]], None]:
            def after(got: dict[str, Any]) -> None:
                _check(torch, name, self.blocks, buffers)  # every call, untimed: bit for bit
                _check(torch, name, self.replicated, got)
                checked[name] = checked.get(name, 0) + 1
            return after

        try:
            return self.ranks.compare({
                SP_RESTORE: Case(sp_restore, blank, check(SP_RESTORE)),
                DCP_LOAD: Case(dcp_load, dtensors, check(DCP_LOAD)),
                SP_RESTORE_DTENSOR: Case(sp_restore_dtensors, dtensors, check(SP_RESTORE_DTENSOR)),
            }, self.config.repeat), checked
        finally:
            sp.close()
            self.phase("restores")


def rank_main(rank: int, world: int, fields: dict[str, Any], launched: float) -> None:
    """The body of one spawned rank: set up the process group, run the sections of this
    world, and (rank 0) write the timings to ``results-<world>.json``, with the wall-clock
    seconds since ``launched`` (``time.time()`` in the runner) at the end of each phase."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import torch
    import torch.distributed as dist

    config = Config(**fields)
    torch.set_num_threads(1)  # 2 to 4 ranks on a 2-core machine: no oversubscription
    dist.init_process_group("gloo", init_method=f"file://{Path(config.root) / f'pg-{world}'}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        here = World(rank, world, config, launched)
        results: dict[str, Any] = {SAVE: here.saves()}
        results[ASYNC] = here.async_saves()
        gc.collect()  # the asynchronous saves' buffers go
        if world == max(WORLDS):
            here.write_to_reshard()
        else:
            results[RESTORE], results["checked"] = here.restores()
        results["phases"] = here.phases
        if rank == 0:
            (here.root / f"results-{world}.json").write_text(json.dumps(results))
        here.ranks.barrier()
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------- in the runner


def run_world(config: Config, world: int) -> dict[str, Any]:
    """Spawn ``world`` ranks; their timings (rank 0's file)."""
    import torch.multiprocessing as mp

    launched = time.time()
    mp.start_processes(rank_main, args=(world, asdict(config), launched), nprocs=world, join=True,
                       start_method="spawn")
    results = json.loads((Path(config.root) / f"results-{world}.json").read_text())
    results["phases"].append(["end", time.time() - launched])
    return results


def run(report: Report, quick: bool) -> None:
    torch = optional("torch")
    if torch is None:
        raise Skip("torch is not installed (pip install torch==2.13.0)")
    dist = optional("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_gloo_available():
        raise Skip("torch.distributed with the gloo backend is not available in this torch build")
    for needed in ("torch.distributed.checkpoint", "torch.distributed.tensor",
                   "torch.distributed.device_mesh"):
        if optional(needed) is None:
            raise Skip(f"{needed} is not available (the DCP peer needs torch ≥ 2.4)")
    total = report.size(full=GiB, quick=4 * MiB)
    with report.scratch("distributed") as root:
        config = layout(total, report.pick(full=5, quick=1), root)
        results = {world: run_world(config, world) for world in WORLDS}
    sections(report, config, results)


def _describe(config: Config) -> str:
    return (f"{format_bytes(config.sharded_bytes)} in {TENSORS} float32 matrices of "
            f"{config.rows:,} × {config.cols:,}, row-sharded across the ranks, plus "
            f"{format_bytes(config.replicated_bytes)} replicated (each method saves it once)")


def where_the_time_went(world: int, phases: list[list[Any]]) -> str:
    """``phases``: (name, seconds since the launch at its end), in order."""
    parts, before = [], 0.0
    for name, at in phases:
        if name != "end":
            parts.append(f"{name} {at - before:.0f} s")
        before = at
    return f"The {world}-rank world took {before:.0f} s: " + ", ".join(parts) + "."


def sections(report: Report, config: Config, results: dict[int, dict[str, Any]]) -> None:
    nbytes = config.sharded_bytes + config.replicated_bytes
    rounds = (f"median of {config.repeat} interleaved round{'s' if config.repeat > 1 else ''}, "
              "after an untimed one")
    for world in sorted(results):
        section = report.section(
            f"Distributed: sharded durable save, {world} ranks", reference=DCP_SAVE, nbytes=nbytes,
            description=f"{_describe(config)}; gloo, one CPU process per rank (torch threads: 1); "
                        f"every method fsyncs; {rounds}; each time lasts until the slowest rank "
                        "returns.")
        add(section, results[world][SAVE], {
            SP_SAVE: "Shard leaves, Checkpointer(group=TorchGroup())",
            DCP_SAVE: "DTensor leaves, FileSystemWriter(sync_files=True)"})
        section.note("safepoint fsyncs its data files, their folders and the manifest it commits; "
                     "DCP fsyncs each rank's file and .metadata (not the folder after renaming "
                     ".metadata into place), on one writer thread per rank (thread_count=1, its "
                     "default; safepoint writes on up to 4).")
        section.note(where_the_time_went(world, results[world]["phases"]))
        verdict(report, f"distributed save, {world} ranks: faster than dcp.save", section, SP_SAVE)
    restore = report.section(
        "Distributed: resharded restore, 4 → 2 ranks (warm page cache)", reference=DCP_LOAD,
        nbytes=nbytes,
        description=f"{_describe(config)}, saved by 4 ranks, loaded in place by 2 ranks into their "
                    f"own blocks; every result checked bit-exact, outside the timing; {rounds}. Warm: "
                    "the checkpoints were just written (dropping the page cache needs root).")
    add(restore, results[min(WORLDS)][RESTORE], {
        SP_RESTORE: "reads only the byte ranges of its blocks",
        DCP_LOAD: "DTensor(Shard(0)) on a 2-rank CPU mesh; DCP reshards",
        SP_RESTORE_DTENSOR: "into the same DTensors as dcp.load (their local tensors)"})
    expected = {m: config.repeat + 1 for m in (SP_RESTORE, DCP_LOAD, SP_RESTORE_DTENSOR)}  # + 1 untimed
    if results[min(WORLDS)].get("checked") != expected:
        raise AssertionError(f"the resharded restores were not all checked: "
                             f"{results[min(WORLDS)].get('checked')} != {expected}")
    verdict(report, "distributed restore 4 → 2 ranks: faster than dcp.load", restore, SP_RESTORE)
    verdict(report, "distributed restore 4 → 2 ranks into the same DTensors: faster than dcp.load",
            restore, SP_RESTORE_DTENSOR)
    for world in sorted(results):
        section = report.section(
            f"Distributed: asynchronous save, caller blocking time, {world} ranks",
            reference=DCP_ASYNC, nbytes=nbytes,
            description=f"{_describe(config)}; until the call returns (the slowest rank); the "
                        f"background write is awaited outside the timing; {rounds}.")
        add(section, results[world][ASYNC], {
            SP_ASYNC: "copies into buffers reused across saves",
            DCP_ASYNC: "default stager: a fresh CPU copy each call",
            DCP_ASYNC_CACHED: "one DefaultStager reused: its copies are cached"})
        to_cached = section.ratio(SP_ASYNC, DCP_ASYNC_CACHED)
        spread = section.spread(SP_ASYNC, to=DCP_ASYNC_CACHED)
        section.row(SP_ASYNC).note += f"; {to_cached:.2f}× {DCP_ASYNC_CACHED}" + (
            f" ({spread.text()})" if spread else "")
        verdict(report, f"distributed async save, {world} ranks: blocks shorter than dcp.async_save",
                section, SP_ASYNC)
        report.target(f"distributed async save, {world} ranks: blocking ÷ dcp.async_save with cached "
                      "staging (no target: both are one copy into reused buffers)",
                      to_cached, spread=spread)


def add(section: Section, samples: Mapping[str, list[float]], notes: Mapping[str, str]) -> None:
    for method, values in samples.items():
        section.add(method, values, note=notes.get(method, ""))


def verdict(report: Report, name: str, section: Section, method: str, to: str | None = None) -> None:
    ratio = section.ratio(method, to)
    report.verdict(f"{name} (ratio < 1)", f"{ratio:.2f}× {to or section.reference}", ratio < 1,
                   spread=section.spread(method, to=to))
