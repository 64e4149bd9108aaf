"""Pausing Python's cyclic garbage collector while a save or a restore builds many objects.

Encoding 10,000 arrays makes some 50,000 small dicts and lists (nodes, blob entries, byte
ranges). That many new containers start collections that walk them all, and a full one
walks every object of the process: with 10,000 arrays held, 20 to 70 ms of a 150 ms save,
though nothing a save or a restore makes is garbage in a cycle. So a blocking
``Checkpointer.save`` and every ``restore`` run with the collector paused from start to end
(what they make dies with them, or is the returned state), and the CPU-bound parts of a
save written in the background (encoding, the manifest) pause it too, but not its waits on
the writes, while the caller goes on making garbage of its own. msgpack advises the same
for large unpacks. Nested and concurrent pauses share one count: the collector is enabled
again when the last one ends, if it was enabled before the first. A forked child keeps only
the forking thread's pauses. :data:`~safepoint.knobs.PAUSE_GC` turns it off.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from safepoint import knobs

_lock = threading.Lock()
_pauses: dict[int, int] = {}  # thread ident -> how many pauses it is in
_resume = False  # was the collector enabled when the first pause began?


@contextmanager
def collector_paused() -> Iterator[None]:
    """Run the block with the cyclic collector paused (reference counting goes on)."""
    global _resume
    if not knobs.PAUSE_GC:
        yield
        return
    me = threading.get_ident()
    with _lock:
        if not _pauses:
            _resume = gc.isenabled()
            gc.disable()
        _pauses[me] = _pauses.get(me, 0) + 1
    try:
        yield
    finally:
        with _lock:
            _pauses[me] -= 1
            if not _pauses[me]:
                del _pauses[me]
            if not _pauses and _resume:
                gc.enable()


def _after_fork_in_child() -> None:
    """Only the forking thread lives on in a child: the pauses of the others never end
    there, so they are dropped (and the collector enabled again if they were all)."""
    global _lock
    _lock = threading.Lock()
    me = threading.get_ident()
    for ident in [i for i in _pauses if i != me]:
        del _pauses[ident]
    if not _pauses and _resume:
        gc.enable()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


__all__ = ["collector_paused"]
