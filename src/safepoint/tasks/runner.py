"""``@task`` and ``run_task``: a function turned into a resumable, idempotent job.

A job lives in the store under its job id::

    <job>/<attempt * 10**9 + n>/       the job's checkpoints (the newest two are kept)
    <job>/step-results/<attempt>-<index>/  the recorded result of each completed ctx.step
    <job>/attempts/<number>            one marker per attempt (fencing, see safepoint.fencing)

Running a job: take the next attempt number (which fences every older attempt), restore the
newest checkpoint if there is one, call the function with a :class:`TaskContext`, and on
return either remove the job (the default) or keep one final checkpoint holding the result
(``keep_completed=True``), which later runs with the same job id return without running.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, cast, overload

from safepoint.checkpointer import Checkpointer
from safepoint.errors import CheckpointNotFound, InputChanged, SafepointError, UnsupportedType
from safepoint.fencing import Attempt
from safepoint.format import prepare
from safepoint.policy import Clock, Policy, PolicyLike, after_substep, as_policy, every
from safepoint.store import Location, check_name, open_store
from safepoint.tasks.context import ATTEMPT_STRIDE, STEPS, TaskContext

P = ParamSpec("P")
R = TypeVar("R")

KEEP_CHECKPOINTS = 2
"""Checkpoints kept while a job runs: the newest, and one to fall back on if it is damaged."""


def default_policy() -> Policy:
    """Tasks checkpoint after every completed sub-step, and at a boundary 10 s after the last."""
    return after_substep() | every(seconds=10)


class Task(Generic[P, R]):
    """A resumable task: call it, or pass it to :func:`run_task` or Dask's ``submit``."""

    def __init__(
        self,
        fn: Callable[Concatenate[TaskContext, P], R],
        *,
        policy: PolicyLike | None = None,
        keep_completed: bool = False,
        allow_pickle: bool = False,
        durable: bool = True,
        clock: Clock = time.monotonic,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"@safepoint.task decorates a function, not {fn!r}")
        self.fn = fn
        self.policy = default_policy() if policy is None else as_policy(policy)
        self.keep_completed = keep_completed
        self.allow_pickle = allow_pickle
        self.durable = durable
        self.clock = clock
        self.is_async = inspect.iscoroutinefunction(fn)
        functools.update_wrapper(self, fn)

    @property
    def qualified_name(self) -> str:
        """``module.qualname`` of the function: recorded with the job and checked on resume."""
        return f"{self.fn.__module__}.{self.fn.__qualname__}"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run as a job with the default job id in the default store (see :func:`run_task`)."""
        return self.run(args, kwargs)

    def job_id(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The default job id of a call with these arguments: the function's name and a hash
        of the arguments (``process_file-3fa2c1d9e0b17a44``)."""
        return default_job_id(self, _inputs(self, args, kwargs)[1])

    def run(self, args: tuple[Any, ...], kwargs: dict[str, Any], *, job_id: str | None = None,
            location: Location = None) -> R:
        """Run (or resume) the job; an async task returns a coroutine to await."""
        if self.is_async:
            return self._run_async(args, kwargs, job_id, location)  # type: ignore[return-value]
        job = _Job(self, args, kwargs, job_id, location)
        ctx = None if job.completed else job.start()
        if ctx is None:
            return job.result
        return job.finish(self.fn(ctx, *args, **kwargs))

    async def _run_async(self, args: tuple[Any, ...], kwargs: dict[str, Any], job_id: str | None,
                         location: Location) -> Any:
        job = _Job(self, args, kwargs, job_id, location)
        ctx = None if job.completed else job.start()
        if ctx is None:
            return job.result
        return job.finish(await cast(Awaitable[Any], self.fn(ctx, *args, **kwargs)))

    def __reduce__(self) -> str | tuple[Any, ...]:
        # A module-level task is pickled by reference (like a function), so that Dask
        # workers import it; others (in __main__, or local) by value with their function.
        name, module = self.fn.__qualname__, self.fn.__module__
        if module != "__main__" and getattr(sys.modules.get(module), name, None) is self:
            return name
        return (_rebuild, (self.fn, self.policy, self.keep_completed, self.allow_pickle,
                           self.durable, self.clock))

    def __repr__(self) -> str:
        return f"<safepoint task {self.qualified_name}>"


def _rebuild(fn: Callable[..., Any], policy: Policy, keep_completed: bool, allow_pickle: bool,
             durable: bool, clock: Clock) -> Task[Any, Any]:
    return Task(fn, policy=policy, keep_completed=keep_completed, allow_pickle=allow_pickle,
                durable=durable, clock=clock)


@overload
def task(fn: Callable[Concatenate[TaskContext, P], R], /) -> Task[P, R]: ...


@overload
def task(
    *,
    policy: PolicyLike | None = None,
    keep_completed: bool = False,
    allow_pickle: bool = False,
    durable: bool = True,
    clock: Clock = time.monotonic,
) -> Callable[[Callable[Concatenate[TaskContext, P], R]], Task[P, R]]: ...


def task(
    fn: Callable[Concatenate[TaskContext, P], R] | None = None,
    /,
    *,
    policy: PolicyLike | None = None,
    keep_completed: bool = False,
    allow_pickle: bool = False,
    durable: bool = True,
    clock: Clock = time.monotonic,
) -> Task[P, R] | Callable[[Callable[Concatenate[TaskContext, P], R]], Task[P, R]]:
    """Turn ``def f(ctx, *args, **kwargs)`` (or ``async def``) into a resumable job.

    ``policy``: when to checkpoint at boundaries (default: after every sub-step, and every
    10 s); ``keep_completed``: keep the result of a completed job, so that a rerun with the
    same job id returns it without running (default: remove the job's checkpoints);
    ``allow_pickle``: let step results, ``ctx.results`` and the return value hold any
    object; ``durable=False``: skip fsync; ``clock``: for tests of time policies.
    """

    def decorate(fn: Callable[Concatenate[TaskContext, P], R]) -> Task[P, R]:
        return Task(fn, policy=policy, keep_completed=keep_completed, allow_pickle=allow_pickle,
                    durable=durable, clock=clock)

    return decorate if fn is None else decorate(fn)


def run_task(
    task: Task[P, R] | Callable[Concatenate[TaskContext, P], R],
    /,
    *args: Any,
    job_id: str | None = None,
    location: Location = None,
    **kwargs: Any,
) -> R:
    """Run ``task(*args, **kwargs)`` as the job ``job_id`` in the store at ``location``.

    The same job id resumes an interrupted job from its newest checkpoint; a completed one
    kept with ``keep_completed=True`` returns its recorded result without running. Without
    a job id, it is derived from the function's name and a hash of the arguments. An async
    task returns a coroutine: ``await run_task(...)``. (``job_id`` and ``location`` are
    taken by this function: a task with parameters of those names takes them via ``.run``.)
    """
    if not isinstance(task, Task):
        task = Task(task)
    return task.run(args, kwargs, job_id=job_id, location=location)


def default_job_id(task: Task[Any, Any], input_hash: str) -> str:
    """``<function name>-<16 hex digits of the arguments' hash>``, a valid checkpoint name."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", task.fn.__qualname__).strip(".-")[:150] or "task"
    return f"{base}-{input_hash[:16]}"


def _inputs(task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The recorded input tree, and its hash (sha256 of the encoded tree and its blobs)."""
    tree = {"args": list(args), "kwargs": dict(sorted(kwargs.items()))}
    try:
        prepared = prepare(tree, allow_pickle=task.allow_pickle)
    except UnsupportedType as exc:
        raise UnsupportedType(
            f"task {task.qualified_name}: its arguments are recorded with the job, so they must "
            f"be state-tree values (pass a path or an id instead of a live object, or use "
            f"allow_pickle=True): {exc}", tree_path=getattr(exc, "tree_path", ""),
            type_name=getattr(exc, "type_name", "")) from exc
    digest = hashlib.sha256(json.dumps(prepared.node, sort_keys=True).encode())
    for blob in prepared.blobs:
        digest.update(blob.data)
    return tree, digest.hexdigest()


class _Job:
    """One run of a task: reads the job's newest checkpoint, starts an attempt, finishes."""

    def __init__(self, task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 job_id: str | None, location: Location) -> None:
        self.task = task
        self.inputs, self.input_hash = _inputs(task, args, kwargs)
        self.job_id = check_name(job_id, "job_id") if job_id is not None else default_job_id(task, self.input_hash)
        self.store = open_store(location)
        self.checkpointer = Checkpointer(self.job_id, location=self.store, keep=KEEP_CHECKPOINTS,
                                         durable=task.durable, allow_pickle=task.allow_pickle)
        self.record = self._read_record()
        self.attempt: Attempt | None = None
        self.ctx: TaskContext | None = None

    @property
    def completed(self) -> bool:
        """Whether the newest checkpoint read is a completed job's (kept with its result)."""
        return self.record is not None and self.record["task"]["status"] == "completed"

    @property
    def result(self) -> Any:
        """The recorded result of a completed job."""
        return self.record["result"] if self.record is not None and self.completed else None

    def _read_record(self) -> dict[str, Any] | None:
        try:
            record = self.checkpointer.restore().state
        except CheckpointNotFound:
            return None
        header = record.get("task") if isinstance(record, dict) else None
        if not isinstance(header, dict) or "input_hash" not in header:
            raise SafepointError(
                f"{self.job_id!r} in {self.store.url} holds checkpoints that are not a task's; "
                "pick another job_id, or delete them with `safepoint rm "
                f"{self.job_id}`")
        if header.get("function") != self.task.qualified_name:
            raise InputChanged(
                f"job {self.job_id!r} in {self.store.url} was started by {header.get('function')}, "
                f"not {self.task.qualified_name}; pick another job_id, or delete the job "
                f"(`safepoint rm {self.job_id}`) to start over", path=self.job_id)
        if header["input_hash"] != self.input_hash:
            raise InputChanged(
                f"job {self.job_id!r} in {self.store.url} was started with other arguments "
                f"(recorded: {_describe(record.get('input'))}); pick another job_id for these, "
                f"or delete the job (`safepoint rm {self.job_id}`) to start over", path=self.job_id)
        return record

    def start(self) -> TaskContext | None:
        """Take the next attempt (fencing older ones), then restore the newest checkpoint:
        an older attempt may have committed between the first read and the fence. None when
        that attempt completed the job meanwhile (its result is then :attr:`result`)."""
        seen = self.checkpointer.latest_step()
        # Above the attempt of any checkpoint, in case markers were removed (a deleted job,
        # a late commit of a stale attempt): our checkpoint numbers must sort last.
        after = (seen or 0) // ATTEMPT_STRIDE + 1
        self.attempt = Attempt.begin(self.store, self.job_id, at_least=after, durable=self.task.durable)
        self.checkpointer.fence = self.attempt.check
        if self.checkpointer.latest_step() != seen:
            self.record = self._read_record()
            if self.completed:
                return None
        header = {"function": self.task.qualified_name, "input_hash": self.input_hash}
        self.ctx = TaskContext(job_id=self.job_id, attempt=self.attempt, checkpointer=self.checkpointer,
                               policy=self.task.policy, clock=self.task.clock, header=header,
                               inputs=self.inputs, record=self.record)
        return self.ctx

    def finish(self, result: Any) -> Any:
        """Record completion: keep one final checkpoint with the result, or remove the job.

        A stale attempt is refused first, so that it never removes a newer attempt's work
        (the check-then-act window of :mod:`safepoint.fencing` applies here too).
        """
        assert self.attempt is not None and self.ctx is not None, "finish() before start()"
        self.attempt.check()
        if not self.task.keep_completed:
            self.checkpointer.delete_all()
            return result
        final = self.ctx.save_completed(result)
        for step in self.checkpointer.steps():
            if step != final:
                self.checkpointer.delete(step)
        self.store.delete(f"{self.job_id}/{STEPS}")
        return result


def _describe(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["KEEP_CHECKPOINTS", "Task", "default_job_id", "default_policy", "run_task", "task"]
