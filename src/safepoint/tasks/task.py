"""``@task`` and ``run_task``: a function turned into a resumable, idempotent job.

A task is a run (:class:`~safepoint.run.Run`) named by its job id, with the job's function
and arguments recorded, durable sub-steps, its ``state`` and ``results`` saved with every
checkpoint, and the name's lease as its attempt fencing. Running a job: take the lease (a
duplicate submission of a job that runs waits for it, by default), resume from the newest
records, call the function with the context, and on return commit a completion record
holding the result. A completed job is idempotent: running the job id again returns the
recorded result without running anything, until the job is removed (``safepoint rm``,
``fresh=True``) or its completion record is older than ``expire``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import json
import math
import re
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, cast, overload

from safepoint.errors import (
    InputChanged,
    UnsupportedType,
    async_user_frames,
    logger,
    user_frames,
)
from safepoint.format import prepare
from safepoint.policy import Clock, Policy, PolicyLike, after_substep, as_policy, every
from safepoint.run import Run
from safepoint.run.log import Replay
from safepoint.store import Location, check_name

P = ParamSpec("P")
R = TypeVar("R")
_NO_RESULT = object()
log = logger("task")


def default_policy() -> Policy:
    """Tasks checkpoint after every completed sub-step, and at a boundary 10 s after the last."""
    return after_substep() | every(seconds=10)


class TaskContext(Run):
    """What a task function receives as its first argument: a run with a job id.

    ``ctx.step(name, fn, *args)`` runs ``fn`` once and records its result; ``ctx.range(n)``
    (and ``ctx.iterate``, ``ctx.lines``) iterate from where the last checkpoint left off,
    nested too; ``ctx.state`` (small values) and ``ctx.results`` (intermediate results,
    large arrays included) are saved with every checkpoint. Checkpoints happen at
    boundaries: the end of a sub-step at the top level, an item of a loop, a
    ``maybe_checkpoint()`` call (whenever the task's policy says so), and every
    ``checkpoint()`` call.
    """

    kind = "task"

    def __init__(self, task: Task[Any, Any], job_id: str, *, inputs: dict[str, Any],
                 input_hash: str, location: Location, wait: float, takeover: bool = False,
                 fresh: bool = False) -> None:
        super().__init__(job_id, location=location, policy=task.policy,
                         keep_completed=task.keep_completed, progress=False, commit="sync",
                         durable=task.durable, clock=task.clock, takeover=takeover, wait=wait)
        self.task = task
        self.allow_pickle = task.allow_pickle
        self.job_id = self.name
        self.results: dict[str, Any] = {}
        """Intermediate results (any state tree, large arrays included), saved with every
        checkpoint; also the place for what a ``with ctx.substep(...)`` block computes."""
        self._header = {"kind": "task", "function": task.qualified_name, "input_hash": input_hash,
                        "input": _describe(inputs)}
        self._result: Any = _NO_RESULT
        self.recorded_result: Any = _NO_RESULT
        self._fresh = fresh

    def default_policy(self) -> Policy:
        return default_policy()

    def _extra(self) -> dict[str, Any]:
        return self._header

    def _saved_tree(self) -> Any:
        return {"state": self.state, "results": self.results}

    def _load_tree(self, tree: dict[str, Any]) -> None:
        state, results = tree.get("state"), tree.get("results")
        self.state = state if isinstance(state, dict) else {}
        self.results = results if isinstance(results, dict) else {}

    def _replay(self, replay: Replay) -> None:
        state = replay.state
        expire = self.task.expire
        expired = (state is not None and state.complete and expire is not None
                   and time.time() - state.time > expire)
        if replay.records and (self._fresh or expired):
            assert self._log is not None
            self._log.reset()  # fresh=True, or the completion record expired: run again
            replay = Replay()
            self.resumed = False
        newest = replay.records[-1] if replay.records else None
        if newest is not None:
            self._check_job(newest.extra)
        super()._replay(replay)
        state = replay.state
        if state is not None and state.complete:
            assert self._log is not None
            self.recorded_result = self._log.load(state.result, allow_pickle=self.allow_pickle)
            log.info("safepoint: job %r completed before (attempt %d); its recorded result is "
                     "returned and nothing runs", self.name, state.attempt)

    def _check_job(self, header: dict[str, Any]) -> None:
        where = self._store.url if self._store is not None else ""
        if header.get("function") != self._header["function"]:
            raise InputChanged(
                f"job {self.name!r} in {where} was started by {header.get('function')}, not "
                f"{self._header['function']}; pick another job_id, or delete the job "
                f"(`safepoint rm {self.name}`) to start over", path=self.name)
        if header.get("input_hash") != self._header["input_hash"]:
            raise InputChanged(
                f"job {self.name!r} in {where} was started with other arguments (recorded: "
                f"{header.get('input')}); pick another job_id for these, or delete the job "
                f"(`safepoint rm {self.name}`) to start over", path=self.name)

    def _result_tree(self, complete: bool) -> Any:
        if not complete or self._result is _NO_RESULT:
            return None
        assert self._log is not None
        log_, value, name, allow_pickle = self._log, self._result, self.name, self.allow_pickle

        def tree() -> Any:
            try:
                return log_.tree(value, allow_pickle=allow_pickle)
            except UnsupportedType as exc:
                raise exc.within("result", f"job {name!r} returned, but its return value "
                                 "cannot be recorded") from exc

        return tree

    def _finish(self) -> None:
        """Record completion: the result stays (the job is idempotent); the state, results
        and step results go. With ``keep_completed=False`` everything goes."""
        assert self._committer is not None and self._log is not None and self.lease is not None
        self._committer.flush()
        if self.complete:
            return
        if not self._keep_completed:
            super()._finish()
            return
        self._commit(complete=True, wait=True, with_state=False)
        assert self._committed is not None
        self._steps.clear()
        self._log.compact([self._committed])
        self.complete = True

    def __repr__(self) -> str:
        return f"<TaskContext job {self.name!r} attempt {self.attempt}>"


class Task(Generic[P, R]):
    """A resumable task: call it, or pass it to :func:`run_task` or Dask's ``submit``."""

    def __init__(
        self,
        fn: Callable[Concatenate[TaskContext, P], R],
        *,
        policy: PolicyLike | None = None,
        keep_completed: bool = True,
        expire: float | None = None,
        allow_pickle: bool = False,
        durable: bool = True,
        clock: Clock = time.monotonic,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"@safepoint.task decorates a function, not {fn!r}")
        self.fn = fn
        self.policy = default_policy() if policy is None else as_policy(policy)
        self.keep_completed = keep_completed
        self.expire = expire
        self.allow_pickle = allow_pickle
        self.durable = durable
        self.clock = clock
        self.is_async = inspect.iscoroutinefunction(fn)
        functools.update_wrapper(self, fn)

    @property
    def qualified_name(self) -> str:
        """``module.qualname`` of the function: recorded with the job and checked on resume."""
        return f"{self.fn.__module__}.{self.fn.__qualname__}"

    @user_frames
    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run as a job with the default job id in the default store (see :func:`run_task`)."""
        return self.run(args, kwargs)

    def job_id(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The default job id of a call with these arguments: the function's name and a hash
        of the arguments (``process_file-3fa2c1d9e0b17a44``)."""
        return default_job_id(self, _inputs(self, args, kwargs)[1])

    def context(self, args: tuple[Any, ...], kwargs: dict[str, Any], *, job_id: str | None = None,
                location: Location = None, wait: float | None = None,
                takeover: bool = False, fresh: bool = False) -> TaskContext:
        """The context of one run of the job (enter it to take the job's lease)."""
        inputs, input_hash = _inputs(self, args, kwargs)
        name = check_name(job_id, "job_id") if job_id is not None else default_job_id(self, input_hash)
        return TaskContext(self, name, inputs=inputs, input_hash=input_hash, location=location,
                           wait=math.inf if wait is None else wait, takeover=takeover,
                           fresh=fresh)

    @user_frames
    def run(self, args: tuple[Any, ...], kwargs: dict[str, Any], *, job_id: str | None = None,
            location: Location = None, fresh: bool = False, wait: float | None = None,
            takeover: bool = False) -> R:
        """Run (or resume) the job; an async task returns a coroutine to await.

        ``fresh=True``: forget what the job id recorded (a completed result included) and
        run it from the start. ``wait``: seconds to wait for an attempt running elsewhere
        (``None``: as long as it runs; ``0``: refuse at once with ``LeaseHeld``);
        ``takeover=True``: take the job from a running attempt, which is fenced.
        """
        if self.is_async:
            return self._run_async(args, kwargs, job_id, location, fresh, wait, takeover)  # type: ignore[return-value]
        with self.context(args, kwargs, job_id=job_id, location=location, wait=wait,
                          takeover=takeover, fresh=fresh) as ctx:
            if ctx.complete:
                return cast(R, ctx.recorded_result)
            ctx._result = self.fn(ctx, *args, **kwargs)
        return cast(R, ctx._result)

    @async_user_frames
    async def _run_async(self, args: tuple[Any, ...], kwargs: dict[str, Any], job_id: str | None,
                         location: Location, fresh: bool, wait: float | None, takeover: bool) -> Any:
        ctx = self.context(args, kwargs, job_id=job_id, location=location, wait=wait,
                           takeover=takeover, fresh=fresh)
        async with ctx:
            if ctx.complete:
                return ctx.recorded_result
            ctx._result = await cast(Awaitable[Any], self.fn(ctx, *args, **kwargs))
        return ctx._result

    def __reduce__(self) -> str | tuple[Any, ...]:
        # A module-level task is pickled by reference (like a function), so that Dask
        # workers import it; others (in __main__, or local) by value with their function.
        name, module = self.fn.__qualname__, self.fn.__module__
        if module != "__main__" and getattr(sys.modules.get(module), name, None) is self:
            return name
        return (_rebuild, (self.fn, self.policy, self.keep_completed, self.expire,
                           self.allow_pickle, self.durable, self.clock))

    def __repr__(self) -> str:
        return f"<safepoint task {self.qualified_name}>"


def _rebuild(fn: Callable[..., Any], policy: Policy, keep_completed: bool, expire: float | None,
             allow_pickle: bool, durable: bool, clock: Clock) -> Task[Any, Any]:
    return Task(fn, policy=policy, keep_completed=keep_completed, expire=expire,
                allow_pickle=allow_pickle, durable=durable, clock=clock)


@overload
def task(fn: Callable[Concatenate[TaskContext, P], R], /) -> Task[P, R]: ...


@overload
def task(
    *,
    policy: PolicyLike | None = None,
    keep_completed: bool = True,
    expire: float | None = None,
    allow_pickle: bool = False,
    durable: bool = True,
    clock: Clock = time.monotonic,
) -> Callable[[Callable[Concatenate[TaskContext, P], R]], Task[P, R]]: ...


def task(
    fn: Callable[Concatenate[TaskContext, P], R] | None = None,
    /,
    *,
    policy: PolicyLike | None = None,
    keep_completed: bool = True,
    expire: float | None = None,
    allow_pickle: bool = False,
    durable: bool = True,
    clock: Clock = time.monotonic,
) -> Task[P, R] | Callable[[Callable[Concatenate[TaskContext, P], R]], Task[P, R]]:
    """Turn ``def f(ctx, *args, **kwargs)`` (or ``async def``) into a resumable job.

    ``policy``: when to checkpoint at boundaries (default: after every sub-step, and every
    10 s); ``keep_completed`` (default True): keep the result of a completed job, so that a
    rerun with the same job id returns it without running (False: remove the job, the next
    run starts afresh); ``expire``: seconds after which a completion record no longer
    counts; ``allow_pickle``: let step results, ``ctx.results`` and the return value hold
    any object; ``durable=False``: skip fsync; ``clock``: for tests of time policies.
    """

    def decorate(fn: Callable[Concatenate[TaskContext, P], R]) -> Task[P, R]:
        return Task(fn, policy=policy, keep_completed=keep_completed, expire=expire,
                    allow_pickle=allow_pickle, durable=durable, clock=clock)

    return decorate if fn is None else decorate(fn)


@user_frames
def run_task(
    task: Task[P, R] | Callable[Concatenate[TaskContext, P], R],
    /,
    *args: Any,
    job_id: str | None = None,
    location: Location = None,
    **kwargs: Any,
) -> R:
    """Run ``task(*args, **kwargs)`` as the job ``job_id`` in the store at ``location``.

    The same job id resumes an interrupted job from its newest checkpoint, and returns the
    recorded result of a completed one without running it. Without a job id, it is derived
    from the function's name and a hash of the arguments. An async task returns a coroutine:
    ``await run_task(...)``. (``job_id`` and ``location`` are taken by this function: a
    task with parameters of those names takes them via ``.run``.)
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
        where = "state['args']" if exc.tree_path.startswith("state['args']") else "state['kwargs']"
        raise exc.within(
            where[len("state['"):-len("']")],
            f"task {task.qualified_name}: its arguments are recorded with the job, so they must "
            f"be state-tree values (pass a path or an id instead of a live object, or use "
            f"allow_pickle=True)", replaces=where) from exc
    digest = hashlib.sha256(json.dumps(prepared.node, sort_keys=True).encode())
    for blob in prepared.blobs:
        digest.update(blob.data)
    return tree, digest.hexdigest()


def _describe(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_coroutine(result: Any) -> Any:
    """Run an async task's coroutine to completion (Dask workers)."""
    return asyncio.run(result) if inspect.iscoroutine(result) else result


__all__ = ["Task", "TaskContext", "default_job_id", "default_policy", "run_coroutine",
           "run_task", "task"]
