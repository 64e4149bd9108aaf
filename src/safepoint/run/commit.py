"""Writing commits: inline (``commit="sync"``) or on a background thread (``"async"``).

In the background mode the loop hands a commit over and goes on at once. At most one
commit is being written and at most one waits; a newer commit replaces the waiting one
(they coalesce: only the newest state matters). After a crash the run resumes from the
last commit whose write had finished, so it loses at most the one being written and the
one waiting. An error in the background is raised at the next item boundary, by
``run.checkpoint()``, or when the run ends; those last two also wait for every write.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from safepoint.run.persist import Commit, Record


class Committer:
    """Runs each commit's write, and keeps count of them."""

    def __init__(self, write: Callable[[Commit], None], *, background: bool, name: str) -> None:
        self._write_fn = write
        self.background = background
        self.commits = 0
        """Commits written."""
        self.seconds = 0.0
        """Time spent writing them."""
        self.durable: Record | None = None
        """The record of the newest commit written."""
        self.error: BaseException | None = None
        self._pending: Commit | None = None
        self._busy = False
        self._idle = False  # the thread waits for a commit
        self._closing = False
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._work, name=f"safepoint-commit-{name}", daemon=True)
            self._thread.start()

    def _write(self, commit: Commit) -> None:
        started = time.perf_counter()
        self._write_fn(commit)
        self.seconds += time.perf_counter() - started
        self.commits += 1
        self.durable = commit.record

    def submit(self, commit: Commit) -> None:
        """Write ``commit`` now, or hand it to the background thread."""
        if self._thread is None:
            self._write(commit)
            return
        with self._cond:
            self._pending = commit
            if self._idle:  # a busy thread takes the newest commit when it is done
                self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closing:
                    self._idle = True
                    self._cond.wait()
                    self._idle = False
                if self._pending is None:
                    return
                commit, self._pending = self._pending, None
                if self.error is not None:  # never commit past a failed commit
                    continue
                self._busy = True
            try:
                self._write(commit)
            except BaseException as exc:
                with self._cond:
                    self.error = self.error or exc
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def check(self) -> None:
        """Raise the error of a background write, if one failed."""
        error, self.error = self.error, None
        if error is not None:
            raise error

    def flush(self) -> None:
        """Wait until every commit handed over is written; raise a background error."""
        if self._thread is not None:
            with self._cond:
                while (self._pending is not None or self._busy) and self.error is None:
                    self._cond.wait()
        self.check()

    def close(self, *, discard: bool = False) -> None:
        """Stop the background thread once it has written what it holds; with ``discard``,
        drop the waiting commit and do not wait for the one being written."""
        if self._thread is not None:
            with self._cond:
                self._closing = True
                if discard:
                    self._pending = None
                self._cond.notify_all()
            if not discard:
                self._thread.join()
            self._thread = None


__all__ = ["Committer"]
