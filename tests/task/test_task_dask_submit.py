"""What ``integrations.dask.submit`` hands to the client (no cluster, no dask needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from safepoint.integrations.dask import submit
from safepoint.tasks import TaskContext, task


class RecordingClient:
    """Stands for ``distributed.Client``: runs what is submitted at once, here."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def submit(self, fn: Any, *args: Any, **options: Any) -> Any:
        self.calls.append({"args": args, **options})
        return fn(*args)


@task(durable=False)
def add(ctx: TaskContext, a: int, b: int = 0) -> int:
    return a + b


@task(durable=False)
async def add_async(ctx: TaskContext, a: int) -> int:
    return await ctx.astep("inc", lambda x: x + 1, a)


def test_submit_runs_the_job_with_dask_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    client = RecordingClient()
    assert submit(client, add, 1, b=2, location="jobs", retries=2) == 3
    [call] = client.calls
    assert call["pure"] is False and call["retries"] == 2
    assert call["key"].startswith(f"safepoint-{add.job_id(1, b=2)}-")
    _, args, kwargs, job_id, location = call["args"]
    assert (args, kwargs, job_id) == ((1,), {"b": 2}, add.job_id(1, b=2))
    assert location == os.path.join(str(tmp_path), "jobs")  # resolved on the client


def test_submit_runs_async_tasks_to_completion_on_the_worker(tmp_path: Path) -> None:
    assert submit(RecordingClient(), add_async, 41, job_id="a", location=tmp_path) == 42


def test_submit_refuses_a_store_workers_cannot_share() -> None:
    with pytest.raises(ValueError, match="Dask workers cannot share it"):
        submit(RecordingClient(), add, 1, location="memory://jobs")
