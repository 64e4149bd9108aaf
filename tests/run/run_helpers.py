"""Helpers for the run tests: number files, reading a run's checkpoint, child workers."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import child_processes
from child_processes import CONTEXT
from safepoint.checkpointer import Checkpointer
from safepoint.format.tree import decode_inline
from safepoint.run.log import read_log
from safepoint.run.record import Record
from safepoint.store import open_store


class Boom(Exception):
    """Raised by a test to leave a run block with an error (so it is not complete)."""


def write_numbers(path: Path, count: int, seed: int = 0) -> list[int]:
    """``count`` random integers, one per line; returns them."""
    rng = random.Random(seed)
    values = [rng.randint(-(10**9), 10**9) for _ in range(count)]
    path.write_text("\n".join(map(str, values)) + "\n")
    return values


@dataclass
class Saved:
    """The newest checkpoint of a run: its record and its state."""

    record: Record
    state: dict[str, Any]


def saved(store: Path | str, name: str) -> Saved | None:
    """The newest checkpoint of run ``name`` (record and state), as a resume would see it."""
    opened = open_store(store)
    record = read_log(opened, name).state
    if record is None:
        return None
    tree = record.tree or {"node": {}}
    if "node" in tree:
        state = decode_inline(tree["node"])
    else:
        state = Checkpointer(name, location=opened).restore(tree["checkpoint"]).state
    return Saved(record, state)


def start_child(target: Callable[..., Any], *args: Any) -> tuple[Any, Any]:
    """Start a child running ``target(conn, *args)``; returns (process, parent end of a pipe).

    The child is forked by the tests' fork server (child_processes.py), so it starts in
    milliseconds (the crash tests kill hundreds) from a process without threads. It is a
    real process; SIGKILL gives it no chance to clean up.
    """
    parent, child = CONTEXT.Pipe()
    process = child_processes.start(target, child, *args)
    child.close()
    return process, parent
