"""Tasks that the crash and Dask tests run in other processes (imported there by name).

Every function here appends a line to a log file in ``logdir`` each time its code runs, so
that a test can count executions across processes and attempts.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from safepoint.errors import StaleAttempt
from safepoint.policy import every
from safepoint.tasks import TaskContext, run_task, task

HERE = str(Path(__file__).resolve().parent)
TRANSFORM_SECONDS = "TASK_SUPPORT_TRANSFORM_SECONDS"
"""Environment variable: how long ``transform`` sleeps (set by the crash test's first run)."""


def log(logdir: str, name: str, line: str) -> None:
    with open(os.path.join(logdir, name), "a") as f:
        f.write(line + "\n")


def read_log(logdir: str, name: str) -> list[str]:
    path = os.path.join(logdir, name)
    return Path(path).read_text().splitlines() if os.path.exists(path) else []


# --------------------------------------------------------------- three sub-steps


def load(logdir: str, n: int) -> np.ndarray:
    log(logdir, "calls", "load")
    return np.arange(n, dtype=np.float64)  # large enough to be stored as a blob


def transform(logdir: str, rows: np.ndarray) -> np.ndarray:
    log(logdir, "calls", "transform")
    time.sleep(float(os.environ.get(TRANSFORM_SECONDS, "0")))
    return rows * 2


def summarize(logdir: str, rows: np.ndarray) -> float:
    log(logdir, "calls", "summarize")
    return float(rows.sum())


@task
def three_steps(ctx: TaskContext, logdir: str, n: int) -> float:
    rows = ctx.step("load", load, logdir, n)
    rows = ctx.step("transform", transform, logdir, rows)
    return ctx.step("summarize", summarize, logdir, rows)


# ------------------------------------------------------ a loop killed at random


def slow_item(logdir: str, i: int) -> int:
    time.sleep(0.02)
    return i * i


@task(policy=every(items=1))
def sum_of_squares(ctx: TaskContext, logdir: str, n: int) -> dict[str, float]:
    rows = ctx.step("load", load, logdir, n)
    ctx.state.setdefault("total", 0)
    for i in ctx.range(n):
        log(logdir, "items", f"{ctx.attempt} {i} {ctx.durable_position}")  # the commits so far
        ctx.state["total"] += slow_item(logdir, int(rows[i]))
        ctx.progress((i + 1) / n)
    ctx.results["mean"] = ctx.state["total"] / n
    return {"total": ctx.state["total"], "mean": ctx.results["mean"]}


# ------------------------------------------------------------------------ Dask


@task(policy=every(items=3))
def count_on_worker(ctx: TaskContext, logdir: str, n: int, delay: float) -> int:
    """Sum 0..n-1 one item at a time, checkpointing every 3 items; logs each execution."""
    log(logdir, "attempts", f"{ctx.attempt} {os.getpid()}")
    ctx.state.setdefault("total", 0)
    for i in ctx.range(n):
        time.sleep(delay)
        log(logdir, "items", f"{ctx.attempt} {os.getpid()} {i}")
        ctx.state["total"] += i
    return ctx.state["total"]


@task(policy=every(items=1))
def count_fenced(ctx: TaskContext, logdir: str, n: int, delay: float) -> dict[str, int]:
    """Like count_on_worker, checkpointing every item; logs a StaleAttempt before raising it.
    The result names the attempt that produced it."""
    log(logdir, "attempts", f"{ctx.attempt} {os.getpid()}")
    ctx.state.setdefault("total", 0)
    try:
        for i in ctx.range(n):
            time.sleep(delay)
            log(logdir, "items", f"{ctx.attempt} {os.getpid()} {i}")
            ctx.state["total"] += i
    except StaleAttempt as exc:
        log(logdir, "stale", f"{ctx.attempt} {os.getpid()} {exc.attempt} {exc.current}")
        raise
    return {"total": ctx.state["total"], "attempt": ctx.attempt}


JOBS = {"three_steps": three_steps, "sum_of_squares": sum_of_squares}


def main(argv: list[str]) -> None:
    """``python -c 'import task_support as t; t.main(argv)' JOB STORE LOGDIR N``."""
    name, store, logdir, n = argv
    result = run_task(JOBS[name], logdir, int(n), job_id=name, location=store)
    log(logdir, "result", repr(result))


if __name__ == "__main__":
    main(sys.argv[1:])
