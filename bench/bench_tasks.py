"""Task benchmarks: what a durable sub-step costs, what a resume saves after a kill, and how
fast Dask hands a task over.

1. Durable sub-steps: tasks of 100, 1,000 and 10,000 trivial ``ctx.step`` calls (the
   default task policy: the state commits after every sub-step, one ``fdatasync`` each), per
   sub-step, measured inside each task from the end of its first sub-step (which creates the
   job's journal) to the end of its last. Every sample runs 10,000 sub-steps (100 tasks of
   100, 10 of 1,000, one of 10,000), so that every size is measured over as long a stretch
   of a shared disk's noise. Also the last 100 sub-steps of the largest task alone (the
   marginal cost after all the others; a short stretch). Side by side, in the same rounds:
   the floor, appending a record of the bytes one sub-step adds to the journal to a file and
   calling ``fdatasync`` (2,000 times); the same over zeros written in advance (what the
   journal does: ``fdatasync`` then flushes data, not the file's size); and DBOS Transact's
   durable steps (``@DBOS.step`` in a ``@DBOS.workflow``, launched in this process on a
   SQLite system database in the scratch folder, DBOS's defaults otherwise), timed the same
   way, 1,000 steps a sample (DBOS stays launched through all the rounds, so its background
   threads run beside every row). The DBOS rows are left out when ``dbos`` is not installed.
2. A 30-step job killed (SIGKILL) at 80%, then run again: total wall time from the first
   start to the result, with safepoint (the rerun skips the 24 recorded steps) against the
   same job without checkpoints (the rerun starts from scratch), and an uninterrupted run.
   Every run is a fresh ``python`` process, so interpreter start-up counts in all rows.
3. Dask: a task checkpointing every item on a 2-worker ``LocalCluster``; the worker running it
   is SIGKILLed. Measured from the kill to the new attempt's marker (the scheduler has
   rescheduled it and it has started) and to the new attempt's first checkpoint.

    python -m bench --only tasks
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import Case, Report, Skip, Spread, compare
from safepoint.errors import CorruptCheckpoint
from safepoint.lease import holder
from safepoint.policy import every
from safepoint.run import RunInfo, describe_run
from safepoint.store import LocalStore
from safepoint.store.journal import scan
from safepoint.tasks import TaskContext, run_task, task

ROOT = str(Path(__file__).resolve().parents[1])
"""The repository root: job processes and Dask workers import ``bench.bench_tasks`` from it."""
STEPS = 30
KILL_AFTER = 24  # 80%


def busy(seconds: float) -> float:
    """Burn CPU for ``seconds`` (a step's work) and return something computed."""
    end, x = time.perf_counter() + seconds, 0.0
    while time.perf_counter() < end:
        x = (x * 1.000001 + 1.0) % 1e6
    return x


def work(i: int, seconds: float, progress: str) -> int:
    busy(seconds)
    with open(progress, "a") as f:
        f.write(f"{i}\n")
    return i * i


@task
def stepwise(ctx: TaskContext, seconds: float, progress: str) -> int:
    return sum(ctx.step(f"step{i}", work, i, seconds, progress) for i in range(STEPS))


def plain(seconds: float, progress: str) -> int:
    return sum(work(i, seconds, progress) for i in range(STEPS))


def child(kind: str, store: str, seconds: str, progress: str) -> None:
    """Entry point of the job processes."""
    if kind == "safepoint":
        run_task(stepwise, float(seconds), progress, job_id="stepwise", location=store)
    else:
        plain(float(seconds), progress)


def _start(kind: str, store: Path, seconds: float, progress: Path) -> subprocess.Popen[bytes]:
    code = "import sys, bench.bench_tasks as b; b.child(*sys.argv[1:])"
    return subprocess.Popen([sys.executable, "-c", code, kind, str(store), str(seconds), str(progress)],
                            cwd=ROOT)


def _steps_done(progress: Path) -> int:
    return len(progress.read_text().splitlines()) if progress.exists() else 0


def _info(store: LocalStore, job: str) -> RunInfo | None:
    """The job's newest record (None before its first, or while a commit is half-written)."""
    try:
        return describe_run(store, job)
    except (CorruptCheckpoint, OSError):
        return None


def _committed_steps(store: LocalStore, job: str) -> int:
    info = _info(store, job)
    return 0 if info is None else sum(r["status"] == "done" for r in info.steps)


def killed_and_rerun(kind: str, workdir: Path, seconds: float, *, kill: bool) -> float:
    """Wall time of: start, SIGKILL once step ``KILL_AFTER`` is done (and, with safepoint,
    committed), then a rerun to completion."""
    store, progress = workdir / "store", workdir / "progress"
    progress.unlink(missing_ok=True)
    started = time.perf_counter()
    first = _start(kind, store, seconds, progress)
    if kill:
        while _steps_done(progress) < KILL_AFTER:
            time.sleep(0.002)
        if kind == "safepoint":  # wait for the commit that records step KILL_AFTER
            while _committed_steps(LocalStore(store), "stepwise") < KILL_AFTER:
                time.sleep(0.002)
        first.send_signal(signal.SIGKILL)
        first.wait()
        first = _start(kind, store, seconds, progress)
    if first.wait() != 0:
        raise RuntimeError(f"the {kind} job failed with status {first.returncode}")
    return time.perf_counter() - started


def bench_kill_at_80(report: Report) -> None:
    seconds = report.pick(full=0.1, quick=0.02)
    repeat = report.pick(full=3, quick=1)
    section = report.section(
        f"{STEPS}-step job killed at 80%, then rerun", reference="restart from scratch",
        description=f"{seconds * 1e3:.0f} ms of CPU per step; wall time from the first start "
                    "to the result, two process starts per killed run")
    cases = {"restart from scratch": ("plain", True), "safepoint task": ("safepoint", True),
             "uninterrupted (no kill)": ("plain", False)}
    samples: dict[str, list[float]] = {name: [] for name in cases}
    with report.scratch("tasks") as workdir:
        for round_ in range(repeat):
            for name, (kind, kill) in cases.items():
                folder = workdir / f"{kind}-{round_}-{kill}"
                folder.mkdir()
                samples[name].append(killed_and_rerun(kind, folder, seconds, kill=kill))
    for name, values in samples.items():
        section.add(name, values)
    report.target("killed at 80%: safepoint total ≤ 0.75× a restart from scratch",
                  section.ratio("safepoint task"), at_most=0.75, spread=section.spread("safepoint task"))


# ------------------------------------------------------------------ durable sub-steps

SUBSTEP_GROWTH = 1.2  # per sub-step at the most sub-steps ÷ at the fewest
SUBSTEP_FLOOR = 2.0  # a durable sub-step ÷ one append + fdatasync
_sync = getattr(os, "fdatasync", os.fsync)


def trivial(i: int) -> int:
    return i


def timed_steps(step: Callable[[int], Any], n: int, tail: int) -> list[float]:
    """Call ``step(0)`` … ``step(n - 1)``; return [seconds per call after the first, seconds
    per call of the last ``tail`` calls]. The first call is left out of both: it is where a
    job (or a file) is created."""
    if n < 2:
        raise ValueError("timed_steps needs at least 2 calls")
    split = max(1, n - tail)
    step(0)
    start = time.perf_counter()
    for i in range(1, split):
        step(i)
    tail_start = time.perf_counter()
    for i in range(split, n):
        step(i)
    end = time.perf_counter()
    return [(end - start) / (n - 1), (end - tail_start) / (n - split)]


@task
def substeps(ctx: TaskContext, n: int, tail: int) -> list[float]:
    """``n`` trivial durable sub-steps, timed by :func:`timed_steps`."""
    return timed_steps(lambda i: ctx.step(f"s{i}", trivial, i), n, tail)


@task
def substep_bytes(ctx: TaskContext, folder: str, n: int) -> float:
    """Bytes one sub-step adds to the job's journal: steps ``n // 2`` to ``n`` (records of
    the step and of the state committed after it, framing included)."""
    journal = Path(folder)
    ends = []
    for i in range(n):
        ctx.step(f"s{i}", trivial, i)
        if i >= n // 2:
            (path,) = journal.glob("*.journal")
            ends.append(scan(path.read_bytes()).end)
    grown = [b - a for a, b in itertools.pairwise(ends)]
    if not grown or min(grown) <= 0:  # a compaction in between: the probe is too long
        raise RuntimeError(f"the journal did not grow steadily: {grown}")
    return sum(grown) / len(grown)


def bytes_per_substep(folder: Path) -> int:
    value = run_task(substep_bytes, str(folder / "probe"), 100, job_id="probe", location=folder)
    shutil.rmtree(folder)
    return round(value)


def append_floor(path: Path, size: int, n: int, tail: int, *, preallocated: bool) -> list[float]:
    """``n`` writes of a ``size``-byte record, each followed by ``fdatasync``: appended to a
    growing file, or written over zeros written (and synced) in advance."""
    record = b"x" * size
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if preallocated else os.O_APPEND)
    fd = os.open(path, flags, 0o644)
    try:
        if preallocated:
            os.write(fd, bytes(size * n))
            os.fsync(fd)

            def write(i: int) -> None:
                os.pwrite(fd, record, i * size)
                _sync(fd)
        else:
            def write(i: int) -> None:
                os.write(fd, record)
                _sync(fd)
        return timed_steps(write, n, tail)
    finally:
        os.close(fd)
        path.unlink()


@contextmanager
def dbos_steps(database: Path) -> Iterator[Callable[[int, int], list[float]] | None]:
    """DBOS Transact launched in this process on a SQLite system database at ``database``:
    yields a function running a workflow of ``n`` trivial steps (timed by
    :func:`timed_steps`), or None when ``dbos`` is not installed."""
    try:
        from dbos import DBOS
    except ImportError:
        yield None
        return
    DBOS(config={"name": "safepoint-bench", "system_database_url": f"sqlite:///{database}",
                 "log_level": "WARNING"})

    @DBOS.step()
    def dbos_trivial(i: int) -> int:
        return i

    @DBOS.workflow()
    def dbos_substeps(n: int, tail: int) -> list[float]:
        return timed_steps(dbos_trivial, n, tail)

    try:
        DBOS.launch()
        yield dbos_substeps
    finally:
        DBOS.destroy(destroy_registry=True)


def batched(run: Callable[[int], list[float]], times: int) -> list[float]:
    """``run(k)`` for k < ``times`` (each returning [per call, per call of its tail]): the
    means of both."""
    outcomes = [run(k) for k in range(times)]
    return [sum(o[0] for o in outcomes) / times, sum(o[1] for o in outcomes) / times]


def bench_substeps(report: Report) -> None:
    sizes = report.pick(full=(100, 1000, 10_000), quick=(10, 100))
    at = report.pick(full=1000, quick=100)  # where a sub-step is compared with the floor and DBOS
    dbos_sizes = report.pick(full=(100, 1000), quick=(100,))
    floor_writes = report.pick(full=2000, quick=100)
    tail = report.pick(full=100, quick=10)
    repeat = report.pick(full=5, quick=2)
    smallest, largest = sizes[0], sizes[-1]
    floor, prealloc = "append + fdatasync", "write over preallocated zeros + fdatasync"

    def ours(n: int) -> str:
        return f"safepoint ctx.step, {n:,} sub-steps"

    def theirs(n: int) -> str:
        return f"DBOS step, {n:,} steps"

    last = f"safepoint ctx.step, last {tail} of {largest:,}"
    with report.scratch("tasks-substeps") as workdir:
        size = bytes_per_substep(workdir / "probe")
        counter = itertools.count()
        outcomes: dict[str, list[list[float]]] = {}

        def case(label: str, run: Callable[[Path], list[float]]) -> Case:
            outcomes[label] = []

            def before() -> Path:
                folder = workdir / f"case{next(counter)}"
                folder.mkdir()
                return folder

            def after(result: tuple[Path, list[float]]) -> None:
                folder, timed = result
                outcomes[label].append(timed)
                shutil.rmtree(folder)

            return Case(lambda folder: (folder, run(folder)), before=before, after=after)

        cases = {
            floor: case(floor, lambda d: append_floor(d / "floor.log", size, floor_writes, tail,
                                                      preallocated=False)),
            prealloc: case(prealloc, lambda d: append_floor(d / "floor.log", size, floor_writes, tail,
                                                            preallocated=True)),
        }
        # Every sample of every size runs the same number of sub-steps (tasks of n sub-steps,
        # largest // n of them): a sample of a few short tasks would see a quieter stretch of
        # a shared disk than one long task does, and compare medians of unlike windows.
        for n in sizes:
            cases[ours(n)] = case(ours(n), lambda d, n=n: batched(
                lambda k: run_task(substeps, n, tail, job_id=f"substeps{k}", location=d), largest // n))
        with dbos_steps(workdir / "dbos.sqlite") as workflow:
            if workflow is not None:
                for n in dbos_sizes:
                    cases[theirs(n)] = case(theirs(n), lambda d, n=n: batched(
                        lambda k: workflow(n, tail), dbos_sizes[-1] // n))
            compare(cases, repeat=repeat)

    section = report.section(
        "Durable sub-steps: per sub-step", reference=floor,
        description=f"a task's trivial ctx.step (default task policy: the state commits after every "
                    f"sub-step), per sub-step after each task's first; every sample runs {largest:,} "
                    f"sub-steps (tasks of n); the floor writes {size} B (what one sub-step adds to the "
                    f"journal) {floor_writes:,} times; DBOS: @DBOS.step in a workflow, SQLite system "
                    f"database, DBOS's defaults, {dbos_sizes[-1]:,} steps a sample; median of {repeat} rounds")
    section.add(floor, [o[0] for o in outcomes[floor]],
                note=f"{size} B to a growing file, {floor_writes:,} times")
    section.add(prealloc, [o[0] for o in outcomes[prealloc]],
                note="what the journal does: fdatasync flushes data only")
    for n in sizes:
        section.add(ours(n), [o[0] for o in outcomes[ours(n)]])
    section.add(last, [o[1] for o in outcomes[ours(largest)]], reference=ours(smallest),
                note=f"the marginal cost after {largest - tail:,} sub-steps; × ref: against {ours(smallest)}")
    if theirs(at) in outcomes:
        for n in dbos_sizes:
            section.add(theirs(n), [o[0] for o in outcomes[theirs(n)]])
        for n in sizes:
            if theirs(n) in outcomes:
                spread = section.spread(ours(n), to=theirs(n))
                section.row(ours(n)).note = (f"{section.ratio(ours(n), to=theirs(n)):.2f}× DBOS"
                                             + (f" ({spread.text()})" if spread else ""))
    else:
        section.note("DBOS rows left out: dbos is not installed (pip install -r bench/requirements.txt).")

    report.target(f"sub-steps: per sub-step at {largest:,} ÷ at {smallest:,} ≤ {SUBSTEP_GROWTH}×",
                  section.ratio(ours(largest), to=ours(smallest)), at_most=SUBSTEP_GROWTH,
                  spread=section.spread(ours(largest), to=ours(smallest)))
    report.target(f"sub-steps: the last {tail} of {largest:,} ÷ per sub-step at {smallest:,} "
                  "(marginal; no target)", section.ratio(last), spread=section.spread(last))
    report.target(f"durable sub-step ({at:,} sub-steps) ≤ {SUBSTEP_FLOOR}× {floor}",
                  section.ratio(ours(at)), at_most=SUBSTEP_FLOOR, spread=section.spread(ours(at)))
    if section.has(theirs(at)):
        report.target(f"durable sub-step ÷ DBOS step on SQLite, {at:,} steps (no target)",
                      section.ratio(ours(at), to=theirs(at)), spread=section.spread(ours(at), to=theirs(at)))


# ------------------------------------------------------------------------ Dask


@task(policy=every(items=1))
def ticking(ctx: TaskContext, n: int, seconds: float) -> int:
    ctx.state.setdefault("total", 0)
    for i in ctx.range(n):
        busy(seconds)
        ctx.state["total"] += i
    return ctx.state["total"]


def _attempt(store: LocalStore, job: str, attempt: int) -> RunInfo | None:
    """The job's newest record once attempt ``attempt`` (or a later one) has committed."""
    info = _info(store, job)
    return info if info is not None and info.attempt >= attempt and info.position >= 1 else None


def dask_handover(client: Any, workdir: Path, job: str) -> tuple[float, float]:
    """Seconds from SIGKILL to the new attempt's lease (the scheduler has rescheduled it and
    it has started), and to its first checkpoint."""
    from safepoint.integrations.dask import submit

    store = LocalStore(workdir / "store")
    future = submit(client, ticking, 400, 0.01, job_id=job, location=store.root)
    deadline = time.monotonic() + 60
    while _attempt(store, job, 1) is None or _attempt(store, job, 1).position < 5:  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            raise RuntimeError("the Dask task made no checkpoints within 60 s")
        time.sleep(0.005)
    first = holder(store, job)
    assert first is not None
    killed_at = time.time()
    os.kill(first.info["holder"]["pid"], signal.SIGKILL)
    rescheduled = None
    while True:
        if time.monotonic() > deadline:
            raise RuntimeError("the new attempt made no checkpoint within 60 s")
        current = holder(store, job)
        if rescheduled is None and current is not None and current.generation > first.generation:
            rescheduled = float(current.info["holder"]["started"])
        info = _attempt(store, job, first.generation + 1)
        if info is not None and info.updated > killed_at:
            committed = info.updated
            break
        time.sleep(0.001)
    future.result(timeout=60)
    return (rescheduled or committed) - killed_at, committed - killed_at


def bench_dask_handover(report: Report) -> None:
    try:
        import distributed
    except ImportError as exc:
        raise Skip("dask[distributed] is not installed") from exc
    repeat = report.pick(full=3, quick=1)
    section = report.section(
        "Dask: a killed worker's task resumes elsewhere", description=(
            "2-worker LocalCluster (nannies), task checkpointing every 10 ms item; "
            "seconds from the SIGKILL"))
    handed, resumed = [], []
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, previous]))
    try:
        with report.scratch("tasks-dask") as workdir, distributed.LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=None, silence_logs=logging.CRITICAL) as cluster, \
                distributed.Client(cluster) as client:
            for round_ in range(repeat):
                client.wait_for_workers(2, timeout=60)
                folder = workdir / f"round{round_}"
                folder.mkdir()
                to_marker, to_checkpoint = dask_handover(client, folder, f"ticking{round_}")
                handed.append(to_marker)
                resumed.append(to_checkpoint)
    finally:
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous
    section.add("kill → new attempt holds the lease", handed)
    section.add("kill → its first checkpoint", resumed)
    median = sorted(resumed)[len(resumed) // 2]
    report.target("Dask kill-to-resume (first checkpoint of the new attempt) ≤ 1 s", median,
                  at_most=1.0, unit=" s", spread=Spread.of(resumed))


def run(report: Report, quick: bool) -> None:
    bench_substeps(report)
    bench_kill_at_80(report)
    bench_dask_handover(report)


if __name__ == "__main__":
    from bench.__main__ import main

    sys.exit(main(["--only", "tasks", *sys.argv[1:]]))
