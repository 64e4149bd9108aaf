"""The execution core: a named resumable execution, ``with safepoint.resume("job") as run:``.

A run takes its name's lease (one writer per name), restores ``run.state`` from its newest
record, hands out items through positioned loops (``run.range``, ``run.iterate``,
``run.lines`` and their async forms, nestable) and checkpoints at item boundaries when its
policy says so: the state after an item and the position past it are one commit. Durable
steps (:mod:`safepoint.run.steps`) are recorded as they complete. Tasks and flows are runs
with more on top. See ``docs/runs.md``.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import IO, Any, Literal, TypeVar

from safepoint.checkpointer import CorruptCheckpointWarning, committed_steps, split_location
from safepoint.committer import Committer
from safepoint.errors import KindMismatch, SafepointError, StateMismatch, logger, warn_caller
from safepoint.format import prepare
from safepoint.lease import Lease
from safepoint.policy import PolicyLike, Tick, as_policy, default_policy
from safepoint.run import aio, loops
from safepoint.run.lines import LineSource, OnChange
from safepoint.run.log import Replay, RunLog
from safepoint.run.loops import Loop
from safepoint.run.output import OutputMode, Outputs
from safepoint.run.progress import REFRESH, ProgressBar
from safepoint.run.record import Frame, Record, reachable
from safepoint.run.steps import DurableSteps
from safepoint.signals import STOP_SIGNALS, SegmentWatchdog, SignalGuard, stop_now
from safepoint.store import Location, Store, check_name, open_store

_R = TypeVar("_R", bound="Run")

CommitMode = Literal["sync", "async"]
WATCHDOG_SECONDS = 0.1
"""A segment running this much longer than planned is cut, so that a time policy is asked
again even after items suddenly became slow."""
_INT64 = range(-(2**63), 2**63)
_sync = getattr(os, "fdatasync", os.fsync)


def _flat_node(state: Any) -> dict[str, Any] | None:
    """What :func:`~safepoint.format.prepare` encodes a flat dict of plain JSON values to
    (the values themselves), found without its encoder: the common state of a loop
    (counters, totals) is committed thousands of times a second. None for anything else."""
    if type(state) is not dict:
        return None
    for key, value in state.items():
        kind = type(value)
        if type(key) is not str or key == "$":
            return None
        if kind is int:
            if value not in _INT64:
                return None
        elif kind is float:
            if value != value or value in (math.inf, -math.inf):
                return None
        elif not (kind is str or kind is bool or value is None):
            return None
    return dict(state)


def resume(
    name: str,
    *,
    location: Location = None,
    policy: PolicyLike | None = None,
    keep_completed: bool = False,
    progress: bool | None = None,
    commit: CommitMode = "sync",
    durable: bool = True,
    takeover: bool = False,
    wait: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
) -> Run:
    """Open (or create) the run ``name``; use it as ``with`` or ``async with``.

    ``location``: a directory, an fsspec URL or a Store (default ``$SAFEPOINT_DIR`` or
    ``./.safepoint``). ``policy``: when to checkpoint (default: every 0.5 s, plus once when
    a loop ends). ``keep_completed``: keep the final checkpoint of a finished run, so that a
    new ``resume`` sees ``run.complete``; by default a finished run's checkpoints are removed
    and the next run starts fresh. ``progress``: a progress bar (``None``: when the length
    is known and stdout is a terminal). ``commit="async"``: write commits on a background
    thread. ``durable=False``: no fsync (faster; a power loss may lose recent commits).
    ``takeover``: take the name from a live writer (it is fenced); ``wait``: seconds to wait
    for a live writer to finish instead of refusing at once. ``clock`` is for tests.
    """
    return Run(name, location=location, policy=policy, keep_completed=keep_completed,
               progress=progress, commit=commit, durable=durable, takeover=takeover, wait=wait,
               clock=clock)


class Run(DurableSteps):
    """A resumable execution; made by :func:`resume`, used inside its ``with`` block."""

    kind = "run"
    """What this execution is, recorded with it (a task, a flow)."""
    allow_pickle = False

    def __init__(
        self,
        name: str,
        *,
        location: Location,
        policy: PolicyLike | None,
        keep_completed: bool,
        progress: bool | None,
        commit: CommitMode,
        durable: bool,
        clock: Callable[[], float],
        takeover: bool = False,
        wait: float = 0.0,
    ) -> None:
        name, location = split_location(name, location)
        self.name = check_name(name)
        if commit not in ("sync", "async"):
            raise ValueError(f"commit must be 'sync' or 'async', not {commit!r}")
        self._location = location
        self._policy = as_policy(policy) if policy is not None else self.default_policy()
        self._keep_completed, self._progress, self._commit_mode = keep_completed, progress, commit
        self._durable, self._clock = durable, clock
        self._takeover, self._wait = takeover, wait
        self.state: dict[str, Any] = {}
        """The run's state: restored from the last checkpoint, or ``{}``; mutate it freely."""
        self.resumed = False
        """This run continues an earlier one."""
        self.attempt = 1
        """1 for the first writer of the name, one more for each after it (or
        ``$SAFEPOINT_ATTEMPT`` if higher)."""
        self.complete = False
        """The run had already finished (only with ``keep_completed=True``)."""
        self._entered = self._closed = False
        self._loops: list[Loop] = []
        self._loop_counts: dict[str, int] = {}
        self._recorded: list[Frame] = []  # the frames of the checkpoint being resumed
        self._tail: Frame | None = None  # the loop that finished last, where none is active
        self._items_since = 0
        self._bar: ProgressBar | None = None
        self._committed: Record | None = None
        self._store: Store | None = None
        self.lease: Lease | None = None
        """This writer's lease on the name (its generation is :attr:`attempt`)."""
        self._log: RunLog | None = None
        self._committer: Committer | None = None
        self._outputs: Outputs | None = None
        self._interrupts = SignalGuard(self._defer, STOP_SIGNALS)
        self._watchdog = (SegmentWatchdog(self._segment_overdue, self._cut_segment, WATCHDOG_SECONDS,
                                          self._policy_due_at if clock is time.monotonic else None)
                          if self._policy.uses_clock else None)
        self._needs_fraction = self._policy.uses_fraction
        self._init_steps()

    def default_policy(self) -> Any:
        return default_policy()

    # --------------------------------------------------------------- lifecycle

    def __enter__(self: _R) -> _R:
        if self._entered:
            raise SafepointError("a run is entered once; call safepoint.resume() again")
        self._entered = True
        try:
            self._open()
        except BaseException:
            self._closed = True
            self._release(discard=True, failed=True)
            raise
        return self

    def _open(self) -> None:
        """Take the lease, read the newest records and get ready to commit."""
        store = self._store = open_store(self._location)
        self.lease = Lease.acquire(store, self.name, kind=self.kind, takeover=self._takeover,
                                   wait=self._wait, durable=self._durable)
        self._log = RunLog(store, self.name, self.lease, durable=self._durable,
                           allow_pickle=self.allow_pickle)
        replay = self._log.open()
        if replay.damage:
            warn_caller(
                f"{self.kind} {self.name!r} in {store.url}: skipped damaged records "
                f"({'; '.join(replay.damage)}); resuming from the newest intact one. "
                f"`safepoint verify {self.name}` shows the damage", CorruptCheckpointWarning,
                log=logger(self.kind))
        if not replay.records and committed_steps(store, self.name):
            raise KindMismatch(
                f"{self.name!r} in {store.url} holds checkpoints that are not a {self.kind}'s "
                f"(plain Checkpointer steps); pick another name, or `safepoint rm {self.name}` "
                "to delete them", name=self.name, found="checkpoint", wanted=self.kind)
        state = replay.state
        if state is not None:
            found = state.extra.get("kind", "run")
            if found != self.kind:
                raise KindMismatch(
                    f"{self.name!r} in {store.url} is a {found}, not a {self.kind}; pick another "
                    f"name, or `safepoint rm {self.name}` to delete it", name=self.name,
                    found=found, wanted=self.kind)
            if state.complete and not self._keep_completed:
                self._log.reset()  # a finished execution: start over
                replay = Replay()
                state = None
        supervisor = os.environ.get("SAFEPOINT_ATTEMPT", "")
        self.attempt = max(self.lease.generation, int(supervisor) if supervisor.isdigit() else 1)
        self.resumed = bool(replay.records)
        self._replay(replay)
        if self.complete:  # a writer killed while releasing superseded checkpoints left them
            self._log.tidy(replay)
        state = self._committed  # what the layer above kept of it (a task may start afresh)
        self._outputs = Outputs(state.outputs if state is not None else {}, durable=self._durable,
                                name=self.name)
        self._committer = Committer(background=self._commit_mode == "async", coalesce=True,
                                    name=self.name)
        self._last_at = self._clock()
        self._fraction_at_last = (state.fraction or 0.0) if state is not None else 0.0
        self._interrupts.install()
        if self._watchdog is not None:
            self._watchdog.start()
        if self.resumed:
            where = f"at item {state.position:,}" if state is not None and state.frames else ""
            logger(self.kind).info("safepoint: %s %r resumed %s(attempt %d)", self.kind, self.name,
                     f"{where} " if where else "", self.attempt)

    def _replay(self, replay: Replay) -> None:
        """Take up where the newest records left off (tasks and flows read more of them)."""
        state = replay.state
        assert self._log is not None
        self._steps = replay.steps()
        if state is None:
            return
        self._committed = state
        self._recorded = list(state.frames)
        self.complete = state.complete
        value = self._log.load(state.tree, allow_pickle=self.allow_pickle) if state.tree else {}
        self._load_tree(value if isinstance(value, dict) else {})
        self._blocks = list(state.blocks)
        self._progress_value, self._message = state.progress, state.message

    def _load_tree(self, tree: dict[str, Any]) -> None:
        self.state = tree

    def _saved_tree(self) -> Any:
        """What a checkpoint saves of this execution (tasks add their results)."""
        return self.state

    def _extra(self) -> dict[str, Any]:
        """What the layer above records with each checkpoint."""
        return {"kind": self.kind} if self.kind != "run" else {}

    def _release(self, *, discard: bool, failed: bool = False) -> None:
        """Put the signal handlers back and close what the run holds (what exists of it:
        opening may have failed half-way), and let go of the lease."""
        self._interrupts.restore()
        if self._watchdog is not None:
            self._watchdog.stop()
        if self._committer is not None:
            self._committer.close(discard=discard)
        if self._outputs is not None:  # a fenced writer's unflushed output is dropped
            self._outputs.close(discard=self.lease is not None and self.lease.fenced is not None)
        if self._log is not None:
            self._log.close()
        if self.lease is not None:
            self.lease.release()

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self._closed:
            return
        try:
            for loop in list(reversed(self._loops)):  # async loops left by `break`
                self._loop_released(loop)
            if exc is None:
                self._finish()
            else:
                self._stopped(exc)
        finally:
            self._closed = True
            self._release(discard=self._interrupts.stopped_at_once)

    async def __aenter__(self: _R) -> _R:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.__exit__(exc_type, exc, tb)

    def _finish(self) -> None:
        """The block ended without error: the execution is complete."""
        assert self._committer is not None and self._log is not None and self.lease is not None
        self._committer.flush()
        if self.complete:
            return
        if self._keep_completed:
            self._commit(complete=True, wait=True)
        else:  # mark it complete first, so that a crash while deleting cannot resurrect it
            self._commit(complete=True, wait=True, with_state=False)
            self.lease.check(fresh=True)
            self._log.remove()
            self.lease.forget()
        self.complete = True

    def _stopped(self, exc: BaseException) -> None:
        """The block raised: keep the last checkpoint, and say how to go on."""
        assert self._committer is not None
        if not self._interrupts.stopped_at_once:
            try:
                self._committer.flush()
            except BaseException as error:
                exc.add_note(f"safepoint: a background commit failed too: {error!r}")
        durable = self._committer.last
        if durable is not None and durable.frames:
            where: str | None = f"at item {durable.position:,} of loop {durable.frames[-1].loop}"
        elif durable is not None or self.resumed:
            where = "where the previous attempt left it" if durable is None else "before its loops"
        else:
            where = None
        if where is None:
            note = (f"safepoint: {self.kind} {self.name!r} stopped before its first checkpoint; "
                    "running it again starts over")
        else:
            note = (f"safepoint: {self.kind} {self.name!r} stopped; its last checkpoint is "
                    f"{where}. Run it again to resume from there, or `safepoint rm {self.name}` "
                    "to start over")
        if self._interrupts.pending is not None and not self._interrupts.stopped_at_once:
            note = note.replace("stopped;", "was interrupted and checkpointed;")
        exc.add_note(note)
        if isinstance(exc, SystemExit) and self._interrupts.pending is not None:
            logger(self.kind).warning("%s", note)  # SIGTERM: SystemExit prints no traceback, no note

    def _require_open(self, what: str) -> None:
        if not self._entered or self._closed:
            raise SafepointError(f"{what} works inside `with safepoint.resume({self.name!r}) as run:`")

    # ------------------------------------------------------------- properties

    @property
    def position(self) -> int:
        """Items completed in the current loop (inside a loop body: the item's index;
        before the first loop of a resumed run: where it will resume)."""
        if self._loops:
            return self._loops[-1].current()
        if self._tail is not None:
            return self._tail.position
        return self._recorded[-1].position if self._recorded else 0

    @property
    def checkpoints(self) -> int:
        """Checkpoints of the state (position, state, progress) written by this attempt."""
        return self._committer.commits if self._committer is not None else 0

    @property
    def commits(self) -> int:
        """Records written by this attempt: checkpoints and durable step outcomes."""
        return (self._committer.commits if self._committer is not None else 0) + self._step_commits

    @property
    def commit_seconds(self) -> float:
        """Time this attempt spent writing commits (on the background thread when async)."""
        return self._committer.seconds if self._committer is not None else 0.0

    @property
    def durable_position(self) -> int | None:
        """Position of the newest commit written (with ``commit="async"`` it may lag)."""
        durable = self._committer.last if self._committer is not None else None
        return durable.position if durable is not None else None

    # ------------------------------------------------------------------ loops

    def range(self, *args: int) -> Iterator[int]:
        """Like ``range(...)``; a rerun continues after the last checkpointed item."""
        return self._sync_loop(loops.RangeSource(range(*args)), "run.range()")

    def iterate(self, items: Iterable[Any]) -> Iterator[Any]:
        """Items of a sequence (resumed by index) or a re-iterable (resumed by skipping)."""
        if loops.is_indexable(items):
            source: Any = loops.SequenceSource(items)
        else:
            loops.check_reiterable(items, "run.iterate()")
            source = loops.IterableSource(items)
        return self._sync_loop(source, "run.iterate()")

    def lines(
        self, path: str | os.PathLike[str], *, encoding: str = "utf-8", on_change: OnChange = "error"
    ) -> Iterator[str]:
        """Lines of a text file (ending with their newline); a rerun seeks to the saved byte
        offset. Raises InputChanged if the file changed since the checkpoint."""
        self._require_open("run.lines()")
        source = LineSource(path, encoding=encoding, on_change=on_change, name=self.name)
        return self._sync_loop(source, "run.lines()")

    def alines(
        self, path: str | os.PathLike[str], *, encoding: str = "utf-8", on_change: OnChange = "error"
    ) -> AsyncIterator[str]:
        """``async for`` form of :meth:`lines` (blocks are read on a worker thread)."""
        self._require_open("run.alines()")
        source = LineSource(path, encoding=encoding, on_change=on_change, name=self.name)
        loop = self._start_loop(source, "run.alines()")
        if loop is None:
            return aio.empty()
        return aio.AsyncLoopIterator(self, loop, aio.thread_chunks(source.chunks(loop.position)))

    def aiterate(self, items: AsyncIterable[Any]) -> AsyncIterator[Any]:
        """``async for`` over an async re-iterable; a rerun skips the items already done."""
        loops.check_reiterable(items, "run.aiterate()")
        source = aio.AsyncIterableSource(items)
        loop = self._start_loop(source, "run.aiterate()")
        if loop is None:
            return aio.empty()
        return aio.AsyncLoopIterator(self, loop, source.achunks(loop.position))

    def _sync_loop(self, source: Any, how: str) -> Iterator[Any]:
        loop = self._start_loop(source, how)
        if loop is None:
            return iter(())
        return loops.drive(self, loop, source.chunks(loop.position, loop))

    def _scope(self) -> str:
        """The scope of code running now: the items in progress of the active loops."""
        return "/".join(f"{loop.ordinal}:{loop.in_progress()}" for loop in self._loops)

    def _recorded_frame(self, depth: int) -> Frame | None:
        """The recorded frame for a loop at ``depth`` when the loops around it are where the
        checkpoint was (so that the checkpoint speaks about this loop)."""
        if depth >= len(self._recorded):
            return None
        for outer, frame in zip(self._loops, self._recorded[:depth], strict=False):
            if outer.ordinal != frame.loop or outer.in_progress() != frame.position or frame.finished:
                return None
        return self._recorded[depth]

    def _start_loop(self, source: Any, how: str) -> Loop | None:
        """Number the new loop; None when a resumed run has already finished it."""
        try:
            self._require_open(how)
            scope = self._scope()
            ordinal = self._loop_counts.get(scope, 0)
            self._loop_counts[scope] = ordinal + 1
            depth = len(self._loops)
            recorded = self._recorded_frame(depth)
            start = 0
            if self.complete or (recorded is not None and (
                    ordinal < recorded.loop or (ordinal == recorded.loop and recorded.finished))):
                _close(source)
                return None
            if recorded is not None and ordinal == recorded.loop and recorded.source is not None:
                if recorded.source.get("kind") != source.kind:
                    raise StateMismatch(
                        f"{how}: the checkpoint of {self.kind} {self.name!r} is in a "
                        f"{recorded.source.get('kind')} loop here (loop {ordinal}, item "
                        f"{recorded.position}); the code changed since. `safepoint rm "
                        f"{self.name}` to start over")
                source.check(recorded.source, recorded.position)
                start = recorded.position
        except BaseException:
            _close(source)
            raise
        loop = Loop(ordinal, start, source, depth, self._clock)
        self._loops.append(loop)
        self._tail = None
        if depth == 0:
            self._fraction_at_last = loop.fraction(start) or 0.0
            self._bar = ProgressBar.open(self._progress, self.name, source, start)
        return loop

    # ------------------------------------------------------------- boundaries

    def _segment_length(self, loop: Loop, remaining: int) -> int:
        length = loop.segment
        if loop is self._loops[-1]:
            total = loop.total
            if total is None and self._needs_fraction and isinstance(loop.source, LineSource):
                total = loop.source.estimated_total(loop.position)
            due = self._policy.horizon(self._items_since, loop.position, total, self._fraction_at_last)
            if due is not None and due < length:
                length = due if due > 1 else 1
        return length if length < remaining else remaining

    def _due(self, loop: Loop) -> bool:
        """At a boundary of ``loop``: count and pace, and say whether to checkpoint now."""
        done = loop.position - loop.counted
        if done > 0:
            self._items_since += done
            loop.counted = loop.position
            if self._tail is not None:
                self._tail = None  # a new item: the inner loop that ended in it is past
            if len(self._loop_counts) > 1 or len(self._step_counts) > 1:
                self._prune(loop.depth)
        paced = loop.pace(self._clock())
        if paced and self._bar is not None and loop.depth == 0 and loop.clocked_at - loop.bar_at >= REFRESH:
            loop.bar_at = loop.clocked_at
            self._bar.update(loop.position)
        assert self._committer is not None
        if self._committer.error is not None:
            self._committer.check()
        if self.lease is not None and self.lease.fenced is not None:
            raise self.lease.fenced
        if self._interrupts.pending is not None:
            return True
        return self._policy(self._tick(loop))

    def _prune(self, depth: int) -> None:
        """Forget the loop and step counters of items that are done (deeper than ``depth``)."""
        def keep(scope: str) -> bool:
            return (scope.count("/") + 1 if scope else 0) <= depth

        self._loop_counts = {k: v for k, v in self._loop_counts.items() if keep(k)}
        self._step_counts = {k: v for k, v in self._step_counts.items() if keep(k)}

    def _tick(self, loop: Loop | None, *, substep: bool = False) -> Tick:
        fraction = None
        if self._needs_fraction:
            if self._progress_value is not None:
                fraction = self._progress_value
            elif self._loops:
                fraction = self._loops[0].fraction(self._loops[0].in_progress() if len(self._loops) > 1
                                                   else self._loops[0].position)
        return Tick(items=self._items_since, last_checkpoint_at=self._last_at, fraction=fraction,
                    fraction_at_last=self._fraction_at_last, substep_completed=substep,
                    clock=self._clock)

    def _boundary(self, loop: Loop) -> None:
        if self._due(loop):
            interrupted = self._interrupts.pending is not None
            self._commit(wait=interrupted)
            if interrupted:
                raise stop_now(self._interrupts.pending)  # type: ignore[arg-type]

    async def _aboundary(self, loop: Loop) -> None:
        if self._due(loop):
            interrupted = self._interrupts.pending is not None
            await self._acommit(wait=interrupted)
            if interrupted:
                raise stop_now(self._interrupts.pending)  # type: ignore[arg-type]

    def _defer(self, signum: int) -> bool:
        """A signal arrived: defer it to the next boundary if a loop is active."""
        if not self._loops:
            return False
        self._loops[-1].cut()
        return True

    def _segment_overdue(self) -> bool:
        """(Watchdog thread) the current segment has run far past its planned length."""
        loops_ = self._loops
        return bool(loops_) and loops_[-1].running_for(time.monotonic()) > WATCHDOG_SECONDS

    def _policy_due_at(self) -> float | None:
        """(Watchdog thread) when time alone could first make the policy due."""
        return self._policy.due_at(self._last_at)

    def _cut_segment(self) -> None:
        """(Main thread) end the overdue segment after the item in progress, and pace the
        next segments afresh from one item: the item rate has changed."""
        if self._loops:
            self._loops[-1].cut()
            self._loops[-1].segment = 1

    def _loop_finished(self, loop: Loop) -> None:
        self._pop(loop)
        self._tail = Frame(loop.ordinal, loop.position, loop.position, 1.0, None, finished=True)
        if loop.position != loop.start or self._items_since:
            self._commit()

    def _loop_released(self, loop: Loop) -> None:
        """A loop ended (finished, left by break, or by an exception)."""
        if loop in self._loops:  # left early: later commits treat it as done
            self._pop(loop)
            self._tail = Frame(loop.ordinal, loop.current(), None, None, None, finished=True)
        _close(loop.source)

    def _pop(self, loop: Loop) -> None:
        while self._loops and self._loops[-1] is not loop:  # inner loops left by an exception
            self._loops.pop()
        if self._loops:
            self._loops.pop()
        if loop.depth == 0 and self._bar is not None:
            self._bar.close(loop.position)
            self._bar = None

    # ----------------------------------------------------------------- commits

    def _frames(self, position: int | None) -> list[Frame]:
        frames = []
        for i, loop in enumerate(self._loops):
            innermost = i == len(self._loops) - 1
            at = (loop.position if position is None else position) if innermost else loop.in_progress()
            frames.append(Frame(loop.ordinal, at, loop.total, loop.fraction(at),
                                loop.source.state_at(at)))
        if self._tail is not None:
            frames.append(self._tail)
        elif not self._loops and self._recorded and not self._loop_counts:
            frames = list(self._recorded)  # nothing started yet: still where it was
        return frames

    def _snapshot(self, *, complete: bool = False, position: int | None = None,
                  with_state: bool = True) -> tuple[Record, Callable[[], None]]:
        """A state record and the job that writes it, taken now, at the boundary."""
        assert self._outputs is not None and self._log is not None and self._committer is not None
        if self._outputs.open_files and self.lease is not None:
            self.lease.check()  # a writer taken over must not flush into the newer one's outputs
        lengths, fds = self._outputs.snapshot()
        record = Record("state", attempt=self.attempt, time=time.time(),
                        frames=self._frames(position), outputs=lengths,
                        progress=self._progress_value, message=self._message,
                        blocks=list(self._blocks), current=self._current, complete=complete,
                        extra=self._extra())
        if complete:
            record.progress = 1.0
        value: Any = None
        if with_state:
            tree = self._saved_tree()
            node = _flat_node(tree)
            if node is None:
                prepared = prepare(tree, allow_pickle=self.allow_pickle)
                if not prepared.blobs and not prepared.pickled:
                    node = prepared.node
                else:  # a checkpoint step; the caller goes on: take a copy for the job
                    value = copy.deepcopy(tree) if self._committer.background else tree
            if node is not None:
                record.tree = {"node": node}
        result = self._result_tree(complete)
        log_ = self._log
        # the live records, only when this commit starts the segment or compacts it
        live = self._live_steps(record.frames) if not log_.started or log_.due else None
        durable = self._durable
        log = logger(self.kind)

        def job() -> None:
            if value is not None:
                record.tree = log_.tree(value, allow_pickle=self.allow_pickle)
            if result is not None:
                record.result = result() if callable(result) else result
            if durable:
                for fd in fds:
                    _sync(fd)
            log_.append(record, live)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("safepoint: %s %r committed%s (attempt %d)", self.kind, self.name,
                          " its completion" if record.complete else
                          f" at item {record.position:,}" if record.frames else "", self.attempt)
            previous, self._committed = self._committed, record
            if previous is not None:
                log_.release(previous)
            if live is not None and log_.due:
                log_.compact([*live, record])

        self._items_since = 0
        self._last_at = self._clock()
        self._fraction_at_last = record.fraction or 0.0
        return record, job

    def _result_tree(self, complete: bool) -> Any:
        """The result a completion record carries (tasks)."""
        return None

    def _live_steps(self, frames: list[Frame]) -> list[Record]:
        """The step records a resume from ``frames`` may still replay (oldest first)."""
        kept = [r for r in self._steps.values() if reachable(r.key.rpartition("#")[0], frames)]
        return sorted(kept, key=lambda r: r.seq)

    def _carried(self) -> list[Record]:
        """What a new segment holds before a record that is not a state record: the newest
        state record, and the step records a resume from it may replay."""
        committed = self._committed
        if committed is None:
            return self._live_steps([])
        return [*self._live_steps(committed.frames), committed]

    def _commit(self, *, wait: bool = False, **how: Any) -> None:
        assert self._committer is not None
        record, job = self._snapshot(**how)
        self._committer.submit(job, tag=record)
        if wait:
            self._committer.flush()

    async def _acommit(self, *, wait: bool = False) -> None:
        assert self._committer is not None
        record, job = self._snapshot()
        if self._committer.background:
            self._committer.submit(job, tag=record)
            if wait:
                await asyncio.to_thread(self._committer.flush)
        else:  # write on a worker thread, so that the event loop runs meanwhile
            await asyncio.to_thread(self._committer.submit, job, record)

    def checkpoint(self) -> None:
        """Commit now, and wait until it is written. In a loop body, call it where the item
        is done: the item in progress counts as completed."""
        self._require_open("run.checkpoint()")
        if self.complete:
            return
        position = self._loops[-1].through_current() if self._loops else None
        if position is not None:
            self._tail = None  # an inner loop that ended in the item counted done is past
        self._commit(wait=True, position=position)
        if position is not None:
            self._loops[-1].credit(position)

    # ----------------------------------------------------------------- outputs

    def open_output(self, path: str | os.PathLike[str], mode: OutputMode = "w", *,
                    encoding: str = "utf-8") -> IO[Any]:
        """An output file whose committed length is part of each checkpoint: a resumed run
        cuts it back to that length, so each record is written exactly once. Write it
        sequentially; the run closes it when it ends."""
        self._require_open("run.open_output()")
        assert self._outputs is not None
        return self._outputs.open(path, mode, encoding)

    def __repr__(self) -> str:
        return f"<Run {self.name!r} attempt={self.attempt} position={self.position}>"


def _close(source: Any) -> None:
    close = getattr(source, "close", None)
    if close is not None:
        close()


__all__ = ["CommitMode", "Run", "resume"]
