"""The ``async for`` forms of positioned loops: ``run.alines`` and ``run.aiterate``.

They work like the synchronous loops (segments, boundaries, policies, signals); a commit
at a boundary is written on a worker thread (or the run's background committer), so the
event loop keeps running other tasks while it is flushed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from safepoint.errors import StateMismatch
from safepoint.run.loops import Loop

_END = object()


async def thread_chunks(chunks: Iterator[Sequence[Any]]) -> AsyncIterator[Sequence[Any]]:
    """Chunks of a blocking source (file blocks), each produced on a worker thread."""
    while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
        yield chunk


class AsyncIterableSource:
    """``run.aiterate(reiterable)``: resumed by iterating afresh and skipping ``position``
    items; each item is a segment of its own (a boundary after every item)."""

    kind = "aiterate"
    total = None

    def __init__(self, items: AsyncIterable[Any]) -> None:
        self.items = items

    def check(self, saved: Mapping[str, Any], position: int) -> None:
        pass  # checked while skipping

    async def achunks(self, position: int) -> AsyncIterator[Sequence[Any]]:
        skipped = 0
        async for item in self.items:
            if skipped < position:
                skipped += 1
                continue
            yield [item]
        if skipped < position:
            raise StateMismatch(
                f"the checkpoint is at item {position}, but the async iterable this run "
                f"iterates ended after {skipped}; it is not the one the checkpoint was iterating")

    def state_at(self, position: int) -> dict[str, Any]:
        return {"kind": "aiterate"}

    def fraction_at(self, position: int) -> float | None:
        return None


class AsyncLoopIterator:
    """An async iterator over a loop's items, with a boundary between segments."""

    def __init__(self, run: Any, loop: Loop, chunks: AsyncIterator[Sequence[Any]]) -> None:
        self._run, self._loop, self._chunks = run, loop, chunks
        self._chunk: Sequence[Any] = ()
        self._start = 0
        self._it: Iterator[Any] | None = None
        self._done = self._released = False

    def __aiter__(self) -> AsyncLoopIterator:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        try:
            return await self._next()
        except BaseException:
            self._release()
            raise

    async def _next(self) -> Any:
        run, loop = self._run, self._loop
        while True:
            if self._it is not None:
                item = next(self._it, _END)
                if item is not _END:
                    return item
                self._it = None
                self._start += loop.leave()
                await run._aboundary(loop)
            if self._start >= len(self._chunk):
                chunk = await anext(self._chunks, None)
                if chunk is None:
                    self._done = True
                    run._loop_finished(loop)
                    self._release()
                    raise StopAsyncIteration
                self._chunk, self._start = chunk, 0
                continue
            length = run._segment_length(loop, len(self._chunk) - self._start)
            whole = self._start == 0 and length == len(self._chunk)
            segment = self._chunk if whole else self._chunk[self._start : self._start + length]
            self._it = iter(segment)
            loop.enter(self._it, length)

    def _release(self) -> None:
        if not self._released:
            self._done = self._released = True
            self._run._loop_released(self._loop)

    async def aclose(self) -> None:
        """Leave the loop (as ``break`` does)."""
        self._release()

    def __del__(self) -> None:  # `break` out of `async for`: release the loop at once
        self._release()


class _Empty:
    """The loop of a resumed run that had already finished it."""

    def __aiter__(self) -> _Empty:
        return self

    async def __anext__(self) -> Any:
        raise StopAsyncIteration


def empty() -> AsyncIterator[Any]:
    return _Empty()


__all__ = ["AsyncIterableSource", "AsyncLoopIterator", "empty", "thread_chunks"]
