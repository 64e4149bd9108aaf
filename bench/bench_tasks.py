"""Task benchmarks: what a resume saves after a kill, and how fast Dask hands a task over.

1. A 30-step job killed (SIGKILL) at 80%, then run again: total wall time from the first
   start to the result, with safepoint (the rerun skips the 24 recorded steps) against the
   same job without checkpoints (the rerun starts from scratch), and an uninterrupted run.
   Every run is a fresh ``python`` process, so interpreter start-up counts in all rows.
2. Dask: a task checkpointing every item on a 2-worker ``LocalCluster``; the worker running it
   is SIGKILLed. Measured from the kill to the new attempt's marker (the scheduler has
   rescheduled it and it has started) and to the new attempt's first checkpoint.

    python -m bench --only tasks
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import Report, Skip, Spread
from safepoint.errors import CorruptCheckpoint
from safepoint.lease import holder
from safepoint.policy import every
from safepoint.run import RunInfo, describe_run
from safepoint.store import LocalStore
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
    bench_kill_at_80(report)
    bench_dask_handover(report)


if __name__ == "__main__":
    from bench.__main__ import main

    sys.exit(main(["--only", "tasks", *sys.argv[1:]]))
