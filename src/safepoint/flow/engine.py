"""Flow: a linear pipeline of heavy steps that restarts at the step that failed.

The run itself is written once, as a generator that yields each call to user code (a
loader, a step, a saver) and receives its result; :meth:`Flow.run` drives it with plain
calls and :meth:`Flow.arun` awaits what those calls return, so both share every rule about
where to start, what to record and when to commit.
"""

from __future__ import annotations

import copy
import inspect
import re
import time
import traceback
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from typing import Any, Literal, TypeVar, overload

from safepoint.checkpointer import Checkpointer
from safepoint.errors import CheckpointNotFound, SafepointError, UnsupportedType
from safepoint.flow import drivers
from safepoint.flow.drivers import Call, adrive, drive
from safepoint.flow.log import FlowLog
from safepoint.flow.record import (
    FlowRecord,
    StepChangedWarning,
    StepRecord,
    StepStatus,
    changed_steps,
    check_reused,
    code_hash,
    failure,
    format_when,
)
from safepoint.flow.stepdata import StepData
from safepoint.flow.warn import warn_caller
from safepoint.format import prepare
from safepoint.stateful import capture
from safepoint.store import Location

F = TypeVar("F", bound=Callable[..., Any])
State = dict[str, Any]
Reload = Literal["first", "always"]


@dataclass(frozen=True)
class _Step:
    name: str
    fn: Callable[..., Any]
    load: Callable[..., Any] | None
    save: Callable[..., Any] | None
    code: str

    def async_parts(self) -> list[str]:
        parts = (("function", self.fn), ("loader", self.load), ("saver", self.save))
        return [label for label, f in parts if f is not None and _is_async(f)]


class Flow:
    """A linear pipeline of steps; a rerun starts at the first step that did not complete.

    >>> flow = Flow("prep")
    >>> @flow.step
    ... def clean(state, data):
    ...     state["rows"] = 1000
    ...     return np.arange(1000.0)            # stored by safepoint: data["clean"] later
    >>> @flow.step
    ... def fit(state, data):
    ...     state["mean"] = float(data["clean"].mean())
    >>> flow.run({"source": "a.csv"})

    ``state`` is a small dict committed after every step; ``data`` carries heavy values
    between steps (see :class:`StepData`). The record lives under ``name`` in ``location``
    (``None``: ``$SAFEPOINT_DIR`` or ``./.safepoint``). ``rerun_completed``: a flow whose
    steps all completed starts again from the first step on the next run (else ``run``
    returns its final state). ``rerun_changed``: restart from the first completed step
    whose code changed (else a :class:`StepChangedWarning`). ``clock`` gives wall-clock
    seconds for the step table.
    """

    def __init__(
        self,
        name: str,
        *,
        location: Location = None,
        allow_pickle: bool = False,
        rerun_completed: bool = True,
        rerun_changed: bool = False,
        durable: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        checkpointer = Checkpointer(name, location=location, durable=durable, allow_pickle=allow_pickle)
        self._log = FlowLog(checkpointer)
        self.name = checkpointer.name
        self.rerun_completed = rerun_completed
        self.rerun_changed = rerun_changed
        self._clock = clock
        self._steps: list[_Step] = []
        self._memory: dict[str, Any] = {}  # data produced or loaded in this process
        self._running = False

    # ------------------------------------------------------------- registering

    @overload
    def step(self, fn: F, /) -> F: ...

    @overload
    def step(
        self, *, load: Callable[..., Any] | None = None, save: Callable[..., Any] | None = None,
        name: str | None = None,
    ) -> Callable[[F], F]: ...

    def step(
        self, fn: Callable[..., Any] | None = None, /, *, load: Callable[..., Any] | None = None,
        save: Callable[..., Any] | None = None, name: str | None = None,
    ) -> Any:
        """Register the next step: ``@flow.step`` or ``@flow.step(load=..., save=..., name=...)``.

        The step is called as ``fn(state, data)``. ``load(state)`` returns a dict merged into
        ``data`` before the step (when it is the first step of a run, or always with
        ``reload="always"``); ``save(state, data)`` persists data after the step. The
        function is returned unchanged.
        """
        for label, hook in (("load", load), ("save", save)):
            if hook is not None and not callable(hook):
                raise TypeError(f"flow {self.name!r}: {label}= must be callable, not {hook!r}")

        def register(f: F) -> F:
            if not callable(f):
                raise TypeError(f"flow {self.name!r}: a step must be callable, not {f!r}")
            step_name = name if name is not None else getattr(f, "__name__", "")
            if not isinstance(step_name, str) or not step_name or step_name == "<lambda>":
                raise ValueError(f"flow {self.name!r}: give this step a name: @flow.step(name=...)")
            if step_name in self.steps:
                raise ValueError(
                    f"flow {self.name!r} already has a step named {step_name!r}; step names "
                    "must be unique: pass @flow.step(name=...)")
            self._steps.append(_Step(step_name, f, load, save, code_hash(f)))
            return f

        if fn is None:
            return register
        return register(fn)

    @property
    def steps(self) -> list[str]:
        """The names of the registered steps, in order."""
        return [s.name for s in self._steps]

    # ----------------------------------------------------------------- running

    def run(
        self, initial_state: Mapping[str, Any] | None = None, *, start_at: str | int | None = None,
        reload: Reload = "first",
    ) -> State:
        """Run from the first step that has not completed; return the final state.

        ``initial_state`` (copied, never changed) is what the first step receives when the
        flow starts from its beginning; it is ignored when resuming later in the flow.
        ``start_at`` (a step's name or index) reruns from that step with the state recorded
        before it. ``reload="first"`` calls the loader of the first step that runs only;
        ``"always"`` calls the loader of every step that runs. A step that raises is
        recorded (error, traceback, the state it received) and its exception propagates.
        """
        for step in self._steps:
            parts = step.async_parts()
            if parts:
                raise TypeError(
                    f"flow {self.name!r}: step {step.name!r} is async (its {', '.join(parts)}); "
                    "run the flow with `await flow.arun(...)`")
        return drive(self._execute(initial_state, start_at, reload))

    async def arun(
        self, initial_state: Mapping[str, Any] | None = None, *, start_at: str | int | None = None,
        reload: Reload = "first",
    ) -> State:
        """:meth:`run` for flows with ``async def`` steps, loaders or savers (plain ones work too)."""
        return await adrive(self._execute(initial_state, start_at, reload))

    def _execute(
        self, initial_state: Mapping[str, Any] | None, start_at: str | int | None, reload: Reload,
    ) -> Generator[Call, Any, State]:
        if reload not in ("first", "always"):
            raise ValueError(f"reload must be 'first' or 'always', not {reload!r}")
        if initial_state is not None and not isinstance(initial_state, Mapping):
            raise TypeError(f"initial_state must be a dict, not {type(initial_state).__name__}")
        if not self._steps:
            raise SafepointError(f"flow {self.name!r} has no steps; register them with @flow.step")
        if self._running:
            raise SafepointError(f"flow {self.name!r} is already running in this process")
        self._running = True
        try:
            return (yield from self._run_steps(initial_state, start_at, reload))
        finally:
            self._running = False

    def _run_steps(
        self, initial_state: Mapping[str, Any] | None, start_at: str | int | None, reload: Reload,
    ) -> Generator[Call, Any, State]:
        steps = list(self._steps)
        names = [s.name for s in steps]
        record = self._record()
        start = self._choose_start(record, steps, start_at)
        if start is None:
            if initial_state is not None and not _same_tree(initial_state, record.states[0]):
                warn_caller(
                    f"flow {self.name!r} is complete and rerun_completed=False, so initial_state "
                    "is ignored and the recorded final state returned; pass start_at=0 to run "
                    "with it", UserWarning)
            return copy.deepcopy(record.states[record.frontier])
        first_state = self._first_state(record, start, initial_state)
        if start == 0 and initial_state is not None:
            self._check_storable(first_state)
        discarding = start < record.frontier
        record = record.restarted(start, names, first_state)
        for step in steps[start:]:
            self._memory.pop(step.name, None)
        if discarding:
            self._log.commit(self._log.next_commit(), record, event="start", step=names[start],
                             total=len(steps))
        stored = {s.name: partial(self._log.output, s.output, s.name)
                  for s in record.steps[:start] if s.output is not None}
        data = StepData(self._memory, stored)
        state = copy.deepcopy(first_state)
        for index in range(start, len(steps)):
            load = index == start or reload == "always"
            record = yield from self._run_step(record, index, steps[index], state, data, load=load)
        return state

    def _run_step(
        self, record: FlowRecord, index: int, step: _Step, state: State, data: StepData, *, load: bool,
    ) -> Generator[Call, Any, FlowRecord]:
        started = self._clock()
        try:
            if load and step.load is not None:
                loaded = yield Call(step.load, (state,))
                if loaded is not None:
                    if not isinstance(loaded, Mapping):
                        raise TypeError(
                            f"the loader of step {step.name!r} returned a {type(loaded).__name__}; "
                            "a loader returns a dict of data to merge into `data`, or None")
                    data.update(loaded)
            output = yield Call(step.fn, (state, data))
            if output is not None:
                data[step.name] = output
            if step.save is not None:
                yield Call(step.save, (state, data))
        except GeneratorExit:
            raise
        except BaseException as exc:
            self._record_failure(record, index, step, started, exc)
            raise
        number = self._log.next_commit()
        entry = StepRecord(step.name, "done", step.code, started, self._clock() - started,
                           output=number if output is not None else None)
        done = record.done(index, entry, copy.deepcopy(state))
        try:
            self._log.commit(number, done, event="done", step=step.name, total=len(self._steps),
                             output=output)
        except UnsupportedType as exc:
            error = _unstorable(step.name, exc)
            self._record_failure(record, index, step, started, error)
            raise error from exc
        except Exception as exc:
            self._record_failure(record, index, step, started, exc)
            raise
        return done

    def _record_failure(
        self, record: FlowRecord, index: int, step: _Step, started: float, exc: BaseException,
    ) -> None:
        entry = replace(record.steps[index], name=step.name, code=step.code, started=started,
                        duration=self._clock() - started)
        failed = record.failed(index, failure(entry, exc, _traceback_text(exc)))
        try:
            self._log.commit(self._log.next_commit(), failed, event="failed", step=step.name,
                             total=len(self._steps))
        except Exception as commit_error:
            warn_caller(f"flow {self.name!r}: could not record the failure of step "
                        f"{step.name!r}: {commit_error}", RuntimeWarning)
        if hasattr(exc, "add_note"):
            exc.add_note(f"safepoint: flow {self.name!r} stopped at step {step.name!r}; fix it "
                         "and run the flow again to resume at this step")

    # ------------------------------------------------------ where a run starts

    def _choose_start(self, record: FlowRecord, steps: list[_Step], start_at: str | int | None) -> int | None:
        """The index to run from, or None when the flow is complete and not to be rerun."""
        names, frontier, count = [s.name for s in steps], record.frontier, len(steps)
        if start_at is not None:
            start = self._index(start_at)
            if start > frontier:
                raise SafepointError(
                    f"flow {self.name!r}: cannot start at {names[start]!r}: step {frontier} "
                    f"({names[frontier]!r}) before it has not completed; start at most there")
        elif frontier >= count and all(record.steps[i].name == names[i] for i in range(count)):
            start = 0 if self.rerun_completed else count  # every step done: complete
        else:
            start = min(frontier, count)
        reused = start if start < count else frontier
        check_reused(self.name, record, names, reused)
        changed = changed_steps(record, [s.code for s in steps], reused)
        if changed and self.rerun_changed:
            return changed[0]
        for index in changed:
            warn_caller(
                f"flow {self.name!r}: the code of step {names[index]!r} changed since it completed "
                f"({format_when(record.steps[index].started)}); its recorded result is reused. "
                f"Rerun from it with run(start_at={names[index]!r}), or create the flow with "
                "rerun_changed=True", StepChangedWarning)
        return start if start < count else None

    def _first_state(self, record: FlowRecord, start: int, initial_state: Mapping[str, Any] | None) -> State:
        if start == 0 and initial_state is not None:
            return copy.deepcopy(dict(initial_state))
        if start < len(record.states):
            if initial_state is not None and not _same_tree(initial_state, record.states[0]):
                warn_caller(
                    f"flow {self.name!r}: initial_state differs from the one this flow started "
                    f"with, and is ignored while resuming at step {start}; pass start_at=0 to "
                    "start over with it", UserWarning)
            return record.states[start]
        return {}

    def _check_storable(self, initial: State) -> None:
        """Refuse an initial state that could never be committed, before any step runs."""
        try:
            prepare(capture(initial), allow_pickle=self._log.checkpointer.allow_pickle)
        except UnsupportedType as exc:
            where = exc.tree_path.replace("state", "initial_state", 1)
            raise UnsupportedType(exc.message.replace(exc.tree_path, where, 1), tree_path=where,
                                  type_name=exc.type_name) from exc

    def _index(self, step: str | int) -> int:
        names = self.steps
        if isinstance(step, str):
            if step not in names:
                raise ValueError(f"flow {self.name!r} has no step {step!r}; its steps are {names}")
            return names.index(step)
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"a step is given by its name or index, not {step!r}")
        if not 0 <= step < len(names):
            raise ValueError(f"flow {self.name!r} has {len(names)} steps; no step index {step}")
        return step

    # -------------------------------------------------------------- inspecting

    def _record(self) -> FlowRecord:
        found = self._log.latest()
        return found[1] if found else FlowRecord()

    def status(self) -> list[StepStatus]:
        """One row per step: done / failed / pending, duration, when, error and traceback.

        Rows follow the steps registered on this object (or the recorded ones when none
        are): a step shows its recorded outcome when it sits at the same index by name.
        """
        record = self._record()
        if not self._steps:
            pairs = [(r, None) for r in record.steps]
        else:
            pairs = []
            for index, step in enumerate(self._steps):
                recorded = record.steps[index] if index < len(record.steps) else None
                if recorded is None or recorded.name != step.name:
                    recorded = StepRecord(step.name)
                pairs.append((recorded, step.code))
        return [
            StepStatus(index=i, name=r.name, status=r.status, duration=r.duration,
                       when=None if r.started is None else datetime.fromtimestamp(r.started),
                       error=r.error, traceback=r.traceback,
                       changed=r.status == "done" and code is not None and r.code != code,
                       returned_data=r.output is not None)
            for i, (r, code) in enumerate(pairs)]

    def _recorded_index(self, step: str | int, record: FlowRecord) -> int:
        recorded = [s.name for s in record.steps]
        if isinstance(step, str) and step in recorded:
            return recorded.index(step)
        if isinstance(step, int) and not isinstance(step, bool) and not self._steps:
            if 0 <= step < len(recorded):
                return step
            raise ValueError(f"flow {self.name!r} has {len(recorded)} recorded steps; no step index {step}")
        return self._index(step)

    def state_before(self, step: str | int) -> State:
        """The state ``step`` received the last time it ran (or will receive when resumed)."""
        record = self._record()
        index = self._recorded_index(step, record)
        if index >= len(record.states):
            reached = f"it is at step {record.frontier}" if record.states else "it has not run"
            raise CheckpointNotFound(
                f"flow {self.name!r} has no recorded input for step {step!r}: the flow has not "
                f"reached it ({reached})", name=self.name)
        return record.states[index]

    def output(self, step: str | int) -> Any:
        """The data a completed ``step`` returned (from memory, or read from the store)."""
        record = self._record()
        index = self._recorded_index(step, record)
        name = record.steps[index].name if index < len(record.steps) else self.steps[index]
        if name in self._memory:
            return self._memory[name]
        entry = record.steps[index] if index < len(record.steps) else None
        if entry is None or entry.status != "done" or index >= record.frontier:
            raise CheckpointNotFound(f"step {name!r} of flow {self.name!r} has not completed",
                                     name=self.name)
        if entry.output is None:
            raise CheckpointNotFound(f"step {name!r} of flow {self.name!r} returned no data",
                                     name=self.name)
        return self._log.output(entry.output, name)

    def reset(self) -> None:
        """Forget every recorded step, state and output: the next run starts from scratch."""
        self._log.checkpointer.delete_all()
        self._memory.clear()

    def __repr__(self) -> str:
        return f"Flow({self.name!r}, steps={self.steps}, location={self._log.checkpointer.store.url!r})"


# ------------------------------------------------------------------ helpers

def _is_async(fn: Callable[..., Any]) -> bool:
    target = fn.func if isinstance(fn, partial) else fn
    if inspect.iscoroutinefunction(target):
        return True
    return not inspect.isroutine(target) and inspect.iscoroutinefunction(type(target).__call__)


_RUNNER_FILES = {__file__, drivers.__file__}


def _traceback_text(exc: BaseException) -> str:
    """The traceback of a step's error, without the flow's own frames."""
    summary = traceback.TracebackException.from_exception(exc)
    summary.stack = traceback.StackSummary.from_list(
        [frame for frame in summary.stack if frame.filename not in _RUNNER_FILES])
    return "".join(summary.format())


_RECORDED_STATE = re.compile(r"state\['record'\]\['states'\]\[\d+\]")


def _unstorable(step: str, exc: UnsupportedType) -> UnsupportedType:
    """Restate a storage error in the step's terms: its state, or the data it returned."""
    def local(text: str) -> str:
        text = _RECORDED_STATE.sub("state", text)
        return text.replace("state['output']", f"the data returned by {step!r}")

    return UnsupportedType(
        f"step {step!r} completed but its result cannot be stored, so it is recorded as failed: "
        f"{local(exc.message)}", tree_path=local(exc.tree_path), type_name=exc.type_name)


def _same_tree(a: Any, b: Any) -> bool:
    """Whether two state trees are stored identically (structure, values and bytes)."""
    try:
        left, right = prepare(capture(a), allow_pickle=True), prepare(capture(b), allow_pickle=True)
    except Exception:
        return False
    return left.node == right.node and len(left.blobs) == len(right.blobs) and all(
        x.data == y.data for x, y in zip(left.blobs, right.blobs, strict=True))
