"""Dask distributed: a resumable task that another worker takes over when its worker dies.

    future = safepoint.integrations.dask.submit(client, job, "in.csv", job_id="nightly",
                                                location="s3://bucket/ckpts")
    future.result()

The task checkpoints to a store every worker reaches (a shared directory or an fsspec URL).
When the worker running it dies, the scheduler reschedules the task on another worker (up to
``distributed.scheduler.allowed-failures`` times), where it resumes from the newest
checkpoint as a new attempt; the older attempt is fenced, so a worker that was only hung and
wakes up later cannot commit over the new attempt's progress (it gets ``StaleAttempt``).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from safepoint.store import Location, Store, default_location
from safepoint.tasks import Task, TaskContext

if TYPE_CHECKING:
    from distributed import Client, Future

P = ParamSpec("P")
R = TypeVar("R")


def submit(
    client: Client,
    task: Task[P, R] | Callable[Concatenate[TaskContext, P], R],
    /,
    *args: Any,
    job_id: str | None = None,
    location: Location = None,
    retries: int = 0,
    **kwargs: Any,
) -> Future[Any]:
    """Submit ``task(*args, **kwargs)`` as the job ``job_id`` to a Dask cluster.

    Returns a Dask future of the task's result (an async task is run to completion on the
    worker). ``location`` must be reachable from every worker with the same address: a
    shared directory or an fsspec URL; ``None`` means the default store resolved to an
    absolute path here, on the client. ``retries``: how many times Dask reruns the task
    after it *raised* (each rerun resumes from the newest checkpoint); a dead worker is
    handled by the scheduler's ``allowed-failures`` instead. The task is submitted with
    ``pure=False``: every call runs (and the job id, not Dask's cache, makes it idempotent).
    """
    if not isinstance(task, Task):
        task = Task(task)
    if job_id is None:
        job_id = task.job_id(*args, **kwargs)
    shared = _shared_location(location)
    key = f"safepoint-{job_id}-{uuid.uuid4().hex[:8]}"
    return client.submit(_run_on_worker, task, args, kwargs, job_id, shared, key=key, pure=False,
                         retries=retries)


def _shared_location(location: Location) -> Location:
    if isinstance(location, Store):
        return location
    text = os.fspath(location) if location is not None else default_location()
    if text.startswith("memory://"):
        raise ValueError(
            f"location {text!r} lives in one process's memory: Dask workers cannot share it; "
            "use a shared directory or an object store URL (s3://, gs://, ...)")
    if "://" in text:
        return text
    return os.path.abspath(os.path.expanduser(text))


def _run_on_worker(task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                   job_id: str, location: Location) -> Any:
    result = task.run(args, kwargs, job_id=job_id, location=location)
    if task.is_async:
        return asyncio.run(result)
    return result


__all__ = ["submit"]
