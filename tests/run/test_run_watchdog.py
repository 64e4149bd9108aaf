"""A time policy is asked again soon after items suddenly become slow.

Segments are sized from the recent item rate; after 50,000 fast items a segment holds
thousands of items, which at 20 ms each would pass minutes without a time check. The
segment watchdog cuts such a segment after the item in progress.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import safepoint
from safepoint.policy import Policy, Tick, as_policy
from safepoint.signals import WATCH_SIGNAL


def test_slow_items_after_fast_ones_still_get_time_checkpoints(tmp_path: Path) -> None:
    fast, slow = 50_000, 25
    commits_at_slow_start = None
    with safepoint.resume("w", location=tmp_path, policy=safepoint.every(seconds=0.1)) as run:
        for i in run.iterate(range(fast + slow)):
            if i == fast:
                commits_at_slow_start = run.commits
            if i >= fast:
                time.sleep(0.02)  # 25 slow items: 0.5 s, about five 0.1 s periods
        commits_during_slow_phase = run.commits - commits_at_slow_start
    # Without the watchdog the whole slow phase sits inside one segment: no commit at all.
    assert commits_during_slow_phase >= 3


def test_the_watchdog_stops_and_puts_the_handler_back(tmp_path: Path) -> None:
    import signal

    before = signal.getsignal(WATCH_SIGNAL)
    with safepoint.resume("w", location=tmp_path, policy=safepoint.every(seconds=1)) as run:
        assert any(t.name == "safepoint-watchdog" for t in threading.enumerate())
        for _ in run.range(10):
            pass
    assert signal.getsignal(WATCH_SIGNAL) == before
    assert not any(t.name == "safepoint-watchdog" for t in threading.enumerate())


def test_count_policies_need_no_watchdog(tmp_path: Path) -> None:
    with safepoint.resume("w", location=tmp_path, policy=safepoint.every(items=10)) as run:
        assert not any(t.name == "safepoint-watchdog" for t in threading.enumerate())
        for _ in run.range(10):
            pass


def _looks(monkeypatch: pytest.MonkeyPatch, run_body: Callable[[], None]) -> int:
    """How many times the watchdog looked at the segment in progress during ``run_body``."""
    from safepoint.run.run import Run

    looks = [0]
    overdue = Run._segment_overdue

    def counted(self: Run) -> bool:
        looks[0] += 1
        return overdue(self)

    monkeypatch.setattr(Run, "_segment_overdue", counted)
    run_body()
    return looks[0]


def test_the_watchdog_sleeps_until_the_policy_could_be_due(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each look takes the GIL from the loop; before every(seconds=30) can be due, a cut
    # could not make it commit, so the watchdog does not look at all.
    def body(policy: Policy) -> None:
        with safepoint.resume("w", location=tmp_path, policy=policy, durable=False) as run:
            for _ in run.range(30):
                time.sleep(0.01)

    assert _looks(monkeypatch, lambda: body(safepoint.every(seconds=30))) == 0
    # a policy that cannot say when it is due is watched all along (every 50 ms)
    assert _looks(monkeypatch, lambda: body(as_policy(lambda tick: False))) >= 2


def test_slow_items_get_time_checkpoints_after_a_long_quiet_period(tmp_path: Path) -> None:
    # The watchdog wakes at the policy's deadline, then cuts a segment of slow items.
    fast, slow = 50_000, 30
    with safepoint.resume("w", location=tmp_path, policy=safepoint.every(seconds=0.2),
                          durable=False) as run:
        for i in run.iterate(range(fast + slow)):
            if i == fast:
                commits_at_slow_start = run.commits
            if i >= fast:
                time.sleep(0.03)  # 0.9 s of slow items: about four 0.2 s periods
        assert run.commits - commits_at_slow_start >= 2


class _BrokenDueAt(Policy):
    """A time policy whose due_at() fails: the watchdog then looks all along."""

    def __call__(self, tick: Tick) -> bool:
        return tick.now() - tick.last_checkpoint_at >= 0.1

    def horizon(self, since: int, position: int, total: int | None, fraction_at_last: float) -> int | None:
        return None

    def due_at(self, last_checkpoint_at: float) -> float | None:
        raise RuntimeError("a bug in a user's policy")


def test_a_policy_whose_due_at_fails_is_watched_all_along(tmp_path: Path) -> None:
    fast, slow = 50_000, 25
    with safepoint.resume("w", location=tmp_path, policy=_BrokenDueAt(), durable=False) as run:
        for i in run.iterate(range(fast + slow)):
            if i == fast:
                commits_at_slow_start = run.commits
            if i >= fast:
                time.sleep(0.02)
        assert run.commits - commits_at_slow_start >= 2
