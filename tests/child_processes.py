"""How the tests start child processes: from one fork server, never by forking pytest.

The pytest process has threads (numpy's BLAS pool, a moto server, dask, the lease
heartbeats and committers of earlier tests), and a process forked from a multi-threaded
one may inherit a lock that another thread held at that instant, which then never comes
free in the child (Python 3.12+ warns: "This process is multi-threaded, use of fork() may
lead to deadlocks in the child"). Python 3.14 also changes the default start method. So
every test child comes from :data:`CONTEXT`, ``multiprocessing``'s fork server named
explicitly: a fresh interpreter started once, that imports safepoint, numpy and the test
helpers (:mod:`child_preload`; with one BLAS thread, so that it has no thread but its
main one) and then forks each child from itself. A child starts in milliseconds, as a
child forked from pytest did, but from a process that has no other thread.

A child of the fork server shares nothing with the test but what it is given: the target
and its arguments are pickled (the target with cloudpickle, so a closure or a lambda
works; the arguments by ``multiprocessing``, so its pipes, values and plain data work).
The child starts in the test's working directory with the test's ``sys.path``, but sees
neither the test's ``os.environ`` changes nor its monkeypatched attributes: a setting a
child needs is an argument.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle

HERE = Path(__file__).resolve().parent
SRC = str(HERE.parent / "src")
PRELOAD = ["child_preload"]
SERVER_PATH = [SRC, str(HERE), str(HERE / "run"), str(HERE / "lease")]
"""Where the fork server finds safepoint and the helpers it preloads."""
IN_SERVER = "SAFEPOINT_TESTS_FORK_SERVER"
SERVER_ENVIRONMENT = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                      IN_SERVER: "1"}
"""One BLAS thread: numpy would otherwise start a pool in the server (children inherit it);
and a mark that the server and its children do not start a server of their own."""


def _context() -> Any:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    if not os.environ.get(IN_SERVER):
        _start_server()
    return context


def _start_server() -> None:
    """Start the fork server now (at collection, before any test changes the environment),
    with :data:`SERVER_PATH` on its ``PYTHONPATH`` (Python 3.11's fork server does not take
    the parent's ``sys.path``) and :data:`SERVER_ENVIRONMENT`."""
    changes = {**SERVER_ENVIRONMENT, "PYTHONPATH": os.pathsep.join(
        [*SERVER_PATH, *filter(None, [os.environ.get("PYTHONPATH")])])}
    saved = {key: os.environ.get(key) for key in changes}
    os.environ.update(changes)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


CONTEXT = _context()


def process(target: Callable[..., Any], *args: Any, daemon: bool = True) -> Any:
    """A child (a ``multiprocessing.Process``, not started) that runs ``target(*args)``."""
    return CONTEXT.Process(target=_call, args=(cloudpickle.dumps(target), *args), daemon=daemon)


def start(target: Callable[..., Any], *args: Any) -> Any:
    """Start a child running ``target(*args)``; the started process."""
    child = process(target, *args)
    child.start()
    return child


def _call(target: bytes, *args: Any) -> None:
    pickle.loads(target)(*args)


def server_pid() -> int | None:
    """The fork server's pid once it runs (the parent of every child), else None."""
    return getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
