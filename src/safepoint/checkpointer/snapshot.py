"""Copy-on-write snapshots for asynchronous saves (``Checkpointer(snapshot="fork")``).

An asynchronous save must not let the caller's later changes reach the checkpoint. The
default (``snapshot="copy"``) copies the large arrays into reused buffers before returning,
which blocks the caller for about one memory copy of the state. ``snapshot="fork"`` does
what Redis's ``BGSAVE`` does: :func:`fork_save` calls ``os.fork()``; the operating system
shares every page between the two processes copy-on-write, so the child sees the state
frozen at that instant whatever the caller does next, and writes and commits it while the
caller goes on at once. The caller is blocked only for the ``fork()`` (page tables, not
pages).

A child forked from a multi-threaded process has only the forking thread; a lock that
another thread held at that instant stays held forever in the child. So the child runs only
code that takes no such lock: the local store's system calls, the format layer's encoding
and checksums, no thread pool (``write_checkpoint(parallel=False)``), no logging; the cyclic
garbage collector is off (no finalizer of the parent's objects runs in the child), every
signal the parent handles in Python is ignored (a Ctrl+C or a preemption signal aimed at the
process group does not cut the save short, as it would not cut the background thread of a
copy snapshot), and the child leaves through ``os._exit`` (no ``atexit``, no flush of the
parent's buffers). Its result, or its exception pickled with its traceback as text, comes
back through a pipe; :meth:`ForkedSave.wait` reaps the child and raises that exception, or
:class:`~safepoint.errors.SaveFailed` if the child died without a word.

Refused where that cannot hold: off Linux (Windows has no ``fork``; macOS's system
libraries are not fork-safe in threaded processes), for stores that are not
:attr:`~safepoint.store.Store.fork_safe` (an fsspec client's event-loop thread and its open
connections do not survive a fork), and for arrays in device memory (the format layer's
``host_only``). Memory that is *shared* rather than private (``MAP_SHARED``: an anonymous
shared map, a tensor after ``share_memory_()``, a writable ``np.memmap``) is not
copy-on-write: the child would see the caller's changes, so such blobs are copied before
the fork, as a copy snapshot would (:func:`shared_blobs`).
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import os
import pickle
import signal
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from safepoint.errors import SafepointError, SaveFailed
from safepoint.format.write import Prepared
from safepoint.store import Store

Snapshot = Literal["copy", "fork"]
"""How an asynchronous save freezes the state: a copy into buffers, or a forked process."""

_CHILD_FAILED = 70  # the child's exit status after it reported an error (EX_SOFTWARE)


def check_snapshot(snapshot: Any, store: Store) -> Snapshot:
    """Validate ``snapshot``; refuse ``"fork"`` where a forked writer is not safe."""
    if snapshot not in ("copy", "fork"):
        raise ValueError(f"snapshot must be 'copy' or 'fork', not {snapshot!r}")
    if snapshot == "copy":
        return "copy"
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        raise SafepointError(
            f"snapshot='fork' needs Linux, not {sys.platform}: Windows has no fork(), and "
            "macOS's system libraries are not safe in a process forked from a threaded one; "
            "use snapshot='copy' (the default)")
    if not store.fork_safe:
        raise SafepointError(
            f"snapshot='fork' needs a local-directory store, not {store.url}: the client of "
            f"this store ({type(store).__name__}: an event-loop thread, open connections) "
            "does not survive a fork(); use snapshot='copy' (the default)")
    return "fork"


# ---------------------------------------------------------------- shared memory


def _shared_maps() -> list[tuple[int, int]]:
    """The address ranges of this process's shared mappings (``MAP_SHARED``), sorted."""
    ranges: list[tuple[int, int]] = []
    with open("/proc/self/maps", "rb") as maps:
        for line in maps:
            span, perms = line.split(b" ", 2)[:2]
            if perms[3:4] == b"s":
                start, _, end = span.partition(b"-")
                ranges.append((int(start, 16), int(end, 16)))
    ranges.sort()
    return ranges


def shared_blobs(prepared: Prepared) -> list[int]:
    """Indices of the blobs whose memory lies (partly) in a shared mapping: a forked child
    would see the caller's later changes to them, so they must be copied first."""
    if not prepared.blobs:
        return []
    try:
        ranges = _shared_maps()
    except OSError:  # no /proc (a sandbox): assume every blob may be shared, and copy it
        return list(range(len(prepared.blobs)))
    if not ranges:
        return []
    starts = [start for start, _ in ranges]
    found = []
    for index, blob in enumerate(prepared.blobs):
        low = np.frombuffer(blob.data, np.uint8).ctypes.data
        # maps are sorted and disjoint: only the last one starting below the blob's end
        # can reach into it
        at = bisect.bisect_right(starts, low + blob.data.nbytes - 1) - 1
        if at >= 0 and ranges[at][1] > low:
            found.append(index)
    return found


# ------------------------------------------------------------------ the child


class ForkedSave:
    """A forked snapshot process writing one save; :meth:`wait` reaps it."""

    def __init__(self, pid: int, report_fd: int, what: str) -> None:
        self.pid = pid
        self.what = what
        self._fd: int | None = report_fd

    def wait(self) -> Any:
        """Wait for the child to exit; its result, or its error raised here."""
        chunks = []
        fd, self._fd = self._fd, None
        if fd is None:
            raise RuntimeError(f"the snapshot process of {self.what} was waited for already")
        try:
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
        finally:
            os.close(fd)
            _, status = os.waitpid(self.pid, 0)
        data = b"".join(chunks)
        if not data:
            raise SaveFailed(f"{self.what}: the snapshot process (pid {self.pid}) "
                             f"{_describe_status(status)} before it reported; the save may not "
                             "have been committed (the previous checkpoints are untouched)")
        kind, value, detail = pickle.loads(data)  # from our own child: trusted
        if kind == "ok":
            return value
        if isinstance(value, BaseException):
            value.add_note(f"(raised in the snapshot process, pid {self.pid})\n{detail}")
            raise value
        raise SaveFailed(f"{self.what}: the snapshot process failed: {value}\n{detail}")


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(number).name}"
        return f"was killed by signal {number}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def fork_save(work: Callable[[], Any], what: str) -> ForkedSave:
    """Run ``work()`` in a forked child; returns at once with a handle to wait on.

    ``work`` runs in the child only, where it must take no lock another thread may hold
    (see the module's documentation); its result must pickle."""
    read_fd, write_fd = os.pipe()
    try:
        with warnings.catch_warnings():  # 3.12+: "This process is multi-threaded, use of
            # fork() may lead to deadlocks in the child"; the child here takes no lock
            warnings.filterwarnings("ignore", category=DeprecationWarning,
                                    message=r".*multi-threaded.*fork\(\)")
            pid = os.fork()
    except OSError as exc:
        os.close(read_fd)
        os.close(write_fd)
        raise SaveFailed(f"{what}: could not fork the snapshot process ({exc}); nothing was "
                         "written; use snapshot='copy'", errno=exc.errno) from exc
    if pid == 0:  # the child: never returns
        _child(work, read_fd, write_fd)
    os.close(write_fd)
    return ForkedSave(pid, read_fd, what)


def _child(work: Callable[[], Any], read_fd: int, write_fd: int) -> None:
    status = _CHILD_FAILED
    try:
        gc.disable()  # no collection: no finalizer of the parent's objects runs here
        os.close(read_fd)
        for number in signal.valid_signals():
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                if callable(signal.getsignal(number)):  # handled in Python by the parent
                    signal.signal(number, signal.SIG_IGN)
        try:
            report = pickle.dumps(("ok", work(), ""))
            status = 0
        except BaseException as exc:
            detail = "".join(traceback.format_exception(exc))
            try:
                report = pickle.dumps(("error", exc, detail))
            except Exception:  # an exception that does not pickle: its text
                report = pickle.dumps(("error", f"{type(exc).__name__}: {exc}", detail))
        view = memoryview(report)
        while view:
            view = view[os.write(write_fd, view):]
    except BaseException:
        pass  # the parent finds no complete report and says how the child ended
    finally:
        os._exit(status)


def parent_alive(pid: int) -> Callable[[], None]:
    """A check for the child, at its commit point: the process that started the save still
    lives (once it died, a restarted writer may have restored the step before: committing
    a newer one behind its back would make its next save of that step collide)."""
    def check() -> None:
        if os.getppid() != pid:
            raise SaveFailed(f"the process that started this save (pid {pid}) died before "
                             "the save was committed; it is abandoned")
    return check


__all__ = ["ForkedSave", "Snapshot", "check_snapshot", "fork_save", "parent_alive",
           "shared_blobs"]
