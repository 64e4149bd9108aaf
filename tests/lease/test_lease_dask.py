"""Tasks on a real Dask cluster (a LocalCluster of worker processes, a 2 s lease TTL): a
completed job whose worker dies is not run again when Dask recomputes it, and one job id
submitted twice at once runs each step once and gives both callers the result."""

from __future__ import annotations

import logging
import os
import signal
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
from safepoint.lease import tickets  # noqa: E402
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
