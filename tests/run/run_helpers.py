"""Helpers for the run tests: number files, reading a run's checkpoint, forked workers."""

from __future__ import annotations

import multiprocessing
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safepoint.run.persist import Loaded, RunStore
from safepoint.store import open_store


class Boom(Exception):
    """Raised by a test to leave a run block with an error (so it is not complete)."""


def write_numbers(path: Path, count: int, seed: int = 0) -> list[int]:
    """``count`` random integers, one per line; returns them."""
    rng = random.Random(seed)
    values = [rng.randint(-(10**9), 10**9) for _ in range(count)]
    path.write_text("\n".join(map(str, values)) + "\n")
    return values


def saved(store: Path | str, name: str) -> Loaded | None:
    """The newest checkpoint of run ``name`` (record and state), as a resume would see it."""
    run_store = RunStore(open_store(store), name, durable=False)
    try:
        return run_store.open()
    finally:
        run_store.close()


FORK = multiprocessing.get_context("fork")


def start_child(target: Callable[..., Any], *args: Any) -> tuple[Any, Any]:
    """Fork a child running ``target(conn, *args)``; returns (process, parent end of a pipe).

    Forking (not spawning) makes a child start in milliseconds: the crash tests kill
    hundreds of them. The child is a real process; SIGKILL gives it no chance to clean up.
    """
    parent, child = FORK.Pipe()
    process = FORK.Process(target=target, args=(child, *args), daemon=True)
    process.start()
    child.close()
    return process, parent
