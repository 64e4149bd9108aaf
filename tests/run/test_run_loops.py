"""Positioned loops and policies: what resumes where, and when checkpoints happen."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from run_helpers import Boom, saved

import safepoint.run as runs
from safepoint.errors import StateMismatch
from safepoint.policy import every, manual, on_progress


def crash_at(store: Path, source_factory: Any, stop_at: int, **options: Any) -> None:
    """Iterate ``source_factory()`` in run "job", raising Boom at item index ``stop_at``."""
    with pytest.raises(Boom), runs.resume("job", location=store, **options) as run:
        for index, _ in enumerate(run.iterate(source_factory())):
            if index == stop_at:
                raise Boom


def rest(store: Path, source: Any) -> list[Any]:
    with runs.resume("job", location=store) as run:
        return list(run.iterate(source))


class Lines:
    """A re-iterable: each iteration starts afresh."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.started = 0

    def __iter__(self) -> Iterator[str]:
        self.started += 1
        return (f"line {i}" for i in range(self.n))


class Squares(Sequence[int]):
    """A Sequence without slicing support: indexed item by item."""

    def __len__(self) -> int:
        return 1000

    def __getitem__(self, index: Any) -> int:
        if not isinstance(index, int):
            raise TypeError("integer indices only")
        if not 0 <= index < 1000:
            raise IndexError(index)
        return index * index


@pytest.mark.parametrize("make", [
    lambda: list(range(1000)),
    lambda: tuple(range(1000)),
    lambda: Squares(),
    lambda: np.arange(1000) * 3,
    lambda: Lines(1000),
], ids=["list", "tuple", "sequence", "ndarray", "reiterable"])
def test_iterate_resumes_after_the_last_checkpoint(store: Path, make: Any) -> None:
    crash_at(store, make, 733, policy=every(items=100))
    expected = list(make())[700:]
    got = rest(store, make())
    assert [int(x) if isinstance(x, np.integer) else x for x in got] == expected


def test_a_reiterable_is_iterated_afresh_and_skipped(store: Path) -> None:
    crash_at(store, lambda: Lines(50), 20, policy=every(items=5))
    source = Lines(50)
    assert rest(store, source) == [f"line {i}" for i in range(20, 50)] and source.started == 1


def test_one_shot_iterators_and_sets_are_refused(store: Path) -> None:
    with runs.resume("job", location=store) as run:
        with pytest.raises(TypeError, match="one-shot iterator"):
            run.iterate(x for x in range(3))
        with pytest.raises(TypeError, match="one-shot iterator"):
            run.iterate(iter([1, 2]))
        with pytest.raises(TypeError, match="cannot resume a set"):
            run.iterate({"a", "b"})
        with pytest.raises(TypeError, match="sequence or an iterable"):
            run.iterate(42)  # type: ignore[arg-type]


def test_a_sequence_shorter_than_the_checkpoint_is_refused(store: Path) -> None:
    crash_at(store, lambda: list(range(100)), 60, policy=every(items=10))
    with pytest.raises(StateMismatch, match="only 10 items"), runs.resume("job", location=store) as run:
        run.iterate(list(range(10)))
    with pytest.raises(StateMismatch, match="ended before it"), runs.resume("job", location=store) as run:
        list(run.iterate(Lines(10)))


def test_a_different_loop_at_the_checkpoint_is_refused(store: Path) -> None:
    with pytest.raises(Boom), runs.resume("job", location=store, policy=every(items=1)) as run:
        for i in run.range(0, 100, 2):
            if i == 10:
                raise Boom
    with pytest.raises(StateMismatch, match=r"range\(0, 50, 1\)"), runs.resume("job", location=store) as run:
        run.range(50)
    with pytest.raises(StateMismatch, match="code changed"), runs.resume("job", location=store) as run:
        run.iterate([1, 2, 3])
    with runs.resume("job", location=store) as run:
        assert list(run.range(0, 100, 2))[:2] == [10, 12]


@pytest.mark.parametrize("every_n", [1, 3, 1000, 4096])
def test_every_n_items_checkpoints_at_exact_multiples(store: Path, every_n: int) -> None:
    stop = 10_000 - 1
    crash_at(store, lambda: range(10_000), stop, policy=every(items=every_n))
    assert saved(store, "job").record.position == (stop // every_n) * every_n


def test_on_progress_checkpoints_at_each_step_of_progress(store: Path) -> None:
    crash_at(store, lambda: list(range(1000)), 349, policy=on_progress(0.1))
    assert saved(store, "job").record.position == 300


def test_a_plain_callable_policy_is_asked_after_every_item(store: Path) -> None:
    asked: list[int] = []

    def policy(tick: Any) -> bool:
        asked.append(tick.items)
        return tick.items >= 7

    crash_at(store, lambda: range(100), 30, policy=policy)
    assert saved(store, "job").record.position == 28
    assert asked[:8] == [1, 2, 3, 4, 5, 6, 7, 1]


def test_seconds_policy_follows_the_clock_without_sleeping(store: Path) -> None:
    now = [0.0]
    with pytest.raises(Boom), runs.resume("job", location=store, policy=every(seconds=1),
                                          clock=lambda: now[0]) as run:
        for i in run.range(100):
            now[0] += 0.25  # each item takes a quarter of a second
            if i == 13:
                raise Boom
    assert saved(store, "job").record.position == 12


def test_the_clock_is_not_read_for_every_item(store: Path) -> None:
    import time

    reads = [0]

    def clock() -> float:
        reads[0] += 1
        return time.monotonic()

    with runs.resume("job", location=store, clock=clock) as run:
        for _ in run.range(200_000):
            pass
    assert reads[0] < 200_000 / 50


def test_manual_policy_commits_only_when_asked(store: Path) -> None:
    with pytest.raises(Boom), runs.resume("job", location=store, policy=manual()) as run:
        for i in run.range(100):
            if i == 40:
                run.checkpoint()
            if i == 90:
                raise Boom
    assert run.commits == 1 and saved(store, "job").record.position == 41


def test_a_loop_that_grows_while_it_is_iterated_sees_the_new_items(store: Path) -> None:
    queue = [1, 2, 3]
    with runs.resume("job", location=store) as run:
        seen = []
        for item in run.iterate(queue):
            seen.append(item)
            if item < 3 and len(queue) < 6:
                queue.append(item + 10)
    assert seen == [1, 2, 3, 11, 12]
