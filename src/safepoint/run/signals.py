"""Graceful interruption: SIGINT and SIGTERM stop a run at the next item boundary.

While a run's loop is active, the first signal only sets a flag and cuts the loop's current
segment short; when the item in progress is done, the run checkpoints and then raises
``KeyboardInterrupt`` (SIGINT) or exits with ``SystemExit(143)`` (SIGTERM, 128 + 15). A second
signal stops at once, like an unhandled one: the previous checkpoint stays. Outside a loop
(no boundary is coming) a signal stops at once too.

Handlers are installed only in the main thread (Python runs signal handlers there) and the
previous ones are put back when the run ends.
"""

from __future__ import annotations

import _thread
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop_now(signum: int) -> BaseException:
    """The exception that stops the program for ``signum``."""
    if signum == signal.SIGINT:
        return KeyboardInterrupt()
    return SystemExit(128 + signum)


class Interrupts:
    """Signal handling for one run.

    ``defer()`` returns whether the signal can wait for a boundary (a loop is active), and
    cuts that loop's segment short.
    """

    def __init__(self, defer: Callable[[], bool]) -> None:
        self.defer = defer
        self.pending: int | None = None
        """The first signal received."""
        self.stopped_at_once = False
        """A signal stopped the run at once (a second one, or one outside a loop)."""
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.pending is None:
            self.pending = signum
            if self.defer():
                return
        self.stopped_at_once = True
        raise stop_now(signum)


WATCH_SIGNAL = signal.SIGURG
"""The signal number whose Python handler the watchdog runs (ignored by default; the
watchdog sends no OS signal: ``_thread.interrupt_main`` only runs the handler)."""


class SegmentWatchdog:
    """Ends a loop segment that runs far longer than planned, so that time-based policies
    are asked again within about ``limit`` seconds even when items suddenly get slow.

    Segments are sized from the recent item rate to last about 2 ms, and a policy is asked
    only between segments; after thousands of fast items, thousands of slow ones could pass
    before the next boundary. This daemon thread looks every ``limit / 2`` seconds and, when
    ``overdue()`` says so, has the main thread run ``cut()`` between two bytecodes (after the
    item in progress) — the same safe path a Ctrl+C takes. Main thread only, like signals.
    """

    def __init__(self, overdue: Callable[[], bool], cut: Callable[[], None], limit: float) -> None:
        self.overdue, self.cut, self.limit = overdue, cut, limit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous: Any = None

    def start(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.signal(WATCH_SIGNAL, self._handle)
        self._thread = threading.Thread(target=self._watch, name="safepoint-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        signal.signal(WATCH_SIGNAL, self._previous if self._previous is not None else signal.SIG_DFL)

    def _watch(self) -> None:
        while not self._stop.wait(self.limit / 2):
            if self.overdue():
                _thread.interrupt_main(WATCH_SIGNAL)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self._stop.is_set():
            self.cut()


__all__ = ["SIGNALS", "WATCH_SIGNAL", "Interrupts", "SegmentWatchdog", "stop_now"]
