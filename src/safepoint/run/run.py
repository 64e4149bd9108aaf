"""A named resumable execution: ``with safepoint.resume("job") as run:``.

The run restores ``run.state`` from its newest checkpoint, hands out items through
positioned loops (``run.range``, ``run.iterate``, ``run.lines`` and their async forms) and
checkpoints at item boundaries when its policy says so: the state after an item and the
position past it are one commit. See ``docs/runs.md``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import IO, Any, Literal

from safepoint.checkpointer import split_location
from safepoint.errors import SafepointError, StateMismatch
from safepoint.policy import PolicyLike, Tick, as_policy, default_policy
from safepoint.run import aio, loops
from safepoint.run.commit import Committer
from safepoint.run.lines import LineSource, OnChange
from safepoint.run.loops import Loop
from safepoint.run.output import OutputMode, Outputs
from safepoint.run.persist import Commit, Loaded, Record, RunStore
from safepoint.run.progress import REFRESH, ProgressBar
from safepoint.run.signals import Interrupts, SegmentWatchdog, stop_now
from safepoint.store import Location, check_name, open_store

CommitMode = Literal["sync", "async"]
MAX_SEGMENT = 16384
"""Most items handed out between two boundaries."""
SEGMENT_SECONDS = 0.002
WATCHDOG_SECONDS = 0.1
"""A segment running this much longer than planned is cut, so that a time policy is asked
again even after items suddenly became slow."""
"""A segment is sized to last about this long, so the clock is read about this often."""


def _add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):  # Python 3.11+
        exc.add_note(note)


def resume(
    name: str,
    *,
    location: Location = None,
    policy: PolicyLike | None = None,
    keep_completed: bool = False,
    progress: bool | None = None,
    commit: CommitMode = "sync",
    durable: bool = True,
    clock: Callable[[], float] = time.monotonic,
    fence: Callable[[], None] | None = None,
) -> Run:
    """Open (or create) the run ``name``; use it as ``with`` or ``async with``.

    ``location``: a directory, an fsspec URL or a Store (default ``$SAFEPOINT_DIR`` or
    ``./.safepoint``). ``policy``: when to checkpoint (default: every 0.5 s, plus once when
    a loop ends). ``keep_completed``: keep the final checkpoint of a finished run, so that a
    new ``resume`` sees ``run.complete``; by default a finished run's checkpoints are removed
    and the next run starts fresh. ``progress``: a progress bar (``None``: when the length
    is known and stdout is a terminal). ``commit="async"``: write commits on a background
    thread. ``durable=False``: no fsync (faster; a power loss may lose recent commits).
    ``clock`` is for tests; ``fence`` is called before each commit and may raise to refuse
    it (a supervisor's attempt fencing).
    """
    return Run(name, location=location, policy=policy, keep_completed=keep_completed,
               progress=progress, commit=commit, durable=durable, clock=clock, fence=fence)


class Run:
    """A resumable execution; made by :func:`resume`, used inside its ``with`` block."""

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
        fence: Callable[[], None] | None,
    ) -> None:
        name, location = split_location(name, location)
        self.name = check_name(name)
        if commit not in ("sync", "async"):
            raise ValueError(f"commit must be 'sync' or 'async', not {commit!r}")
        self._location = location
        self._policy = as_policy(policy) if policy is not None else default_policy()
        self._horizon = loops.horizon_of(self._policy)
        self._needs_fraction = loops.uses_fraction(self._policy)
        self._keep_completed, self._progress, self._commit_mode = keep_completed, progress, commit
        self._durable, self._clock, self._fence = durable, clock, fence
        self.state: dict[str, Any] = {}
        """The run's state: restored from the last checkpoint, or ``{}``; mutate it freely."""
        self.resumed = False
        """This run continues an earlier one."""
        self.attempt = 1
        """1 for a fresh run, one more for each resume (or ``$SAFEPOINT_ATTEMPT`` if higher)."""
        self.complete = False
        """The run had already finished (only with ``keep_completed=True``)."""
        self._entered = self._closed = False
        self._loop: Loop | None = None
        self._point = Record(seq=0)  # where the run stands when no loop is active
        self._next_index = 0
        self._seq = 0
        self._bar: ProgressBar | None = None
        self._interrupts = Interrupts(self._defer)
        self._watchdog = (SegmentWatchdog(self._segment_overdue, self._cut_segment, WATCHDOG_SECONDS)
                          if loops.uses_clock(self._policy) else None)

    # --------------------------------------------------------------- lifecycle

    def __enter__(self) -> Run:
        if self._entered:
            raise SafepointError("a run is entered once; call safepoint.resume() again")
        self._entered = True
        try:
            self._open()
        except BaseException:
            self._closed = True
            self._release(discard=True)
            raise
        return self

    def _open(self) -> None:
        """Read the newest checkpoint and get ready to commit."""
        store = open_store(self._location)
        self._store = RunStore(store, self.name, durable=self._durable, fence=self._fence)
        loaded = self._store.open()
        if loaded is not None and loaded.record.complete and not self._keep_completed:
            self._store.remove()  # a finished run: start over
            self._store = RunStore(store, self.name, durable=self._durable, fence=self._fence)
            loaded = self._store.open()
        supervisor = os.environ.get("SAFEPOINT_ATTEMPT", "")
        floor = int(supervisor) if supervisor.isdigit() else 1
        committed: dict[str, int] = {}
        if loaded is not None:
            record = loaded.record
            self.state, self.resumed, self.complete = loaded.state, True, record.complete
            self.attempt = record.attempt if record.complete else max(record.attempt + 1, floor)
            self._seq, self._point, committed = record.seq, record, record.outputs
        else:
            self.attempt = floor
        self._outputs = Outputs(committed, durable=self._durable)
        self._committer = Committer(self._store.write, background=self._commit_mode == "async",
                                    name=self.name)
        now = self._clock()
        self._tick = Tick(items=0, last_checkpoint_at=now, fraction_at_last=self._point.fraction or 0.0,
                          clock=self._clock)
        self._last_position = self._clock_position = 0
        self._clocked_at = self._bar_at = now
        self._segment = 1
        self._interrupts.install()
        if self._watchdog is not None:
            self._watchdog.start()
        if loaded is not None and not self.complete:
            self._count_attempt(loaded)

    def _release(self, *, discard: bool) -> None:
        """Put the signal handlers back and close what the run holds (what exists of it:
        opening may have failed half-way)."""
        self._interrupts.restore()
        if self._watchdog is not None:
            self._watchdog.stop()
        committer = getattr(self, "_committer", None)
        if committer is not None:
            committer.close(discard=discard)
        for resource in (getattr(self, "_outputs", None), getattr(self, "_store", None)):
            if resource is not None:
                resource.close()

    def _count_attempt(self, loaded: Loaded) -> None:
        """Commit the new attempt number at once (cheap: the state is reused as encoded)."""
        if loaded.node is None:
            return  # a full checkpoint: the next commit records the attempt
        record, fds = self._record()
        self._committer.submit(Commit(record, node=loaded.node, outputs=fds))
        self._committer.flush()

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self._closed:
            return
        try:
            if self._loop is not None:  # an async loop left by `break`, not yet finalized
                self._loop_released(self._loop)
            if exc is None:
                self._finish()
            else:
                self._stopped(exc)
        finally:
            self._closed = True
            self._release(discard=self._interrupts.stopped_at_once)

    async def __aenter__(self) -> Run:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.__exit__(exc_type, exc, tb)

    def _finish(self) -> None:
        """The block ended without error: the run is complete."""
        self._committer.flush()
        if self.complete:
            return
        if self._keep_completed:
            self._commit(complete=True, wait=True)
        else:  # mark it complete first, so that a crash while deleting cannot resurrect it
            self._commit(complete=True, wait=True, with_state=False)
            self._store.remove()
        self.complete = True

    def _stopped(self, exc: BaseException) -> None:
        """The block raised: keep the last checkpoint, and say how to go on."""
        if not self._interrupts.stopped_at_once:
            try:
                self._committer.flush()
            except BaseException as error:
                _add_note(exc, f"safepoint: a background commit failed too: {error!r}")
        durable = self._committer.durable
        where = (f"at item {durable.position:,} of loop {durable.loop}" if durable is not None
                 else "where the previous attempt left it" if self.resumed else None)
        if where is None:
            note = (f"safepoint: run {self.name!r} stopped before its first checkpoint; "
                    "running it again starts over")
        else:
            note = (f"safepoint: run {self.name!r} stopped; its last checkpoint is {where}. Run "
                    f"it again to resume from there, or `safepoint rm {self.name}` to start over")
        if self._interrupts.pending is not None and not self._interrupts.stopped_at_once:
            note = note.replace("stopped;", "was interrupted and checkpointed;")
        _add_note(exc, note)
        if isinstance(exc, SystemExit) and self._interrupts.pending is not None:
            print(note, file=sys.stderr)  # SIGTERM: SystemExit prints no traceback, no note

    def _require_open(self, what: str) -> None:
        if not self._entered or self._closed:
            raise SafepointError(f"{what} works inside `with safepoint.resume({self.name!r}) as run:`")

    # ------------------------------------------------------------- properties

    @property
    def position(self) -> int:
        """Items completed in the current loop (inside a loop body: the item's index)."""
        return self._loop.current() if self._loop is not None else self._point.position

    @property
    def commits(self) -> int:
        """Commits written by this attempt."""
        return self._committer.commits if self._entered else 0

    @property
    def commit_seconds(self) -> float:
        """Time this attempt spent writing commits (on the background thread when async)."""
        return self._committer.seconds if self._entered else 0.0

    @property
    def durable_position(self) -> int | None:
        """Position of the newest commit written to disk (with ``commit="async"`` it may lag)."""
        durable = self._committer.durable if self._entered else None
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
        return self._sync_loop(LineSource(path, encoding=encoding, on_change=on_change), "run.lines()")

    def alines(
        self, path: str | os.PathLike[str], *, encoding: str = "utf-8", on_change: OnChange = "error"
    ) -> AsyncIterator[str]:
        """``async for`` form of :meth:`lines` (blocks are read on a worker thread)."""
        self._require_open("run.alines()")
        source = LineSource(path, encoding=encoding, on_change=on_change)
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
        return loops.drive(self, loop, source.chunks(loop.position, self))

    def _start_loop(self, source: Any, how: str) -> Loop | None:
        """Number the new loop; None when a resumed run has already finished it."""
        try:
            self._require_open(how)
            if self._loop is not None:
                raise SafepointError(
                    f"{how}: another loop of run {self.name!r} is still active. Loops of a run "
                    "run one after another, not nested (keep an inner position in run.state), "
                    "and a loop left by `break` must not be kept referenced")
            index, point = self._next_index, self._point
            self._next_index += 1
            if self.complete or index < point.loop or (index == point.loop and point.finished):
                close = getattr(source, "close", None)
                if close is not None:
                    close()
                return None
            start = 0
            if index == point.loop and point.source is not None:
                if point.source.get("kind") != source.kind:
                    raise StateMismatch(
                        f"{how}: the checkpoint of run {self.name!r} is in a "
                        f"{point.source.get('kind')} loop here (loop {index}, item "
                        f"{point.position}); the code changed since. `safepoint rm "
                        f"{self.name}` to start over")
                source.check(point.source, point.position)
                start = point.position
        except BaseException:
            close = getattr(source, "close", None)
            if close is not None:
                close()
            raise
        loop = Loop(index, start, source)
        self._loop = loop
        self._last_position = self._clock_position = start
        self._clocked_at = self._bar_at = self._clock()
        self._tick.fraction_at_last = loop.fraction(start) or 0.0
        self._bar = ProgressBar.open(self._progress, self.name, source, start)
        return loop

    def _close_bar(self, loop: Loop) -> None:
        if self._bar is not None:
            self._bar.close(loop.position)
            self._bar = None

    # ------------------------------------------------------------- boundaries

    def _segment_length(self, loop: Loop, remaining: int) -> int:
        length = self._segment
        total = loop.total
        if total is None and self._needs_fraction and isinstance(loop.source, LineSource):
            total = loop.source.estimated_total(loop.position)
        due = self._horizon(loop.position - self._last_position, loop.position, total,
                            self._tick.fraction_at_last)
        if due is not None and due < length:
            length = due if due > 1 else 1
        return length if length < remaining else remaining

    def _segment_target(self) -> int:
        return self._segment

    def _due(self, loop: Loop) -> bool:
        """At a boundary: pace the segments, and say whether to checkpoint now."""
        if loop.position - self._clock_position >= self._segment:
            now = self._clock()
            per_item = (now - self._clocked_at) / (loop.position - self._clock_position)
            self._segment = (max(1, min(MAX_SEGMENT, int(SEGMENT_SECONDS / per_item)))
                             if per_item > 0 else MAX_SEGMENT)
            self._clocked_at, self._clock_position = now, loop.position
            if self._bar is not None and now - self._bar_at >= REFRESH:
                self._bar_at = now
                self._bar.update(loop.position)
        if self._committer.error is not None:
            self._committer.check()
        if self._interrupts.pending is not None:
            return True
        tick = self._tick
        tick.items = loop.position - self._last_position
        if self._needs_fraction:
            tick.fraction = loop.fraction(loop.position)
        return self._policy(tick)

    def _boundary(self, loop: Loop) -> None:
        if self._due(loop):
            interrupted = self._interrupts.pending is not None
            self._commit(wait=interrupted)
            if interrupted:
                raise stop_now(self._interrupts.pending)

    async def _aboundary(self, loop: Loop) -> None:
        if self._due(loop):
            interrupted = self._interrupts.pending is not None
            await self._acommit(wait=interrupted)
            if interrupted:
                raise stop_now(self._interrupts.pending)

    def _defer(self) -> bool:
        """A signal arrived: defer it to the next boundary if a loop is active."""
        if self._loop is None:
            return False
        self._loop.cut()
        return True

    def _segment_overdue(self) -> bool:
        """(Watchdog thread) the current segment has run far past its planned length."""
        loop = self._loop
        return loop is not None and loop.running_for(time.monotonic()) > WATCHDOG_SECONDS

    def _cut_segment(self) -> None:
        """(Main thread) end the overdue segment after the item in progress, and pace the
        next segments afresh from one item: the item rate has changed."""
        if self._loop is not None:
            self._loop.cut()
            self._segment = 1

    def _loop_finished(self, loop: Loop) -> None:
        self._loop = None
        self._close_bar(loop)
        self._point = Record(seq=0, loop=loop.index, position=loop.position, total=loop.position,
                             fraction=1.0, finished=True)
        if loop.position != self._last_position:
            self._commit()

    def _loop_released(self, loop: Loop) -> None:
        """A loop ended (finished, left by break, or by an exception)."""
        if self._loop is loop:  # left early: later commits treat it as done
            self._loop = None
            self._close_bar(loop)
            self._point = Record(seq=0, loop=loop.index, position=loop.current(),
                                 finished=True)
        close = getattr(loop.source, "close", None)
        if close is not None:
            close()

    # ----------------------------------------------------------------- commits

    def _record(self, *, complete: bool = False, position: int | None = None) -> tuple[Record, list[int]]:
        self._seq += 1
        lengths, fds = self._outputs.snapshot()
        loop = self._loop
        if loop is not None:
            at = loop.position if position is None else position
            record = Record(self._seq, self.attempt, complete, loop.index, at, loop.total,
                            loop.fraction(at), loop.source.state_at(at), lengths)
        else:
            point = self._point
            record = Record(self._seq, self.attempt, complete, point.loop, point.position,
                            point.total, point.fraction, point.source, lengths, point.finished)
        record.time = time.time()
        return record, fds

    def _snapshot(self, *, complete: bool = False, position: int | None = None,
                  with_state: bool = True) -> Commit:
        """Everything a commit needs, taken now, at the boundary."""
        record, fds = self._record(complete=complete, position=position)
        if with_state:
            commit = self._store.snapshot(record, self.state, private=self._committer.background)
        else:
            commit = Commit(record)
        commit.outputs = fds
        self._last_position = record.position
        self._tick.last_checkpoint_at = self._clock()
        self._tick.fraction_at_last = record.fraction or 0.0
        return commit

    def _commit(self, *, wait: bool = False, **how: Any) -> None:
        self._committer.submit(self._snapshot(**how))
        if wait:
            self._committer.flush()

    async def _acommit(self, *, wait: bool = False) -> None:
        commit = self._snapshot()
        if self._committer.background:
            self._committer.submit(commit)
            if wait:
                await asyncio.to_thread(self._committer.flush)
        else:  # write on a worker thread, so that the event loop runs meanwhile
            await asyncio.to_thread(self._committer.submit, commit)

    def checkpoint(self) -> None:
        """Commit now, and wait until it is written. In a loop body, call it where the item
        is done: the item in progress counts as completed."""
        self._require_open("run.checkpoint()")
        if self.complete:
            return
        position = self._loop.through_current() if self._loop is not None else None
        self._commit(wait=True, position=position)

    # ----------------------------------------------------------------- outputs

    def open_output(self, path: str | os.PathLike[str], mode: OutputMode = "w", *,
                    encoding: str = "utf-8") -> IO[Any]:
        """An output file whose committed length is part of each checkpoint: a resumed run
        cuts it back to that length, so each record is written exactly once. Write it
        sequentially; the run closes it when it ends."""
        self._require_open("run.open_output()")
        return self._outputs.open(path, mode, encoding)

    def __repr__(self) -> str:
        return f"<Run {self.name!r} attempt={self.attempt} position={self.position}>"


__all__ = ["CommitMode", "Run", "resume"]
