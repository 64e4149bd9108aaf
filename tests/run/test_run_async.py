"""Async loops (``alines``, ``aiterate``) and background commits (``commit="async"``)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from run_helpers import Boom, saved

import safepoint.run as runs
from safepoint.errors import StaleAttempt
from safepoint.lease import Lease
from safepoint.policy import every


class Numbers:
    """An async re-iterable: each ``async for`` starts afresh."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __aiter__(self) -> AsyncIterator[int]:
        return self._generate()

    async def _generate(self) -> AsyncIterator[int]:
        for i in range(self.n):
            await asyncio.sleep(0)
            yield i


def test_alines_resumes_where_it_stopped(numbers: Any, store: Path) -> None:
    path, values = numbers(30_000, seed=1)

    async def job(fail_at: int | None) -> int:
        async with runs.resume("job", location=store, policy=every(items=1000)) as run:
            run.state.setdefault("total", 0)
            async for line in run.alines(path):
                if run.position == fail_at:
                    raise Boom
                run.state["total"] += int(line)
        return run.state["total"]

    with pytest.raises(Boom):
        asyncio.run(job(fail_at=12_345))
    assert saved(store, "job").record.position == 12_000
    assert asyncio.run(job(fail_at=None)) == sum(values)


def test_aiterate_resumes_by_skipping(store: Path) -> None:
    async def job(fail_at: int | None) -> list[int]:
        seen = []
        async with runs.resume("job", location=store, policy=every(items=10)) as run:
            async for i in run.aiterate(Numbers(100)):
                if i == fail_at:
                    raise Boom
                seen.append(i)
        return seen

    with pytest.raises(Boom):
        asyncio.run(job(fail_at=57))
    assert asyncio.run(job(fail_at=None)) == list(range(50, 100))


def test_aiterate_refuses_a_one_shot_async_generator(store: Path) -> None:
    async def job() -> None:
        async with runs.resume("job", location=store) as run:
            run.aiterate(Numbers(3)._generate())

    with pytest.raises(TypeError, match="one-shot iterator"):
        asyncio.run(job())


def test_break_out_of_an_async_loop_lets_the_next_one_start(store: Path) -> None:
    async def job() -> list[int]:
        async with runs.resume("job", location=store) as run:
            async for i in run.aiterate(Numbers(10)):
                if i == 3:
                    break
            return [i async for i in run.aiterate(Numbers(3))]

    assert asyncio.run(job()) == [0, 1, 2]


def _fence(monkeypatch: pytest.MonkeyPatch, hook: Any) -> None:
    """Run ``hook`` where every commit checks the writer's lease (just before it writes)."""
    real = Lease.check

    def check(lease: Lease, *, fresh: bool = False) -> None:
        hook()
        real(lease, fresh=fresh)

    monkeypatch.setattr(Lease, "check", check)


def test_sync_commits_of_an_async_loop_are_written_off_the_event_loop(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writers: list[bool] = []
    _fence(monkeypatch, lambda: writers.append(threading.current_thread() is threading.main_thread()))

    async def job() -> None:
        async with runs.resume("job", location=store, policy=every(items=1)) as run:
            async for _ in run.aiterate(Numbers(5)):
                pass

    asyncio.run(job())
    assert writers[:5] == [False] * 5


def test_background_commits_coalesce_and_are_all_written_at_the_end(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    calls: list[int] = []

    def fence() -> None:
        calls.append(1)
        gate.wait(10)  # the first write stalls until the loop has handed over many more

    _fence(monkeypatch, fence)
    with runs.resume("job", location=store, policy=every(items=1), commit="async",
                     keep_completed=True) as run:
        run.state["total"] = 0
        for i in run.range(100):
            run.state["total"] += i
            if i == 90:
                assert run.durable_position is None  # nothing written yet: the loop went on
                gate.set()
    assert run.complete and run.commits < 20 and len(calls) == run.commits
    with runs.resume("job", location=store, keep_completed=True) as again:
        assert again.complete and again.state == {"total": sum(range(100))}


def test_a_background_commit_error_surfaces_and_nothing_is_committed_after_it(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def fence() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise StaleAttempt("a newer attempt took over", name="job", attempt=1, current=2)

    _fence(monkeypatch, fence)
    with pytest.raises(StaleAttempt), runs.resume("job", location=store, policy=every(items=10),
                                                  commit="async") as run:
        run.state["n"] = 0
        for i in run.range(1000):
            run.state["n"] += 1
            if i == 500:
                run.checkpoint()
    found = saved(store, "job")
    assert found.state["n"] == found.record.position <= 501
    assert len(calls) == 2


def test_checkpoint_waits_for_background_commits(store: Path) -> None:
    with pytest.raises(Boom), runs.resume("job", location=store, commit="async",
                                          policy=every(items=5)) as run:
        for i in run.range(50):
            if i == 33:
                run.checkpoint()
                assert run.durable_position == 34
                raise Boom
    assert saved(store, "job").record.position == 34
