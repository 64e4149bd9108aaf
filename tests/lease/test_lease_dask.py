"""Tasks on a real Dask cluster (a LocalCluster of worker processes, a 2 s lease TTL): a
completed job whose worker dies is not run again when Dask recomputes it, and one job id
submitted twice at once runs each step once and gives both callers the result."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

distributed = pytest.importorskip("distributed")

import lease_support  # noqa: E402
from lease_support import (  # noqa: E402
    DELAY_ENV,
    EVENTS_ENV,
    HERE,
    SRC,
    assert_consistent,
    events,
    expected_result,
    wait_until,
)

from safepoint.integrations.dask import submit  # noqa: E402
from safepoint.lease import holder, tickets  # noqa: E402
from safepoint.store import open_store  # noqa: E402

pytestmark = pytest.mark.timeout(180)
N = 4


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A client of a cluster of two single-threaded worker processes (with nannies)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([HERE, SRC]))  # workers import lease_support
    monkeypatch.setenv("SAFEPOINT_LEASE_TTL", "2")
    monkeypatch.setenv(EVENTS_ENV, str(tmp_path / "events"))
    monkeypatch.setenv(DELAY_ENV, "0.05")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None,
                                  silence_logs=logging.CRITICAL) as cluster, \
            distributed.Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        yield client


def executed(tmp_path: Path) -> list[int]:
    return sorted(e.number for e in events(tmp_path / "events") if e.event == "exec")


def test_a_completed_job_whose_worker_died_is_not_run_again(tmp_path: Path, client: Any,
                                                            location: str) -> None:
    future = submit(client, lease_support.squares, N, job_id="job", location=location)
    distributed.wait(future, timeout=60)  # done; its result lives on that worker only
    assert future.status == "finished"
    [worker] = {e.pid for e in events(tmp_path / "events")}
    os.kill(worker, signal.SIGKILL)  # the result is lost: Dask computes the task again
    assert future.result(timeout=60) == expected_result("task", N)
    store = open_store(location)
    wait_until(lambda: max(tickets(store, "job")) == 2, "the recomputation's attempt")
    assert executed(tmp_path) == list(range(N))  # no step ran again: the recorded result
    assert [e.event for e in events(tmp_path / "events")].count("start") == 1
    assert_consistent(location)


def test_one_job_submitted_twice_runs_each_step_once(tmp_path: Path, client: Any,
                                                     location: str) -> None:
    first = submit(client, lease_support.squares, N, job_id="job", location=location)
    second = submit(client, lease_support.squares, N, job_id="job", location=location)
    assert [f.result(timeout=60) for f in (first, second)] == [expected_result("task", N)] * 2
    assert executed(tmp_path) == list(range(N))
    assert [e.event for e in events(tmp_path / "events")].count("start") == 1
    assert sorted(tickets(open_store(location), "job")) == [2]  # both took the lease in turn
    assert_consistent(location)


# ------------------------------------------------------------------------------ chaos

JOBS, STEPS, MAX_KILLS = 18, 5, 8


@pytest.fixture(params=["local", "s3"])
def chaos_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Where the chaos jobs keep their records: a shared folder, or S3 (moto) with its
    conditional writes."""
    if request.param == "local":
        return str(tmp_path / "store")
    pytest.importorskip("s3fs")
    from safepoint.store import FsspecStore
    options = request.getfixturevalue("s3_options")
    return FsspecStore(f"s3://safepoint-tests/{os.urandom(5).hex()}", **options)


@pytest.mark.timeout(300)
def test_chaos_killed_workers_never_rerun_a_committed_step_nor_lose_a_job(
        tmp_path: Path, chaos_store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs of durable sub-steps on three worker processes while a random worker is
    SIGKILLed every 0.3 to 1.2 s (a nanny restarts it; Dask reschedules its tasks and
    recomputes results it held): every job's result is exact, and no sub-step whose record
    was acknowledged ever runs again, whichever instant each kill landed at."""
    import random

    import dask

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([HERE, SRC]))
    monkeypatch.setenv("SAFEPOINT_LEASE_TTL", "2")
    monkeypatch.setenv(EVENTS_ENV, str(tmp_path / "events"))
    monkeypatch.setenv(DELAY_ENV, "0.03")
    jobs = [f"job{j}" for j in range(JOBS if isinstance(chaos_store, str) else JOBS // 2)]
    kills = 0
    with dask.config.set({"distributed.scheduler.allowed-failures": 1000}):
        cluster = distributed.LocalCluster(n_workers=3, threads_per_worker=1, processes=True,
                                           host="127.0.0.1", dashboard_address=None,
                                           silence_logs=logging.CRITICAL)
    client = distributed.Client(cluster)
    try:
        client.wait_for_workers(3, timeout=60)
        futures = [submit(client, lease_support.chaos_job, job, STEPS, job_id=job,
                          location=chaos_store) for job in jobs]
        wait_until(lambda: any(e.event == "commit" for e in events(tmp_path / "events")),
                   "a first committed sub-step")
        chance = random.Random()
        while kills < MAX_KILLS and not all(f.done() for f in futures):
            time.sleep(chance.uniform(0.3, 1.2))
            try:
                pids = list(client.run(os.getpid, wait=True).values())
            except Exception:  # a worker is restarting: try again later
                continue
            if len(pids) < 3:  # one is being restarted: kill only a full cluster
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(chance.choice(pids), signal.SIGKILL)
                kills += 1
        with contextlib.suppress(TimeoutError, distributed.TimeoutError):
            distributed.wait(futures, timeout=150)
        pending = [f for f in futures if not f.done()]
        if pending:  # say why: no worker left, or a job that does not finish
            store = open_store(chaos_store) if isinstance(chaos_store, str) else chaos_store
            stuck = {f.key: f.status for f in pending}
            holders = {job: holder(store, job) for job in jobs}
            raise AssertionError(f"{len(pending)} jobs unfinished after {kills} kills, with "
                                 f"{len(client.scheduler_info()['workers'])} workers: {stuck}; "
                                 f"their leases: {holders}")
        results = client.gather(futures)
    finally:  # a nanny may still be restarting a killed worker: close what closes, kill the rest
        with contextlib.suppress(Exception):
            client.close(timeout=30)
        with contextlib.suppress(Exception):
            cluster.close(timeout=30)
        for child in multiprocessing.active_children():
            child.kill()
    assert results == [sum(k * k for k in range(STEPS))] * len(jobs)  # no job lost, all exact
    committed: set[str] = set()
    rerun = []
    for event in events(tmp_path / "events"):
        if event.event == "commit":
            committed.add(event.value)
        elif event.event == "exec" and event.value in committed:
            rerun.append(event.value)
    assert rerun == [], f"committed sub-steps ran again after {kills} kills: {rerun}"
    assert committed == {f"{job} {k}" for job in jobs for k in range(STEPS)}
    assert_consistent(chaos_store, crash_leftovers=True)
