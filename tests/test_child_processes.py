"""The harness that starts the tests' child processes (child_processes.py): children come
from a fork server with a single thread, whatever threads pytest runs, and no fork of a
multi-threaded process happens (Python 3.12+ would warn, Python 3.14 changes the default)."""

from __future__ import annotations

import os
import sys
import threading
import warnings
from pathlib import Path

import pytest

from child_processes import CONTEXT, server_pid, start

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


def threads_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))


def report(conn, extra: int) -> None:
    """The child: its parent's pid, its parent's thread count, and a value of the test's."""
    conn.send((os.getppid(), threads_of(os.getppid()), extra + 1))


def test_children_come_from_a_single_threaded_fork_server_without_a_fork_warning() -> None:
    stop = threading.Event()
    busy = threading.Thread(target=stop.wait, daemon=True)  # pytest is multi-threaded now
    busy.start()
    offset = 41
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            parent, child = CONTEXT.Pipe()
            closure = lambda conn: report(conn, offset)  # noqa: E731  (pickled by value)
            process = start(closure, child)
            child.close()
            assert parent.poll(60), "the child did not report"
            forker, threads, value = parent.recv()
            process.join(60)
    finally:
        stop.set()
        busy.join()
    assert process.exitcode == 0
    assert value == 42
    assert forker == server_pid() != os.getpid()  # forked by the server, not by pytest
    assert threads == 1  # the server has no thread but its main one
    assert threads_of(os.getpid()) > 1
    assert not [w for w in caught if "fork" in str(w.message)], [str(w.message) for w in caught]
