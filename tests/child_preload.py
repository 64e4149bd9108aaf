"""What the tests' fork server imports before it forks any child (see child_processes.py):
what the children run, so that a child starts without importing it. The server starts with
one BLAS thread, so that numpy starts no thread pool in it."""

from __future__ import annotations

import cloudpickle  # noqa: F401
import numpy  # noqa: F401
import pytest  # noqa: F401

import safepoint
import safepoint.flow
import safepoint.run
import safepoint.tasks  # noqa: F401

for _helper in ("crash_sweep", "run_helpers", "lease_support"):
    try:  # on SERVER_PATH (lease_support needs dask, say, which a venv may lack)
        __import__(_helper)
    except ImportError:
        pass
