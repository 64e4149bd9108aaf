"""A resumable task run locally: sub-steps that run once, and a checkpointed loop.

    python examples/task_local.py --crash-at 6    # fails at chunk 6 (a simulated crash)
    python examples/task_local.py                 # resumes: skips "generate", goes on at chunk 6
    safepoint run -- python examples/task_local.py    # rerun it until it completes

Checkpoints go to ./.safepoint (or $SAFEPOINT_DIR). A completed job is idempotent: running
it again returns its recorded result at once; `safepoint rm statistics` forgets it.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from safepoint.policy import after_substep, every
from safepoint.tasks import TaskContext, run_task, task

CRASH_AT: int | None = None  # not an argument of the task: arguments identify the job


def generate(seed: int, n: int) -> np.ndarray:
    print("running generate")
    return np.random.default_rng(seed).normal(loc=3.0, scale=2.0, size=n)


def report(count: int, mean: float, std: float) -> dict[str, float]:
    print("running report")
    return {"count": count, "mean": mean, "std": std}


@task(policy=after_substep() | every(items=2))  # after each sub-step, and every 2nd chunk
def statistics(ctx: TaskContext, seed: int, n: int, chunks: int) -> dict[str, float]:
    data = ctx.step("generate", generate, seed, n)  # recorded: a resume does not regenerate
    if ctx.resumed:
        print(f"resumed: attempt {ctx.attempt}")
    parts = np.array_split(data, chunks)
    totals = ctx.state.setdefault("totals", [0, 0.0, 0.0])  # count, sum, sum of squares
    for i in ctx.range(chunks):  # a resume continues after the last checkpointed chunk
        if i == CRASH_AT:
            raise RuntimeError(f"simulated crash at chunk {i}")
        print(f"running chunk {i}")
        totals[0] += parts[i].size
        totals[1] += float(parts[i].sum())
        totals[2] += float((parts[i] ** 2).sum())
        ctx.progress((i + 1) / chunks, f"chunk {i + 1} of {chunks}")
    count, total, squares = totals
    mean = total / count
    return ctx.step("report", report, count, mean, (squares / count - mean**2) ** 0.5)


def main() -> int:
    global CRASH_AT
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crash-at", type=int, help="raise at this chunk (a simulated crash)")
    CRASH_AT = parser.parse_args().crash_at
    try:
        result = run_task(statistics, 42, 1_000_000, 10, job_id="statistics")
    except RuntimeError as exc:
        print(f"failed: {exc}")
        return 1
    print(f"count {result['count']} mean {result['mean']:.6f} std {result['std']:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
