"""Durable steps of an execution: ``run.step(name, fn, *args)`` runs ``fn`` once.

A step is identified by its place: the *scope* it runs in (the top level, or the item in
progress of each enclosing loop) and its ordinal there (the n-th step of that scope), and
by its name. The first time, ``fn`` runs and its outcome is appended to the log before the
step returns: its result (small ones inline, large ones as a checkpoint step) or, when it
raised, its error and traceback. On a resume the recorded result is returned without
calling ``fn``; a recorded name that differs from the step now at that place is a
:class:`~safepoint.errors.StepMismatch`, never silent reuse. A step that failed runs again.
Appending costs the same however many steps came before.

A sub-step's end is a boundary: at the top level the policy may checkpoint the state
there. Inside a loop item the state is committed only at item boundaries, so that an item
is never half saved; its steps are durable all the same.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from safepoint.errors import (
    PACKAGE_DIR,
    SafepointError,
    StepMismatch,
    SubstepCompleted,
    UnsupportedType,
    logger,
)
from safepoint.run.record import Record

P = ParamSpec("P")
T = TypeVar("T")

INLINE_RESULT = 16 << 10
"""A step result whose encoding is at most this many bytes (and holds no large array) is
kept inside its record; a larger one is written once, as a checkpoint step."""
_TRACEBACK_LIMIT = 20_000


def user_traceback(exc: BaseException) -> str:
    """The traceback of an error raised by user code, without safepoint's own frames."""
    summary = traceback.TracebackException.from_exception(exc)
    summary.stack = traceback.StackSummary.from_list(
        [frame for frame in summary.stack if not frame.filename.startswith(PACKAGE_DIR)])
    return "".join(summary.format())[-_TRACEBACK_LIMIT:]


class DurableSteps:
    """The durable steps, blocks and progress of a :class:`~safepoint.run.run.Run`."""

    # provided by Run
    name: str
    kind: str
    attempt: int
    allow_pickle: bool
    _log: Any
    _committer: Any
    _loops: list[Any]
    _policy: Any
    _items_since: int
    lease: Any
    _tail: Any

    if TYPE_CHECKING:
        def _require_open(self, what: str) -> None: ...
        def _tick(self, loop: Any, *, substep: bool = False) -> Any: ...
        def _commit(self, *, wait: bool = False, **how: Any) -> None: ...
        def _scope(self) -> str: ...
        def _frames(self, position: int | None) -> list[Any]: ...
        def _live_steps(self, frames: list[Any]) -> list[Record]: ...
        def _carried(self) -> list[Record]: ...
        def _extra(self) -> dict[str, Any]: ...

    def _init_steps(self) -> None:
        self._steps: dict[str, Record] = {}
        self._step_counts: dict[str, int] = {}
        self._step_commits = 0
        self._blocks: list[str] = []
        self._current: str | None = None
        self._progress_value: float | None = None
        self._message: str | None = None

    def _now(self) -> float:
        """Wall-clock time for the step table (flows inject a clock)."""
        return time.time()

    # ------------------------------------------------------------------ steps

    def step(self, name: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` once and record its outcome; on resume, return the
        recorded result without calling ``fn`` (see the module's documentation)."""
        key, recorded = self._enter_step(name, fn)
        if recorded is not None:
            return self._recorded_result(recorded)
        started = self._now()
        with self._running(name):
            try:
                result = fn(*args, **kwargs)
                if inspect.isawaitable(result):
                    _close_awaitable(result)
                    raise TypeError(f"sub-step {name!r}: {_callable_name(fn)} returned an "
                                    f"awaitable; in an async task use `await ctx.astep({name!r}, ...)`")
            except Exception as exc:
                self._record_step(key, name, started, error=exc)
                raise
            self._record_step(key, name, started, result=result, sync=False)
        self._after_substep()  # durable on return: with the state's commit, or alone
        return result

    async def astep(self, name: str, fn: Callable[P, Awaitable[T] | T], /, *args: P.args,
                    **kwargs: P.kwargs) -> T:
        """:meth:`step` for async code: ``fn`` may be a coroutine function or a plain one."""
        key, recorded = self._enter_step(name, fn)
        if recorded is not None:
            return self._recorded_result(recorded)
        started = self._now()
        with self._running(name):
            try:
                result = fn(*args, **kwargs)
                if inspect.isawaitable(result):
                    result = await result
            except Exception as exc:
                self._record_step(key, name, started, error=exc)
                raise
            self._record_step(key, name, started, result=result, sync=False)
        self._after_substep()
        return result

    def _enter_step(self, name: str, fn: Callable[..., Any]) -> tuple[str, Record | None]:
        self._require_open("a durable step")
        self.lease.check()  # a fenced writer runs no further step (its effects would repeat)
        _check_step_name(name)
        if not callable(fn):
            raise TypeError(f"step({name!r}, fn, ...) needs a callable fn, not {fn!r}")
        scope = self._scope()
        ordinal = self._step_counts.get(scope, 0)
        self._step_counts[scope] = ordinal + 1
        key = f"{scope}#{ordinal}"
        recorded = self._steps.get(key)
        if recorded is None:
            return key, None
        if recorded.name != name:
            where = f"sub-step {ordinal}" + (f" of item {scope}" if scope else "")
            raise StepMismatch(
                f"{self.kind} {self.name!r}: {where} was recorded as {recorded.name!r}, but the "
                f"code now calls {name!r} there; it changed since the {self.kind} started. "
                f"Restore the old order, or delete it (`safepoint rm {self.name}`) to start over",
                name=self.name, index=ordinal, recorded=recorded.name, current=name)
        return key, recorded if recorded.status == "done" else None

    def _recorded_result(self, recorded: Record) -> Any:
        return self._log.load(recorded.result, allow_pickle=self.allow_pickle)

    def _record_step(self, key: str, name: str, started: float, *, result: Any = None,
                     error: BaseException | None = None, extra: dict[str, Any] | None = None,
                     output: Any = None, sync: bool = True) -> Record:
        """Append the outcome of a step to the log, durably before going on (``output``:
        data kept beside the result, read only when asked for: a flow step's return).
        ``sync=False``: the caller goes on to :meth:`_after_substep`, which makes it durable
        (with the state commit that follows, when the policy asks for one: one fdatasync)."""
        record = Record("step", attempt=self.attempt, time=time.time(), key=key, name=name,
                        status="failed" if error is not None else "done", started=started,
                        duration=self._now() - started,
                        extra={**self._extra(), **(extra or {})})
        self._committer.flush()  # the log is written in order
        if error is not None:
            record.error = f"{type(error).__name__}: {error}"
            record.traceback = user_traceback(error)
        else:
            try:
                record.result = self._log.tree(result, allow_pickle=self.allow_pickle,
                                               inline_limit=INLINE_RESULT)
            except UnsupportedType as exc:
                raise exc.within("result", f"{self.kind} {self.name!r}: sub-step {name!r} ran, "
                                 "but its result cannot be recorded (a resume runs it again)"
                                 ) from exc
            if output is not None:
                record.tree = self._log.tree(output, allow_pickle=self.allow_pickle,
                                             inline_limit=INLINE_RESULT)
        previous = self._steps.get(key)
        live = None if self._log.started else self._carried()
        self._log.append(record, live, sync=sync)
        self._step_commits += 1
        self._steps[key] = record
        logger(self.kind).debug("safepoint: %s %r recorded sub-step %r (%s)", self.kind, self.name,
                                name, record.status)
        if previous is not None:
            self._log.release(previous)
        return record

    @contextlib.contextmanager
    def _running(self, name: str) -> Iterator[None]:
        if self._current is not None:
            raise SafepointError(
                f"{self.kind} {self.name!r}: sub-step {name!r} started inside sub-step "
                f"{self._current!r}; sub-steps do not nest, call them one after another")
        self._current = name
        try:
            yield
        finally:
            self._current = None

    # ------------------------------------------------------------------ blocks

    @contextlib.contextmanager
    def substep(self, name: str) -> Iterator[None]:
        """A named block recorded as completed when it exits without an exception.

        Python always runs the body of a ``with`` block, so guard it::

            if not ctx.completed("train"):
                with ctx.substep("train"):
                    ctx.results["model"] = train(rows)

        Entering a block that already completed raises :class:`SubstepCompleted` rather
        than running it twice. Block names are unique within an execution; a completed
        block is recorded with the next checkpoint of the state.
        """
        _check_step_name(name)
        if name in self._blocks:
            raise SubstepCompleted(
                f"{self.kind} {self.name!r}: sub-step {name!r} already completed; guard the "
                f"block with `if not ctx.completed({name!r}):` so that a resume skips it",
                name=self.name, substep=name)
        with self._running(name):
            yield
            self._blocks.append(name)
        self._after_substep()

    def completed(self, name: str) -> bool:
        """True when a step or a block of this name has completed."""
        return name in self._blocks or any(
            r.name == name and r.status == "done" for r in self._steps.values())

    # ------------------------------------------------------------------ progress

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Record overall progress in [0, 1] (shown by ``safepoint ls``) and a message."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise ValueError(f"progress must be a number in [0, 1], not {fraction!r}")
        self._progress_value = float(fraction)
        if message is not None:
            self._message = str(message)

    def _after_substep(self) -> None:
        """A sub-step ended: a boundary where, at the top level, the policy may commit."""
        self._items_since += 1
        if not self._loops and self._policy(self._tick(None, substep=True)):
            self._commit(wait=True)  # (inside an item, the state commits at its boundary)
        self._log.sync()  # the step record, if the commit did not sync it

    def maybe_checkpoint(self) -> bool:
        """A boundary: checkpoint if the policy says so; returns whether it did. In a loop
        body, call it where the item is done: when it commits, the item counts as done."""
        self._require_open("maybe_checkpoint()")
        if not self._loops:
            self._items_since += 1
            if not self._policy(self._tick(None)):
                return False
            self._commit(wait=True)
            return True
        loop = self._loops[-1]
        through = loop.through_current()
        since = self._items_since
        self._items_since = since + through - loop.counted
        if not self._policy(self._tick(loop)):
            self._items_since = since
            return False
        self._tail = None  # an inner loop that ended in the item counted done is past
        self._commit(wait=True, position=through)
        loop.credit(through)
        return True


def _check_step_name(name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"a sub-step name must be a non-empty str, not {name!r}")


def _callable_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _close_awaitable(value: Any) -> None:
    close = getattr(value, "close", None)
    if callable(close):
        close()  # no "coroutine was never awaited" warning on top of our error


__all__ = ["INLINE_RESULT", "DurableSteps", "user_traceback"]
