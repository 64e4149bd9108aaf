"""The one signal path: SIGINT and SIGTERM (and SIGUSR1, which SLURM sends before a job's
end) stop work at the next boundary, not in the middle of an item.

A :class:`SignalGuard` is installed by whatever owns the boundaries: a run's loops, a task,
a flow, or a training loop's Checkpointer (``handle_preemption=True``). The first signal
only records itself, and the owner's ``defer`` callback says whether a boundary is coming
(it may cut the item segment short); when it is, the owner checkpoints there and stops with
:func:`stop_now`. A second signal stops at once, like an unhandled one: the previous
checkpoint stays. Where no boundary is coming, a signal stops at once too.

Handlers are installed only in the main thread (Python runs signal handlers there) and the
previous ones are put back when the owner is done.
"""

from __future__ import annotations

import _thread
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def stop_now(signum: int) -> BaseException:
    """The exception that stops the program for ``signum``."""
    if signum == signal.SIGINT:
        return KeyboardInterrupt()
    return SystemExit(128 + signum)


class SignalGuard:
    """Deferred handling of stop signals for one owner.

    ``defer(signum)`` returns whether the signal can wait for a boundary.
    """

    def __init__(self, defer: Callable[[int], bool], signals: Iterable[int] = STOP_SIGNALS) -> None:
        self.defer = defer
        self.signals = tuple(signals)
        self.pending: int | None = None
        """The first signal received."""
        self.stopped_at_once = False
        """A signal stopped the owner at once (a second one, or one with no boundary coming)."""
        self._previous: dict[int, Any] = {}

    def install(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.pending is None:
            self.pending = signum
            if self.defer(signum):
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

    Each look takes the GIL from the loop, which costs it about half a millisecond on a busy
    machine; ``watch_from()``, when given, returns the ``time.monotonic()`` reading before
    which no cut could matter (the policy cannot be due yet), and the thread sleeps until then.
    """

    def __init__(self, overdue: Callable[[], bool], cut: Callable[[], None], limit: float,
                 watch_from: Callable[[], float | None] | None = None) -> None:
        self.overdue, self.cut, self.limit, self.watch_from = overdue, cut, limit, watch_from
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
        while not self._stop.wait(self._until_next_look()):
            if time.monotonic() >= self._watch_from() and self.overdue():
                _thread.interrupt_main(WATCH_SIGNAL)

    def _watch_from(self) -> float:
        try:
            start = self.watch_from() if self.watch_from is not None else None
        except Exception:  # a policy's due_at() failed: look as if it could be due at any moment
            return -math.inf
        return start if start is not None else -math.inf

    def _until_next_look(self) -> float:
        return max(self.limit / 2, self._watch_from() - time.monotonic())

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self._stop.is_set():
            self.cut()


__all__ = ["PREEMPT_SIGNALS", "STOP_SIGNALS", "WATCH_SIGNAL", "SegmentWatchdog", "SignalGuard",
           "stop_now"]
