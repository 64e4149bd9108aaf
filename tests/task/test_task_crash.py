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

from safepoint.checkpointer import committed_steps
from safepoint.fencing import list_attempts
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
    assert len(committed_steps(LocalStore(store), "three_steps")) == 1  # after "load"
    assert list_attempts(LocalStore(store), "three_steps") == [1]

    result = run_task(task_support.three_steps, str(logdir), n, job_id="three_steps", location=store)

    assert result == float((np.arange(n) * 2).sum())
    # "load" did not run again: its recorded array was restored and fed to "transform"
    assert read_log(str(logdir), "calls") == ["load", "transform", "transform", "summarize"]
    assert not (store / "three_steps").exists()  # completed: checkpoints removed


def test_killed_at_random_instants_the_result_is_exact(tmp_path: Path) -> None:
    store, logdir, n = tmp_path / "store", tmp_path / "logs", 60
    logdir.mkdir()
    rng = random.Random(7)
    kills = 0
    while True:
        child = start("sum_of_squares", store, logdir, n)
        try:  # at most 12 kills, then let it finish
            child.wait(timeout=rng.uniform(0.3, 0.9) if kills < 12 else 120)  # import time included
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            child.wait()
            kills += 1
            if read_log(str(logdir), "result"):
                break  # killed on its way out, after it completed: do not start a new job
            continue
        assert child.returncode == 0
        break
    expected = sum(i * i for i in range(n))
    assert read_log(str(logdir), "result") == [repr({"total": expected, "mean": expected / n})]
    assert kills >= 2, "the job should have been killed a few times before it completed"
    assert not (store / "sum_of_squares").exists()
