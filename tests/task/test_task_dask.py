"""Tasks on a real Dask cluster: a killed worker's task resumes elsewhere; a hung one is fenced."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

distributed = pytest.importorskip("distributed")
dask = pytest.importorskip("dask")

import task_support  # noqa: E402
from task_support import HERE, read_log  # noqa: E402

from safepoint import check  # noqa: E402
from safepoint.integrations.dask import submit  # noqa: E402
from safepoint.run import describe_run  # noqa: E402
from safepoint.store import LocalStore  # noqa: E402

pytestmark = [pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL, SIGSTOP"),
              pytest.mark.timeout(120)]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def position(store: Path, job: str) -> int:
    """The loop position of the job's newest checkpoint (0 if none)."""
    try:
        info = describe_run(LocalStore(store), job)
    except FileNotFoundError:
        return 0
    return info.position if info is not None else 0


def attempts(logdir: Path) -> list[tuple[int, int]]:
    return [tuple(map(int, line.split())) for line in read_log(str(logdir), "attempts")]


def items(logdir: Path) -> list[tuple[int, int, int]]:
    return [tuple(map(int, line.split())) for line in read_log(str(logdir), "items")]


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.setenv("PYTHONPATH", HERE)  # workers import task_support by name
    monkeypatch.setenv("SAFEPOINT_LEASE_TTL", "2")  # a hung writer's lease expires fast
    logdir = tmp_path / "logs"
    logdir.mkdir()
    return tmp_path / "store", logdir


def test_a_killed_workers_task_resumes_on_another_worker(dirs: tuple[Path, Path]) -> None:
    store, logdir = dirs
    n, every = 30, 3  # count_on_worker checkpoints every 3 items
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, silence_logs=logging.CRITICAL) as cluster, \
            distributed.Client(cluster) as client:
        future = submit(client, task_support.count_on_worker, str(logdir), n, 0.05,
                        job_id="count", location=store)
        wait_for(lambda: position(store, "count") >= 4 * every, "a few checkpoints")
        [(_, pid)] = attempts(logdir)
        os.kill(pid, signal.SIGKILL)
        assert future.result(timeout=60) == sum(range(n))

    (first, killed), (second, survivor) = attempts(logdir)
    assert (first, second) == (1, 2) and survivor != killed  # another worker process finished it
    done = items(logdir)
    resumed_at = min(i for a, _, i in done if a == 2)
    assert resumed_at >= 4 * every and resumed_at % every == 0  # from a checkpoint, not from 0
    assert max(i for a, _, i in done if a == 1) < resumed_at + every
    assert sorted({i for _, _, i in done}) == list(range(n))
    assert len(done) < n + every  # at most one checkpoint interval was done twice
    info = describe_run(LocalStore(store), "count")
    assert info is not None and info.complete and info.attempt == 2
    assert check(store).ok


@pytest.fixture
def cluster_without_nannies(tmp_path: Path) -> Iterator[tuple[object, list[subprocess.Popen[bytes]]]]:
    """A scheduler with a 5 s worker TTL, and two worker processes without a nanny.

    With a nanny, the scheduler restarts a hung worker through its nanny (which kills it)
    before the task runs elsewhere; a worker whose nanny hangs too (a paused VM) is only
    removed, and wakes up later still running its task: that is what this reproduces.
    """
    with dask.config.set({"distributed.scheduler.worker-ttl": "5s"}), \
            distributed.LocalCluster(n_workers=0, processes=True, host="127.0.0.1",
                                     dashboard_address=None, silence_logs=logging.CRITICAL) as cluster:
        log = open(tmp_path / "workers.log", "wb")  # noqa: SIM115  (closed below)
        workers = [subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
             "--no-nanny", "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"],
            stdout=log, stderr=log) for _ in range(2)]
        try:
            with distributed.Client(cluster) as client:
                client.wait_for_workers(2, timeout=60)
                yield client, workers
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGCONT)
                worker.kill()
                worker.wait()
            log.close()


def test_a_hung_worker_is_taken_over_and_its_commits_are_refused(
        dirs: tuple[Path, Path], cluster_without_nannies: tuple[distributed.Client, list[object]]) -> None:
    store, logdir = dirs
    client, _ = cluster_without_nannies
    n = 40
    future = submit(client, task_support.count_fenced, str(logdir), n, 0.05, job_id="fenced", location=store)
    wait_for(lambda: position(store, "fenced") >= 3, "a few checkpoints")
    [(_, pid)] = attempts(logdir)
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: any(a == 2 for a, _, _ in items(logdir)), "attempt 2 to run an item")
    finally:
        os.kill(pid, signal.SIGCONT)

    assert future.result(timeout=60) == {"total": sum(range(n)), "attempt": 2}
    wait_for(lambda: read_log(str(logdir), "stale"), "the old attempt's refused commit")
    [line] = read_log(str(logdir), "stale")
    stale_attempt, stale_pid, *_ = map(int, line.split())
    assert (stale_attempt, stale_pid) == (1, pid)
    (_, old), (_, new) = attempts(logdir)
    assert old == pid != new
    # After attempt 2 began, attempt 1 finished at most the item it was paused in (one more
    # if it was paused between its fence check and its commit: the documented window).
    done = items(logdir)
    resumed_at = min(i for a, _, i in done if a == 2)
    by_first = [i for a, _, i in done if a == 1]
    assert by_first == list(range(len(by_first))) and len(by_first) <= resumed_at + 2
