"""Tasks killed with SIGKILL in real processes resume from their last checkpoint."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import task_support
from task_support import HERE, TRANSFORM_SECONDS, read_log

from safepoint import check
from safepoint.checkpointer import committed_steps
from safepoint.lease import holder
from safepoint.run import describe_run
from safepoint.store import LocalStore
from safepoint.tasks import run_task

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")


def start(job: str, store: Path, logdir: Path, n: int, **env: str) -> subprocess.Popen[bytes]:
    code = "import sys, task_support; task_support.main(sys.argv[1:])"
    return subprocess.Popen(
        [sys.executable, "-c", code, job, str(store), str(logdir), str(n)],
        env={**os.environ, "PYTHONPATH": HERE, **env}, cwd=HERE)


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.mark.parametrize("seed", [1, 2])
def test_killed_in_second_substep_resumes_after_the_first(tmp_path: Path, seed: int) -> None:
    store, logdir, n = tmp_path / "store", tmp_path / "logs", 5000
    logdir.mkdir()
    child = start("three_steps", store, logdir, n, **{TRANSFORM_SECONDS: "60"})
    wait_for(lambda: "transform" in read_log(str(logdir), "calls"), "the second sub-step to start")
    time.sleep(random.Random(seed).uniform(0.0, 0.2))  # a random instant inside it
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    assert read_log(str(logdir), "calls") == ["load", "transform"]
    assert len(committed_steps(LocalStore(store), "three_steps")) == 1  # the array of "load"
    found = holder(LocalStore(store), "three_steps")
    assert found is not None and found.generation == 1 and found.state == "dead"

    result = run_task(task_support.three_steps, str(logdir), n, job_id="three_steps", location=store)

    assert result == float((np.arange(n) * 2).sum())
    # "load" did not run again: its recorded array was restored and fed to "transform"
    assert read_log(str(logdir), "calls") == ["load", "transform", "transform", "summarize"]
    info = describe_run(LocalStore(store), "three_steps")
    assert info is not None and info.complete and info.attempt == 2
    assert check(store).ok


def test_killed_after_chosen_commits_the_result_is_exact(tmp_path: Path) -> None:
    """Each kill lands a random few milliseconds after the child reports that its commit of
    a randomly chosen item was written; every kill must leave a job that resumes exactly."""
    store, logdir, n = tmp_path / "store", tmp_path / "logs", 60
    logdir.mkdir()
    rng = random.Random(7)
    targets = sorted(rng.sample(range(3, n - 3), 6))
    for attempt, target in enumerate(targets, start=1):
        child = start("sum_of_squares", store, logdir, n)

        def committed(target: int = target, attempt: int = attempt) -> bool:
            lines = [line.split() for line in read_log(str(logdir), "items")]
            return any(int(a) == attempt and d != "None" and int(d) >= target for a, _, d in lines)

        wait_for(committed, f"the commit of item {target}", timeout=120)
        time.sleep(rng.uniform(0.0, 0.02))
        child.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
        info = describe_run(LocalStore(store), "sum_of_squares")
        assert info is not None and not info.complete and info.position >= target
        assert check(store).ok
    child = start("sum_of_squares", store, logdir, n)
    assert child.wait(timeout=120) == 0
    expected = sum(i * i for i in range(n))
    assert read_log(str(logdir), "result") == [repr({"total": expected, "mean": expected / n})]
    items = [tuple(map(int, line.split()[:2])) for line in read_log(str(logdir), "items")]
    assert sorted({i for _, i in items}) == list(range(n))  # each item done, redone only after a kill
    assert check(store).ok
