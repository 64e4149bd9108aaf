"""Positioned iteration: what a loop reads, where it is, and when it may checkpoint.

A loop hands its items to the caller in *segments*: a list (or range) of items handed out
by ``itertools.chain`` in C, so that an item costs the caller no more than in a plain
``for`` loop. Between
two segments the run is at an item boundary: it counts the items, asks the policy, and may
checkpoint. A segment never runs past the point where a count-based policy becomes due
(``every(items=1000)`` checkpoints after exactly 1000 items), and its length adapts so that
a segment lasts about two milliseconds; time-based policies are therefore asked a few
hundred times a second, never once per item.

A signal handler can *cut* the segment in progress: it exhausts the segment's iterator, so
the loop reaches a boundary right after the item being processed.

Loops nest: each :class:`Loop` keeps its own position and pacing, and the run keeps a stack
of them (``ordinal`` numbers a loop among the loops of its scope: the top level, or one item
of the enclosing loop).
"""

from __future__ import annotations

import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
    Set,
)
from itertools import chain, islice
from operator import length_hint
from typing import Any

from safepoint.errors import StateMismatch

CHUNK = 1 << 16
"""Items fetched at a time from an indexable source (sliced lists, ranges)."""
SMALL_CHUNK = 256
"""Items fetched at a time from a source indexed item by item."""

MAX_SEGMENT = 16384
"""Most items handed out between two boundaries."""
SEGMENT_SECONDS = 0.002
"""A segment is sized to last about this long, so the clock is read about this often."""


class Loop:
    """One positioned iteration of a run: its position, its pacing and the segment being
    consumed."""

    def __init__(self, ordinal: int, position: int, source: Any, depth: int, clock: Callable[[], float]) -> None:
        self.ordinal = ordinal
        self.depth = depth
        self.position = position
        """Items completed (updated at each segment's end)."""
        self.start = position
        self.counted = position
        """Items up to here were counted for the policy (a checkpoint in the body counts
        the item in progress)."""
        self.source = source
        self.segment = 1
        """Items in the next segment (paced to last about SEGMENT_SECONDS)."""
        self.clocked_at = clock()
        self.clock_position = position
        self.bar_at = self.clocked_at
        self._it: Iterator[Any] | None = None
        self._len = 0
        self._cut: int | None = None
        self._entered_at = 0.0

    def pace(self, now: float) -> bool:
        """At a boundary: size the next segment from the item rate; True when the clock
        was read (a segment's worth of items passed)."""
        if self.position - self.clock_position < self.segment:
            return False
        per_item = (now - self.clocked_at) / (self.position - self.clock_position)
        self.segment = (max(1, min(MAX_SEGMENT, int(SEGMENT_SECONDS / per_item)))
                        if per_item > 0 else MAX_SEGMENT)
        self.clocked_at, self.clock_position = now, self.position
        return True

    def enter(self, it: Iterator[Any], length: int) -> None:
        """A segment of ``length`` items starts."""
        self._cut = None
        self._len = length
        self._it = it
        self._entered_at = time.monotonic()

    def running_for(self, now: float) -> float:
        """Seconds the segment in progress has been running (0 if none, or already cut)."""
        if self._it is None or self._cut is not None:
            return 0.0
        return now - self._entered_at

    def leave(self) -> int:
        """The segment has ended; returns how many of its items were completed."""
        done = self._len if self._cut is None else self._cut
        self._it = None
        self.position += done
        return done

    def cut(self) -> None:
        """End the segment right after the item in progress (called by a signal handler)."""
        it = self._it
        if it is None or self._cut is not None:
            return
        self._cut = self._len - length_hint(it)
        setstate = getattr(it, "__setstate__", None)
        if setstate is not None:  # list, tuple, range and str iterators: jump to the end
            setstate(self._len)

    def _fetched(self) -> int:
        it = self._it
        if it is None:
            return 0
        return self._cut if self._cut is not None else self._len - length_hint(it)

    def current(self) -> int:
        """Inside the loop body: the index of the item in progress (= items completed)."""
        return self.position + max(self._fetched() - 1, 0)

    def through_current(self) -> int:
        """Items completed if the item in progress counts as done (``run.checkpoint()``
        called at the end of a loop body)."""
        return self.position + self._fetched()

    @property
    def total(self) -> int | None:
        return self.source.total

    def fraction(self, position: int) -> float | None:
        return self.source.fraction_at(position)

    def credit(self, position: int) -> None:
        """Items up to ``position`` are counted already (a checkpoint in the body)."""
        self.counted = max(self.counted, position)

    def in_progress(self) -> int:
        """The index of the item being processed (for an enclosing loop: the item whose
        body runs the inner loops)."""
        return self.current()


def drive(run: Any, loop: Loop, chunks: Iterable[Sequence[Any]]) -> Iterator[Any]:
    """The items of ``chunks``, segment by segment, with a boundary between segments.

    ``chain`` hands out the items of one segment's iterator in C, with no Python frame per
    item; it resumes :func:`_segments` only when a segment is exhausted, that is, when the
    caller asks for the item after the last one: the caller is then at an item boundary.
    """
    return chain.from_iterable(_segments(run, loop, chunks))


def _segments(run: Any, loop: Loop, chunks: Iterable[Sequence[Any]]) -> Iterator[Iterator[Any]]:
    try:
        for chunk in chunks:
            size = len(chunk)
            start = 0
            while start < size:
                length = run._segment_length(loop, size - start)
                segment = chunk if start == 0 and length == size else chunk[start : start + length]
                it = iter(segment)
                loop.enter(it, length)
                yield it
                start += loop.leave()
                run._boundary(loop)
        run._loop_finished(loop)
    finally:
        run._loop_released(loop)


class RangeSource:
    """``run.range(...)``: resumes in O(1) by slicing the range."""

    kind = "range"

    def __init__(self, values: range) -> None:
        self.values = values
        self.total: int | None = len(values)
        self.identity = {"kind": "range", "start": values.start, "stop": values.stop,
                         "step": values.step}

    def check(self, saved: Mapping[str, Any], position: int) -> None:
        if dict(saved) != self.identity:
            before = range(int(saved.get("start", 0)), int(saved.get("stop", 0)), int(saved.get("step", 1)) or 1)
            raise StateMismatch(
                f"the checkpoint is inside range({saved.get('start')}, {saved.get('stop')}, "
                f"{saved.get('step')}) ({len(before)} items) but this run iterates "
                f"range({self.values.start}, {self.values.stop}, {self.values.step}) "
                f"({len(self.values)} items); the code or its input changed")

    def chunks(self, position: int, loop: Any) -> Iterator[Sequence[Any]]:
        yield self.values[position:]

    def state_at(self, position: int) -> dict[str, Any]:
        return self.identity

    def fraction_at(self, position: int) -> float | None:
        return position / self.total if self.total else 1.0


_SLICEABLE = (list, tuple, range, str, bytes)


def is_indexable(source: Any) -> bool:
    """Sequences, numpy arrays and datasets: a length and items by integer index."""
    if isinstance(source, (Mapping, Set)):
        return False
    return isinstance(source, Sequence) or (hasattr(source, "__len__") and hasattr(source, "__getitem__"))


class SequenceSource:
    """``run.iterate(sequence)``: resumes by indexing at the saved position."""

    kind = "iterate"

    def __init__(self, items: Any) -> None:
        self.items = items
        self.sliceable = isinstance(items, _SLICEABLE) or hasattr(items, "ndim")

    @property
    def total(self) -> int | None:
        return len(self.items)

    def check(self, saved: Mapping[str, Any], position: int) -> None:
        if position > len(self.items):
            raise StateMismatch(
                f"the checkpoint is at item {position}, but the sequence this run iterates has "
                f"only {len(self.items)} items; it is not the sequence the checkpoint was "
                "iterating")

    def chunks(self, position: int, loop: Any) -> Iterator[Sequence[Any]]:
        start = position
        while start < len(self.items):  # re-read: a list may grow while it is iterated
            if self.sliceable:
                chunk = self.items[start : start + CHUNK]
            else:
                stop = min(start + SMALL_CHUNK, len(self.items))
                chunk = [self.items[i] for i in range(start, stop)]
            yield chunk
            start += len(chunk)

    def state_at(self, position: int) -> dict[str, Any]:
        return {"kind": "iterate", "len": len(self.items)}

    def fraction_at(self, position: int) -> float | None:
        total = len(self.items)
        return position / total if total else 1.0


class IterableSource:
    """``run.iterate(reiterable)``: resumes by iterating afresh and skipping ``position``
    items (the cost grows with the position; use a sequence to index directly)."""

    kind = "iterate"

    def __init__(self, items: Iterable[Any]) -> None:
        self.items = items
        self.total: int | None = None

    def check(self, saved: Mapping[str, Any], position: int) -> None:
        pass  # checked while skipping

    def chunks(self, position: int, loop: Any) -> Iterator[Sequence[Any]]:
        it = iter(self.items)
        if position and next(islice(it, position - 1, position), _MISSING) is _MISSING:
            raise StateMismatch(
                f"the checkpoint is at item {position}, but the iterable this run iterates "
                "ended before it; it is not the one the checkpoint was iterating")
        while chunk := list(islice(it, loop.segment)):
            yield chunk

    def state_at(self, position: int) -> dict[str, Any]:
        return {"kind": "iterate", "len": None}

    def fraction_at(self, position: int) -> float | None:
        return None


_MISSING = object()


def check_reiterable(source: Any, how: str) -> None:
    """Refuse what a resumed run could not replay in the same order."""
    if isinstance(source, (set, frozenset)):
        raise TypeError(
            f"{how} cannot resume a set: its order may change from one process to the next; "
            "iterate sorted(...) instead")
    if how.startswith("run.aiterate"):
        if not isinstance(source, AsyncIterable):
            raise TypeError(f"{how} needs an async iterable, not {type(source).__name__}")
        one_shot = isinstance(source, AsyncIterator)
    else:
        if not isinstance(source, Iterable):
            raise TypeError(f"{how} needs a sequence or an iterable, not {type(source).__name__}")
        one_shot = isinstance(source, Iterator)
    if one_shot:
        raise TypeError(
            f"{how} needs a sequence or a re-iterable (an object whose iteration starts afresh "
            f"each time), and a {type(source).__name__} is a one-shot iterator: a resumed run "
            "could not know that it produces the same items again. Pass a list, or an object "
            "whose __iter__ (__aiter__) creates the iterator, e.g. a class with "
            "`def __iter__(self): return read_records(path)`")


__all__ = [
    "MAX_SEGMENT",
    "IterableSource",
    "Loop",
    "RangeSource",
    "SequenceSource",
    "check_reiterable",
    "drive",
    "is_indexable",
]
