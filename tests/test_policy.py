"""Policies answer from the Tick alone (an injected clock, no store, no sleeping)."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from safepoint.policy import (
    AllOf,
    AnyOf,
    Tick,
    after_substep,
    as_policy,
    default_policy,
    every,
    manual,
    on_progress,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_every_seconds_notices_a_sudden_slowdown_at_the_first_late_boundary() -> None:
    clock = FakeClock()
    policy = every(seconds=10)
    tick = Tick(items=0, last_checkpoint_at=clock.now, clock=clock)
    for _ in range(200_000):  # fast items: 1 microsecond each
        clock.now += 1e-6
        tick.items += 1
        assert not policy(tick)
    late = []
    for _ in range(20):  # then items take 1 second each
        clock.now += 1.0
        tick.items += 1
        late.append(policy(tick))
    elapsed = 0.2 + 1.0 * (late.index(True) + 1)
    assert elapsed == pytest.approx(10.2)  # the first boundary at or past the deadline


def test_every_seconds_counts_from_the_last_checkpoint() -> None:
    clock = FakeClock()
    policy = every(seconds=5)
    assert not policy(Tick(items=1, last_checkpoint_at=clock.now - 4.9, clock=clock))
    assert policy(Tick(items=1, last_checkpoint_at=clock.now - 5, clock=clock))


def test_every_items_and_both() -> None:
    clock = FakeClock()
    by_items = every(items=3)
    assert [by_items(Tick(items=n, last_checkpoint_at=clock.now, clock=clock)) for n in (1, 2, 3)] == [
        False, False, True]
    both = every(items=3, seconds=5)
    assert isinstance(both, AnyOf)
    assert both(Tick(items=1, last_checkpoint_at=clock.now - 6, clock=clock))
    assert not both(Tick(items=2, last_checkpoint_at=clock.now - 1, clock=clock))


def test_on_progress_compares_with_the_fraction_at_the_last_checkpoint() -> None:
    policy = on_progress(0.1)
    assert not policy(Tick(items=1, last_checkpoint_at=0.0))  # progress unknown
    assert not policy(Tick(items=1, last_checkpoint_at=0.0, fraction=0.25, fraction_at_last=0.2))
    assert policy(Tick(items=1, last_checkpoint_at=0.0, fraction=0.3, fraction_at_last=0.2))


def test_manual_and_after_substep() -> None:
    assert not manual()(Tick(items=10**9, last_checkpoint_at=-1e9, fraction=1.0))
    assert not after_substep()(Tick(items=1, last_checkpoint_at=0.0))
    assert after_substep()(Tick(items=1, last_checkpoint_at=0.0, substep_completed=True))


def test_combinators_and_plain_callables() -> None:
    clock = FakeClock()
    asked: list[int] = []

    def spy(tick: Tick) -> bool:
        asked.append(tick.items)
        return tick.items % 2 == 0

    either = every(items=3) | spy
    both = spy & every(items=3)
    assert isinstance(either, AnyOf) and isinstance(both, AllOf)
    ticks = [Tick(items=n, last_checkpoint_at=clock.now, clock=clock) for n in (1, 2, 3, 4, 6)]
    assert [either(t) for t in ticks] == [False, True, True, True, True]
    assert asked == [1, 2, 3, 4, 6]  # every part is asked, even after one said yes
    assert [both(t) for t in ticks] == [False, False, False, True, True]
    assert repr(every(items=2) | every(seconds=1)) == "every(items=2) | every(seconds=1)"


def test_default_policy_is_time_based() -> None:
    clock = FakeClock()
    policy = default_policy()
    assert not policy(Tick(items=10**6, last_checkpoint_at=clock.now - 0.4, clock=clock))
    assert policy(Tick(items=1, last_checkpoint_at=clock.now - 0.5, clock=clock))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: every(), "every() needs items=N, seconds=T, steps=S, or several"),
        (lambda: every(items=0), "positive count"),
        (lambda: every(seconds=0), "positive period"),
        (lambda: every(seconds=float("nan")), "positive period"),
        (lambda: on_progress(1.5), "fraction in"),
        (lambda: as_policy(42), "must be a Policy or a callable"),
    ],
)
def test_bad_arguments_are_refused_clearly(make: Callable[[], object], message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        make()


def test_due_at_says_when_time_alone_could_make_a_policy_due() -> None:
    assert every(seconds=5).due_at(100.0) == 105.0
    assert every(items=10).due_at(100.0) is None  # time never makes it due
    assert manual().due_at(100.0) is None
    assert (every(seconds=5) | every(seconds=2)).due_at(100.0) == 102.0  # the first of them
    assert (every(seconds=5) & every(seconds=2)).due_at(100.0) == 105.0  # the last of them
    assert (every(items=3) | every(seconds=5)).due_at(100.0) == 105.0
    assert (every(items=3) & every(seconds=5)).due_at(100.0) == 105.0
    # a policy that does not say could be due at any moment
    assert as_policy(lambda tick: False).due_at(100.0) == 100.0
    assert (as_policy(lambda tick: False) | every(seconds=5)).due_at(100.0) == 100.0
