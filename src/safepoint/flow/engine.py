"""Flow: a linear pipeline of heavy steps that restarts at the step that failed.

A flow is a task whose steps are declared up front: each run is an execution of the core
(:class:`FlowRun`, holding the name's lease), and each step's outcome is one durable step
record: its result is the state after the step, its ``tree`` the data it returned, or its
error, traceback and duration when it failed. The state a step received is the result of
the step before it (or the initial state). ``start_at`` discards the records from a step on.

The run itself is written once, as a generator that yields each call to user code (a
loader, a step, a saver) and receives its result; :meth:`Flow.run` drives it with plain
calls and :meth:`Flow.arun` awaits what those calls return, so both share every rule about
where to start, what to record and when to commit.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, Literal, TypeVar, overload

from safepoint.checkpointer import remove_name, split_location
from safepoint.errors import (
    CheckpointNotFound,
    CorruptCheckpoint,
    SafepointError,
    UnsupportedType,
    async_user_frames,
    logger,
    user_frames,
    warn_caller,
)
from safepoint.flow.drivers import Call, adrive, drive
from safepoint.flow.record import (
    FlowView,
    StepChangedWarning,
    StepStatus,
    changed_steps,
    check_reused,
    code_hash,
    format_when,
    step_index,
)
from safepoint.flow.stepdata import StepData
from safepoint.format import prepare
from safepoint.lease import Lease
from safepoint.policy import Policy, after_substep
from safepoint.run import Run
from safepoint.run.log import Replay, read_log
from safepoint.run.record import Record
from safepoint.stateful import capture
from safepoint.store import Location, check_name, open_store

F = TypeVar("F", bound=Callable[..., Any])
log = logger("flow")
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


def _view(replay: Replay, log: Any) -> FlowView:
    steps: dict[int, Record] = {}
    for record in replay.steps().values():
        index = step_index(record)
        if index is not None:
            steps[index] = record
    state = replay.state
    initial = None
    names: tuple[str, ...] = ()
    if state is not None:
        names = tuple(state.extra.get("names") or ())
        if state.tree is not None and log is not None:
            tree = log.load(state.tree, allow_pickle=True)
            if isinstance(tree, dict) and isinstance(tree.get("initial"), dict):
                initial = tree["initial"]
    return FlowView(steps, initial, names)


class FlowRun(Run):
    """One run of a flow: the execution that records its steps."""

    kind = "flow"

    def __init__(self, flow: Flow) -> None:
        super().__init__(flow.name, location=flow.location, policy=after_substep(),
                         keep_completed=True, progress=False, commit="sync",
                         durable=flow.durable, clock=time.monotonic)
        self.flow = flow
        self.allow_pickle = flow.allow_pickle
        self.initial: State = {}
        self.current: State = {}
        self.view = FlowView({})

    def default_policy(self) -> Policy:
        return after_substep()

    def _replay(self, replay: Replay) -> None:
        super()._replay(replay)
        self.view = _view(replay, self._log)
        self.initial = self.view.initial or {}

    def _load_tree(self, tree: dict[str, Any]) -> None:
        state = tree.get("state")
        self.current = state if isinstance(state, dict) else {}

    def _saved_tree(self) -> Any:
        return {"initial": capture(self.initial), "state": capture(self.current)}

    def _extra(self) -> dict[str, Any]:
        names = [s.name for s in self.flow._steps]
        done = _frontier(self._steps)
        return {"kind": "flow", "names": names, "done": done, "total": len(names)}

    def _now(self) -> float:
        return self.flow._clock()

    def _stopped(self, exc: BaseException) -> None:
        """A step raised: its failure is recorded and noted by the flow itself."""
        assert self._committer is not None
        if not self._interrupts.stopped_at_once:
            self._committer.flush()

    def discard_from(self, index: int) -> None:
        """Forget the steps from ``index`` on (a rerun from there)."""
        assert self._log is not None
        self._committer.flush()  # type: ignore[union-attr]
        reset = Record("reset", attempt=self.attempt, time=time.time(), key=f"#{index}",
                       extra=self._extra())
        dropped = [r for k, r in self._steps.items() if (step_index(r) or 0) >= index and k.startswith("#")]
        for record in dropped:
            del self._steps[record.key]
        self._log.append(reset, self._carried())
        for record in dropped:
            self._log.release(record)
        self.view = FlowView({i: r for i, r in self.view.steps.items() if i < index},
                             self.view.initial, self.view.names)

    def _finish(self) -> None:
        """Every step ran: commit, and keep the record (a later run decides whether to
        start over: a flow's status and outputs stay readable until then)."""
        assert self._committer is not None
        self._committer.flush()
        self._progress_value = 1.0
        self._commit(complete=True, wait=True)
        self.complete = True


def _frontier(steps: dict[str, Record]) -> int:
    count = 0
    while steps.get(f"#{count}") is not None and steps[f"#{count}"].status == "done":
        count += 1
    return count


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
    (``None``: ``$SAFEPOINT_DIR`` or ``./.safepoint``). ``keep_completed``: a flow whose
    steps all completed returns its final state from ``run`` and runs nothing (by default
    it starts again from its first step on the next run). ``rerun_changed``: restart from
    the first completed step whose code changed (else a :class:`StepChangedWarning`).
    ``clock`` gives wall-clock seconds for the step table.
    """

    def __init__(
        self,
        name: str,
        *,
        location: Location = None,
        allow_pickle: bool = False,
        keep_completed: bool = False,
        rerun_changed: bool = False,
        durable: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        name, location = split_location(name, location)
        self.name = check_name(name)
        self.location = self._location = location
        self.allow_pickle = allow_pickle
        self.keep_completed = keep_completed
        self.rerun_changed = rerun_changed
        self.durable = durable
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

    def step(  # type: ignore[misc]  # mypy misreads the keyword-only overload
        self, fn: Callable[..., Any] | None = None, /, *, load: Callable[..., Any] | None = None,
        save: Callable[..., Any] | None = None, name: str | None = None,
    ) -> Any:
        """Register the next step: ``@flow.step`` or ``@flow.step(load=..., save=..., name=...)``.

        The step is called as ``fn(state, data)``. ``load(state)`` returns a dict merged into
        ``data`` before the step (when it is the first step of a run, or always with
        ``reload="always"``); ``save(state, data)`` persists data after the step. The
        function is returned unchanged. Registering a step under a name the flow already
        has replaces that step in place (a notebook cell defining a fixed step again).
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
            new = _Step(step_name, f, load, save, code_hash(f))
            if step_name in self.steps:
                self._steps[self.steps.index(step_name)] = new
                self._memory.pop(step_name, None)
            else:
                self._steps.append(new)
            return f

        if fn is None:
            return register
        return register(fn)

    @property
    def steps(self) -> list[str]:
        """The names of the registered steps, in order."""
        return [s.name for s in self._steps]

    # ----------------------------------------------------------------- running

    @user_frames
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

    @async_user_frames
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
            with FlowRun(self) as run:
                return (yield from self._run_steps(run, initial_state, start_at, reload))
        finally:
            self._running = False

    def _run_steps(
        self, run: FlowRun, initial_state: Mapping[str, Any] | None, start_at: str | int | None,
        reload: Reload,
    ) -> Generator[Call, Any, State]:
        steps = list(self._steps)
        view = run.view
        start = self._choose_start(view, steps, start_at)
        if start is None:
            final = self._state_after(run, view, len(steps) - 1)
            if initial_state is not None and not _same_tree(initial_state, view.initial or {}):
                warn_caller(
                    f"flow {self.name!r} is complete and keep_completed=True, so initial_state "
                    "is ignored and the recorded final state returned; pass start_at=0 to run "
                    "with it", UserWarning, log=log)
            return copy.deepcopy(final)
        if start == 0 and initial_state is not None:
            self._check_storable(initial_state)
        first_state = self._first_state(run, view, start, initial_state)
        if any(i >= start for i in view.steps):
            run.discard_from(start)
        if start == 0:
            run.initial = copy.deepcopy(first_state)
        run.current = copy.deepcopy(first_state)
        run.progress(start / len(steps))
        run._commit(wait=True)  # where this run starts, and with what
        if start > 0:
            log.info("safepoint: flow %r resumes at step %r (%d of %d completed before)",
                     self.name, steps[start].name, start, len(steps))
        for step in steps[start:]:
            self._memory.pop(step.name, None)
        stored = {s.name: partial(self._stored_output, run, view.steps[i], s.name)
                  for i, s in enumerate(steps[:start]) if view.steps[i].tree is not None}
        data = StepData(self._memory, stored)
        state = copy.deepcopy(first_state)
        for index in range(start, len(steps)):
            load = index == start or reload == "always"
            yield from self._run_step(run, index, steps[index], state, data, load=load)
        return state

    def _stored_output(self, run: FlowRun, record: Record, name: str) -> Any:
        try:
            return run._log.load(record.tree, allow_pickle=self.allow_pickle)  # type: ignore[union-attr]
        except (CorruptCheckpoint, CheckpointNotFound) as exc:
            raise type(exc)(
                f"the data returned by step {name!r} of flow {self.name!r} cannot be read: {exc}; "
                f"rerun that step with run(start_at={name!r})", **exc.fields()) from exc

    def _run_step(
        self, run: FlowRun, index: int, step: _Step, state: State, data: StepData, *, load: bool,
    ) -> Generator[Call, Any, None]:
        started = self._clock()
        key = f"#{index}"
        extra = {"code": step.code}
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
            self._record_failure(run, key, step, started, exc)
            raise
        after = capture(state)
        returned = capture(output) if output is not None else None
        try:
            prepare(after, allow_pickle=self.allow_pickle)
            if returned is not None:
                try:
                    prepare(returned, allow_pickle=self.allow_pickle)
                except UnsupportedType as exc:
                    raise _unstorable(step.name, exc, output=True) from exc
        except UnsupportedType as exc:
            error = exc if exc.message.startswith("step ") else _unstorable(step.name, exc)
            self._record_failure(run, key, step, started, error)
            raise error from exc
        try:
            run._record_step(key, step.name, started, result=copy.deepcopy(after),
                             output=returned, extra=extra, sync=False)
        except Exception as exc:
            self._record_failure(run, key, step, started, exc)
            raise
        run.current = copy.deepcopy(state)
        run.progress((index + 1) / len(self._steps))
        run._after_substep()

    def _record_failure(self, run: FlowRun, key: str, step: _Step, started: float,
                        exc: BaseException) -> None:
        try:
            run._record_step(key, step.name, started, error=exc, extra={"code": step.code})
        except Exception as commit_error:
            warn_caller(f"flow {self.name!r}: could not record the failure of step "
                        f"{step.name!r}: {commit_error}", RuntimeWarning, log=log)
        note = (f"safepoint: flow {self.name!r} stopped at step {step.name!r}; fix it and run "
                "the flow again to resume at this step (the state it received: "
                f".state_before({step.name!r}))")
        exc.add_note(note)

    # ------------------------------------------------------ where a run starts

    def _choose_start(self, view: FlowView, steps: list[_Step], start_at: str | int | None) -> int | None:
        """The index to run from, or None when the flow is complete and kept so."""
        names, frontier, count = [s.name for s in steps], view.frontier, len(steps)
        if start_at is not None:
            start = self._index(start_at)
            if start > frontier:
                raise SafepointError(
                    f"flow {self.name!r}: cannot start at {names[start]!r}: step {frontier} "
                    f"({names[frontier]!r}) before it has not completed; start at most there")
        elif frontier >= count and all(view.steps[i].name == names[i] for i in range(count)):
            start = count if self.keep_completed else 0  # every step done: complete
        else:
            start = min(frontier, count)
        reused = start if start < count else frontier
        check_reused(self.name, view, names, reused)
        changed = changed_steps(view, [s.code for s in steps], reused)
        if changed and self.rerun_changed:
            return changed[0]
        for index in changed:
            warn_caller(
                f"flow {self.name!r}: the code of step {names[index]!r} changed since it completed "
                f"({format_when(view.steps[index].started)}); its recorded result is reused. "
                f"Rerun from it with run(start_at={names[index]!r}), or create the flow with "
                "rerun_changed=True", StepChangedWarning, log=log)
        return start if start < count else None

    def _state_after(self, run: FlowRun, view: FlowView, index: int) -> State:
        if index < 0:
            return dict(view.initial or {})
        record = view.steps[index]
        value = run._log.load(record.result, allow_pickle=self.allow_pickle)  # type: ignore[union-attr]
        return value if isinstance(value, dict) else {}

    def _first_state(self, run: FlowRun, view: FlowView, start: int,
                     initial_state: Mapping[str, Any] | None) -> State:
        if start == 0 and initial_state is not None:
            return copy.deepcopy(dict(initial_state))
        if start == 0:
            return dict(view.initial or {})
        if initial_state is not None and not _same_tree(initial_state, view.initial or {}):
            warn_caller(
                f"flow {self.name!r}: initial_state differs from the one this flow started "
                f"with, and is ignored while resuming at step {start}; pass start_at=0 to "
                "start over with it", UserWarning, log=log)
        return self._state_after(run, view, start - 1)

    def _check_storable(self, initial: Mapping[str, Any]) -> None:
        """Refuse an initial state that could never be committed, before any step runs."""
        try:
            prepare(capture(dict(initial)), allow_pickle=self.allow_pickle)
        except UnsupportedType as exc:
            raise exc.within("initial_state") from exc

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

    def _read(self) -> tuple[FlowView, Any]:
        store = open_store(self._location)
        replay = read_log(store, self.name)
        state = replay.state
        if state is not None and state.extra.get("kind") != "flow":
            from safepoint.errors import KindMismatch

            raise KindMismatch(f"{self.name!r} in {store.url} is a {state.extra.get('kind', 'run')}, "
                               f"not a flow", name=self.name, found=str(state.extra.get("kind")),
                               wanted="flow")
        from safepoint.checkpointer import Checkpointer

        loader = _Loader(Checkpointer(self.name, location=store, allow_pickle=self.allow_pickle))
        return _view(replay, loader), loader

    def status(self) -> list[StepStatus]:
        """One row per step: done / failed / pending, duration, when, error and traceback.

        Rows follow the steps registered on this object (or the recorded ones when none
        are): a step shows its recorded outcome when it sits at the same index by name.
        """
        view, _ = self._read()
        if not self._steps:
            count = max([len(view.names), *(i + 1 for i in view.steps)])
            rows: list[tuple[int, Record | None, str | None]] = [
                (i, view.steps.get(i), None) for i in range(count)]
            names = [view.names[i] if i < len(view.names) else view.steps[i].name
                     for i in range(count)]
        else:
            names = self.steps
            rows = [(i, view.steps.get(i), s.code) for i, s in enumerate(self._steps)]
        result = []
        for index, (i, record, code) in enumerate(rows):
            name = names[index]
            if record is None or record.name != name:
                result.append(StepStatus(index=i, name=name, status="pending"))
                continue
            result.append(StepStatus(
                index=i, name=name, status=record.status, duration=record.duration,
                when=None if record.started is None else datetime.fromtimestamp(record.started),
                error=record.error, traceback=record.traceback,
                changed=record.status == "done" and code is not None and record.extra.get("code") != code,
                returned_data=record.tree is not None))
        return result

    def _recorded_index(self, step: str | int, view: FlowView) -> int:
        recorded = {r.name: i for i, r in view.steps.items()}
        if isinstance(step, str) and step in recorded:
            return recorded[step]
        if isinstance(step, str) and not self._steps and step in view.names:
            return view.names.index(step)
        if isinstance(step, int) and not isinstance(step, bool) and not self._steps:
            if step in view.steps:
                return step
            raise ValueError(f"flow {self.name!r} has {len(view.steps)} recorded steps; no step index {step}")
        return self._index(step)

    def state_before(self, step: str | int) -> State:
        """The state ``step`` received the last time it ran (or will receive when resumed)."""
        view, loader = self._read()
        index = self._recorded_index(step, view)
        if index > view.frontier or (index > 0 and index - 1 not in view.steps) or view.initial is None:
            reached = f"it is at step {view.frontier}" if view.initial is not None else "it has not run"
            raise CheckpointNotFound(
                f"flow {self.name!r} has no recorded input for step {step!r}: the flow has not "
                f"reached it ({reached})", name=self.name)
        if index == 0:
            return dict(view.initial)
        value = loader.load(view.steps[index - 1].result, allow_pickle=self.allow_pickle)
        return value if isinstance(value, dict) else {}

    def output(self, step: str | int) -> Any:
        """The data a completed ``step`` returned (from memory, or read from the store)."""
        view, loader = self._read()
        index = self._recorded_index(step, view)
        record = view.steps.get(index)
        name = record.name if record is not None else self.steps[index]
        if name in self._memory:
            return self._memory[name]
        if record is None or record.status != "done" or index >= view.frontier:
            raise CheckpointNotFound(f"step {name!r} of flow {self.name!r} has not completed",
                                     name=self.name)
        if record.tree is None:
            raise CheckpointNotFound(f"step {name!r} of flow {self.name!r} returned no data",
                                     name=self.name)
        return loader.load(record.tree, allow_pickle=self.allow_pickle)

    def reset(self) -> None:
        """Forget every recorded step, state and output: the next run starts from scratch."""
        store = open_store(self._location)
        lease = Lease.acquire(store, self.name, kind="flow", durable=self.durable)
        try:
            lease.check(fresh=True)
            remove_name(store, self.name)
        finally:
            lease.forget()
        self._memory.clear()

    def __repr__(self) -> str:
        where = open_store(self._location).url
        return f"Flow({self.name!r}, steps={self.steps}, location={where!r})"


class _Loader:
    """Reads what a flow's records refer to, without taking its lease."""

    def __init__(self, checkpointer: Any) -> None:
        self.checkpointer = checkpointer

    def load(self, tree: dict[str, Any] | None, *, allow_pickle: bool = False) -> Any:
        from safepoint.format.tree import decode_inline

        if tree is None:
            return None
        if "node" in tree:
            return decode_inline(tree["node"])
        return self.checkpointer.restore(tree["checkpoint"], allow_pickle=allow_pickle).state


# ------------------------------------------------------------------ helpers

def _is_async(fn: Callable[..., Any]) -> bool:
    target = fn.func if isinstance(fn, partial) else fn
    if inspect.iscoroutinefunction(target):
        return True
    return not inspect.isroutine(target) and inspect.iscoroutinefunction(type(target).__call__)


def _unstorable(step: str, exc: UnsupportedType, *, output: bool = False) -> UnsupportedType:
    """Restate a storage error in the step's terms: its state, or the data it returned
    (``data['fit']`` to the steps after it)."""
    return exc.within(f"data[{step!r}]" if output else "state",
                      f"step {step!r} completed but its result cannot be stored, so it is "
                      "recorded as failed")


def _same_tree(a: Any, b: Any) -> bool:
    """Whether two state trees are stored identically (structure, values and bytes)."""
    try:
        left, right = prepare(capture(a), allow_pickle=True), prepare(capture(b), allow_pickle=True)
    except Exception:
        return False
    return left.node == right.node and len(left.blobs) == len(right.blobs) and all(
        x.data == y.data for x, y in zip(left.blobs, right.blobs, strict=True))
