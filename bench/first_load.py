"""One first load in a fresh process: ``python -m bench.first_load METHOD PATH``.

What a resumed job pays to read its state back: the process has imported what it needs
(imports are not timed, they cost the same whatever the checkpoint), then makes the first
load of its life, of a 1 GiB state from a warm page cache. Prints the seconds it took.
``METHOD`` is ``safepoint`` (``Checkpointer(...).restore()``, the checkpointer created in
the timing) or a peer's loader name from :func:`bench.bench_core.peers`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any


class _Notes:
    """Stands in for a report section: the parent already noted which peers are missing."""

    def note(self, text: str) -> None:
        pass


def _touch(state: Any) -> None:
    """Fail if the load handed back anything but whole arrays (a lazy load would be cheating)."""
    for value in state.values():
        if not getattr(value, "nbytes", 0):
            raise SystemExit(f"first_load: not an array: {type(value).__name__}")


def main(method: str, path: Path) -> float:
    if method == "safepoint":
        from safepoint import Checkpointer

        start = time.perf_counter()
        state = Checkpointer("load", location=path).restore().state
    else:
        from bench.bench_core import peers

        loader = {peer.loader: peer.load for peer in peers(_Notes())}[method]  # type: ignore[arg-type]
        start = time.perf_counter()
        state = loader(path)
    elapsed = time.perf_counter() - start
    _touch(state)
    return elapsed


if __name__ == "__main__":
    print(f"{main(sys.argv[1], Path(sys.argv[2])):.6f}")
