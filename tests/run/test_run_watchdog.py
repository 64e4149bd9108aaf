"""A time policy is asked again soon after items suddenly become slow.

Segments are sized from the recent item rate; after 50,000 fast items a segment holds
thousands of items, which at 20 ms each would pass minutes without a time check. The
segment watchdog cuts such a segment after the item in progress.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import safepoint
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
