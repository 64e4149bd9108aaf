"""The one background committer: writes commits inline, or on a background thread.

It serves a run's commits (``commit="async"``) and the Checkpointer's asynchronous saves
(``save(blocking=False)``). In the background mode the caller hands a job over and goes on
at once; it gets a :class:`Pending` handle to wait on. At most one job is being written and
at most one waits. With ``coalesce`` a newer job replaces the waiting one (a run: only the
newest state matters), and the replaced job's handle completes as superseded; without it
the caller waits for the waiting slot (every save must land). The thread exists only while
there is work, so an idle committer never keeps the interpreter from exiting, and a job in
flight always completes before it does (the thread is not a daemon).

An error in the background is kept and raised by the next :meth:`Committer.check`,
:meth:`Committer.flush` or the job's :meth:`Pending.wait`, and logged at once (ERROR on the
``safepoint`` logger), so that nothing fails silently; after a failed job nothing more is
written until the error has been raised.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from safepoint.errors import logger

log = logger("commit")


class Pending:
    """A handle to one commit in flight (like torchsnapshot's ``PendingSnapshot``)."""

    def __init__(self, tag: Any = None) -> None:
        self.tag = tag
        """What the job is (a step number, a run record)."""
        self.superseded = False
        """A newer commit replaced this one before it was written (coalescing)."""
        self._done = threading.Event()
        self._error: BaseException | None = None

    def done(self) -> bool:
        """Whether the commit was written (or failed, or was superseded)."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the commit is written; raise its error if it failed."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"the commit of {self.tag!r} is still in flight")
        if self._error is not None:
            raise self._error

    def _finish(self, error: BaseException | None = None) -> None:
        self._error = error
        self._done.set()

    def __repr__(self) -> str:
        state = "done" if self.done() else "in flight"
        return f"<Pending {self.tag!r} {state}>"


class Committer:
    """Runs commit jobs; see the module's documentation."""

    def __init__(self, *, background: bool, coalesce: bool = False, name: str = "safepoint",
                 what: str = "background commit") -> None:
        self.background = background
        self.coalesce = coalesce
        self.name = name
        self.what = what
        """How a failure is named in the log: "the <what> of 'name' failed"."""
        self.commits = 0
        """Jobs written."""
        self.seconds = 0.0
        """Time spent writing them."""
        self.last: Any = None
        """The tag of the newest job written."""
        self.error: BaseException | None = None
        self._waiting: tuple[Callable[[], Any], Pending] | None = None
        self._busy = False
        self._running = False  # a worker thread exists
        self._closed = False
        self._cond = threading.Condition(threading.Lock())

    def _write(self, job: Callable[[], Any], pending: Pending) -> None:
        started = time.perf_counter()
        job()
        self.seconds += time.perf_counter() - started
        self.commits += 1
        self.last = pending.tag

    def submit(self, job: Callable[[], Any], tag: Any = None) -> Pending:
        """Write ``job`` now, or hand it to the background thread; its handle."""
        pending = Pending(tag)
        if not self.background:
            try:
                self._write(job, pending)
            except BaseException as exc:
                pending._finish(exc)
                raise
            pending._finish()
            return pending
        with self._cond:
            if self._closed:
                raise RuntimeError(f"the committer of {self.name!r} is closed")
            if self._waiting is not None:
                if self.coalesce:
                    _, replaced = self._waiting
                    replaced.superseded = True
                    replaced._finish()
                else:
                    while self._waiting is not None and self.error is None:
                        self._cond.wait()
            self._waiting = (job, pending)
            if not self._running:
                self._running = True
                threading.Thread(target=self._work, name=f"safepoint-commit-{self.name}").start()
            else:
                self._cond.notify_all()
        return pending

    def _work(self) -> None:
        while True:
            with self._cond:
                if self._waiting is None or self.error is not None:
                    if self._waiting is not None:  # never commit past a failed commit
                        self._waiting[1]._finish(self.error)
                        self._waiting = None
                    self._running = False
                    self._cond.notify_all()
                    return
                (job, pending), self._waiting = self._waiting, None
                self._busy = True
                self._cond.notify_all()
            try:
                self._write(job, pending)
            except BaseException as exc:
                log.error("safepoint: the %s of %r failed: %s", self.what, self.name, exc)
                with self._cond:
                    self.error = self.error or exc
                pending._finish(exc)
            else:
                pending._finish()
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def check(self) -> None:
        """Raise the error of a background job, if one failed (once). A job handed over
        before the error is raised is dropped with it, never written after it."""
        with self._cond:
            error, self.error = self.error, None
            if error is not None and self._waiting is not None:
                self._waiting[1]._finish(error)
                self._waiting = None
                self._cond.notify_all()
        if error is not None:
            raise error

    def flush(self) -> None:
        """Wait until every job handed over is written; raise a background error."""
        if self.background:
            with self._cond:
                while (self._waiting is not None or self._busy) and self.error is None:
                    self._cond.wait()
        self.check()

    @property
    def idle(self) -> bool:
        return self._waiting is None and not self._busy

    def close(self, *, discard: bool = False) -> None:
        """Finish what was handed over (``discard``: drop the waiting job, and do not wait
        for the one being written)."""
        with self._cond:
            if discard and self._waiting is not None:
                self._waiting[1]._finish()
                self._waiting = None
            self._closed = True
        if not discard:
            with self._cond:
                while self._waiting is not None or self._busy:
                    self._cond.wait()


__all__ = ["Committer", "Pending"]
