"""The context a task function receives: sub-steps, positioned loops, state, progress, checkpoints.

Everything the context knows is one *record*, saved as one checkpoint of the job::

    {"task": {"version", "function", "input_hash", "status"}, "input": {"args", "kwargs"},
     "attempt": 2, "steps": [{"name": "load", "key": "step-results/00000001-000000", "value": None},
               {"name": "count", "key": None, "value": 1234}, ...],
     "substeps": ["train"], "loops": {"top/0": [17, 30]}, "current": "train",
     "progress": 0.57, "message": "...", "state": {...}, "results": {...}}

A small result of a completed ``ctx.step`` is kept in the record; a large one is written once,
as its own checkpoint folder under ``<job>/step-results/`` (named by attempt and step index,
so attempts never overwrite each other), and the record only names it, so that it is not
rewritten by every later checkpoint.
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, ParamSpec, TypeVar

from safepoint.checkpointer import Checkpointer
from safepoint.errors import (
    InputChanged,
    SafepointError,
    StepExists,
    StepMismatch,
    SubstepCompleted,
)
from safepoint.fencing import Attempt
from safepoint.format import load_tree, prepare, read_manifest, write_checkpoint
from safepoint.policy import Clock, Policy, Tick

P = ParamSpec("P")
T = TypeVar("T")

RECORD_VERSION = 1
STEPS = "step-results"
"""The folder, under the job's name, that holds the results of completed ``ctx.step`` calls."""
INLINE_RESULT = 16 << 10
"""A step result whose encoding is at most this many bytes (and holds no large array) is kept
inside the record; a larger one is written once, as its own checkpoint folder."""
ATTEMPT_STRIDE = 10**9
"""Checkpoint numbers are ``attempt * ATTEMPT_STRIDE + n``: a newer attempt's sort last."""
_TOP = "top"


class TaskContext:
    """What a task function receives as its first argument.

    ``ctx.step(name, fn, *args)`` runs ``fn`` once and records its result; ``ctx.range(n)``
    iterates from where the last checkpoint left off; ``ctx.state`` (small values) and
    ``ctx.results`` (intermediate results, large arrays included) are saved with every
    checkpoint. Checkpoints happen at boundaries: the end of a sub-step, an item of
    ``ctx.range``, a ``maybe_checkpoint()`` call (whenever the task's policy says so), and
    every ``checkpoint()`` call.
    """

    def __init__(
        self,
        *,
        job_id: str,
        attempt: Attempt,
        checkpointer: Checkpointer,
        policy: Policy,
        clock: Clock,
        header: dict[str, Any],
        inputs: dict[str, Any],
        record: dict[str, Any] | None,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt.number
        """This attempt's number: 1 for the first run of a job, then 2, 3, ... on each resume."""
        self._fence = attempt
        self._checkpointer = checkpointer
        self._store = checkpointer.store
        self._policy = policy
        self._clock = clock
        self._header = header
        self._inputs = inputs
        record = record or {}
        self.resumed = bool(record)
        """True when this attempt started from a checkpoint of an earlier one."""
        self.state: dict[str, Any] = dict(record.get("state") or {})
        """Small mutable state, saved with every checkpoint."""
        self.results: dict[str, Any] = dict(record.get("results") or {})
        """Intermediate results (any state tree, large arrays included), saved with every
        checkpoint; also the place for what a ``with ctx.substep(...)`` block computes."""
        self._steps: list[dict[str, Any]] = list(record.get("steps") or [])
        self._substeps: list[str] = list(record.get("substeps") or [])
        self._loops: dict[str, list[int]] = {k: list(v) for k, v in (record.get("loops") or {}).items()}
        self._progress: float | None = record.get("progress")
        self._message: str | None = record.get("message")
        self._next_step = 0
        self._current: str | None = None
        self._scope = _TOP
        self._loop_counts: dict[str, int] = {}
        self._count = 0
        self._items = 0
        self._last_at = clock()
        self._progress_at_last = self._progress or 0.0

    # ------------------------------------------------------------------ sub-steps

    def step(self, name: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` once and record its result; on resume, return the
        recorded result without calling ``fn``.

        Sub-steps are identified by their index (the n-th ``ctx.step`` call of the task) and
        their name, so the same name may repeat in a loop; a recorded sub-step whose name
        differs from the one now at its index raises :class:`StepMismatch`. The result must
        be a state tree (or anything, with ``allow_pickle=True`` on the task).
        """
        index, recorded = self._enter_step(name, fn)
        if recorded is not None:
            return self._load_step(recorded)
        with self._running(name, f"step{index}"):
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                _close_awaitable(result)
                raise TypeError(f"sub-step {name!r}: {_callable_name(fn)} returned an awaitable; "
                                f"in an async task use `await ctx.astep({name!r}, ...)`")
            self._record_step(index, name, result)
        self._boundary(substep_completed=True)
        return result

    async def astep(self, name: str, fn: Callable[P, Awaitable[T] | T], /, *args: P.args,
                    **kwargs: P.kwargs) -> T:
        """:meth:`step` for async tasks: ``fn`` may be a coroutine function or a plain one."""
        index, recorded = self._enter_step(name, fn)
        if recorded is not None:
            return self._load_step(recorded)
        with self._running(name, f"step{index}"):
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            self._record_step(index, name, result)
        self._boundary(substep_completed=True)
        return result  # type: ignore[return-value]

    @contextlib.contextmanager
    def substep(self, name: str) -> Iterator[None]:
        """A named block recorded as completed when it exits without an exception.

        Python always runs the body of a ``with`` block, so guard it::

            if not ctx.completed("train"):
                with ctx.substep("train"):
                    ctx.results["model"] = train(rows)

        Entering a block that already completed raises :class:`SubstepCompleted` rather
        than running it twice. Block names are unique within a job.
        """
        _check_step_name(name)
        if name in self._substeps:
            raise SubstepCompleted(
                f"job {self.job_id!r}: sub-step {name!r} already completed; guard the block "
                f"with `if not ctx.completed({name!r}):` so that a resume skips it",
                name=self.job_id, substep=name)
        with self._running(name, f"block:{name}"):
            yield
            self._substeps.append(name)
        self._boundary(substep_completed=True)

    def completed(self, name: str) -> bool:
        """True when a sub-step (``ctx.step`` or ``ctx.substep``) of this name has completed."""
        return name in self._substeps or any(s["name"] == name for s in self._steps)

    # ---------------------------------------------------------------------- loops

    def range(self, *bounds: int) -> Iterator[int]:
        """Like :func:`range`, resuming after the last item a checkpoint counted.

        Each finished item is a boundary where the policy may checkpoint; the position is
        saved with the checkpoint, so after a crash the loop continues at the first item
        whose work was not committed (that item is redone: keep its effects in
        ``ctx.state`` / ``ctx.results``, which are saved with the same checkpoint).
        """
        items = builtins.range(*bounds)
        key = self._loop_key()
        position, length = self._loops.get(key, (0, len(items)))
        if length != len(items):
            raise InputChanged(
                f"job {self.job_id!r}: loop {key} had {length} items when it was checkpointed "
                f"and has {len(items)} now; the task's code or input changed. Delete the job "
                f"(`safepoint rm {self.job_id}`) to start over", path=key)
        outer = self._scope
        try:
            for index in builtins.range(position, len(items)):
                self._scope = f"{key}:{index}"  # loops in the body are keyed by this item
                yield items[index]
                self._scope = outer
                self._forget_scope(f"{key}:{index}")
                self._loops[key] = [index + 1, len(items)]
                self._boundary(substep_completed=False)
        finally:
            self._scope = outer

    def _loop_key(self) -> str:
        count = self._loop_counts.get(self._scope, 0)
        self._loop_counts[self._scope] = count + 1
        return f"{self._scope}/{count}"

    # ----------------------------------------------------------- progress, saving

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Record overall progress in [0, 1] (shown by ``safepoint ls``) and a message."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise ValueError(f"progress must be a number in [0, 1], not {fraction!r}")
        self._progress = float(fraction)
        if message is not None:
            self._message = str(message)

    def maybe_checkpoint(self) -> bool:
        """A boundary: checkpoint if the task's policy says so; returns whether it did."""
        return self._boundary(substep_completed=False)

    def checkpoint(self) -> None:
        """Checkpoint now: state, results, progress, completed sub-steps and loop positions.

        Raises :class:`~safepoint.errors.StaleAttempt` when a newer attempt of the job has
        started: this attempt must stop.
        """
        self._save(self._record())
        self._items = 0
        self._last_at = self._clock()
        self._progress_at_last = self._progress or 0.0

    def _boundary(self, *, substep_completed: bool) -> bool:
        self._items += 1
        tick = Tick(items=self._items, last_checkpoint_at=self._last_at, fraction=self._progress,
                    fraction_at_last=self._progress_at_last, substep_completed=substep_completed,
                    clock=self._clock)
        if not self._policy(tick):
            return False
        self.checkpoint()
        return True

    def _record(self) -> dict[str, Any]:
        return {
            "task": {**self._header, "version": RECORD_VERSION, "status": "running"},
            "input": self._inputs,
            "attempt": self.attempt,
            "steps": self._steps,
            "substeps": self._substeps,
            "loops": self._loops,
            "current": self._current,
            "progress": self._progress,
            "message": self._message,
            "state": self.state,
            "results": self.results,
        }

    def save_completed(self, result: Any) -> int:
        """Commit the final checkpoint of a completed job: its input and result (no sub-step
        results, state or loop positions: a completed job is never resumed)."""
        self._progress, self._current = 1.0, None
        return self._save({"task": {**self._header, "version": RECORD_VERSION, "status": "completed"},
                           "input": self._inputs, "attempt": self.attempt, "progress": 1.0,
                           "message": self._message, "result": result})

    def _save(self, record: dict[str, Any]) -> int:
        """Commit ``record`` as the job's next checkpoint (fenced); returns its number."""
        self._count += 1
        number = self.attempt * ATTEMPT_STRIDE + self._count
        status = record["task"]["status"]
        try:
            metadata = {"current": self._current, "message": self._message}
            self._checkpointer.save(
                number, record, metadata={k: v for k, v in metadata.items() if v is not None},
                extra={"kind": "task", "progress": self._progress, "attempt": self.attempt,
                       "status": status})
        except StepExists:  # a newer attempt's checkpoint sorts after ours: we are stale
            self._fence.check()
            raise
        return number

    # ------------------------------------------------------------------ internals

    def _enter_step(self, name: str, fn: Callable[..., Any]) -> tuple[int, dict[str, Any] | None]:
        _check_step_name(name)
        if not callable(fn):
            raise TypeError(f"ctx.step({name!r}, fn, ...) needs a callable fn, not {fn!r}")
        index = self._next_step
        self._next_step += 1
        if index >= len(self._steps):
            return index, None
        recorded = self._steps[index]
        if recorded["name"] != name:
            raise StepMismatch(
                f"job {self.job_id!r}: sub-step {index} was recorded as {recorded['name']!r}, "
                f"but the task now calls {name!r} there; its code changed since the job started. "
                f"Restore the old order, or delete the job (`safepoint rm {self.job_id}`) to "
                "start over", name=self.job_id, index=index, recorded=recorded["name"], current=name)
        return index, recorded

    @contextlib.contextmanager
    def _running(self, name: str, scope: str) -> Iterator[None]:
        if self._current is not None:
            raise SafepointError(
                f"job {self.job_id!r}: sub-step {name!r} started inside sub-step "
                f"{self._current!r}; sub-steps do not nest, call them one after another")
        outer = self._scope
        self._current, self._scope = name, scope
        try:
            yield
            self._forget_scope(scope)  # the sub-step is done: its loops will not run again
        finally:
            self._current, self._scope = None, outer
            self._loop_counts.pop(scope, None)

    def _forget_scope(self, scope: str) -> None:
        for key in [k for k in self._loops if k.startswith(f"{scope}/")]:
            del self._loops[key]
        self._loop_counts.pop(scope, None)

    def _record_step(self, index: int, name: str, result: Any) -> None:
        prepared = prepare(result, allow_pickle=self._checkpointer.allow_pickle)
        if not prepared.blobs and len(json.dumps(prepared.node)) <= INLINE_RESULT:
            self._steps.append({"name": name, "key": None, "value": result})
            return
        key = f"{STEPS}/{self.attempt:08d}-{index:06d}"
        write_checkpoint(self._store, f"{self.job_id}/{key}", index, prepared,
                         metadata={"step": name}, durable=self._checkpointer.durable,
                         extra={"kind": "task-step"}, before_commit=self._fence.check,
                         newest=False)  # a new key per attempt and index: nothing to roll back to
        self._steps.append({"name": name, "key": key, "value": None, "index": index})

    def _load_step(self, recorded: dict[str, Any]) -> Any:
        key = recorded["key"]
        if key is None:
            return recorded["value"]
        step = recorded.get("index", int(str(key).rsplit("-", 1)[-1]))
        manifest = read_manifest(self._store, f"{self.job_id}/{key}", step)
        return load_tree(self._store, manifest, allow_pickle=self._checkpointer.allow_pickle).tree


def _check_step_name(name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"a sub-step name must be a non-empty str, not {name!r}")


def _callable_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _close_awaitable(value: Any) -> None:
    close = getattr(value, "close", None)
    if callable(close):
        close()  # no "coroutine was never awaited" warning on top of our error


__all__ = ["ATTEMPT_STRIDE", "STEPS", "StepMismatch", "SubstepCompleted", "TaskContext"]
