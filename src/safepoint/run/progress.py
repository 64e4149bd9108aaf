"""A rich progress bar for a run's loop, showing where a resumed run started.

For ``run.lines`` the bar measures bytes of the file (the number of lines is not known in
advance) and shows the count of lines beside it.
"""

from __future__ import annotations

import sys
from typing import Any

from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from safepoint.run.lines import LineSource

REFRESH = 0.1
"""Seconds between two updates of the bar by the loop."""


def wanted(progress: bool | None, total_known: bool) -> bool:
    """``progress=True`` always; ``None``: when the length is known and stdout is a terminal."""
    if progress is None:
        return total_known and sys.stdout.isatty()
    return bool(progress)


class ProgressBar:
    """The bar of one loop over ``source``."""

    def __init__(self, name: str, source: Any, position: int) -> None:
        self.source = source
        self.lines = isinstance(source, LineSource)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[count]}"),
            TimeRemainingColumn(),
        )
        description = name
        if position:
            description += f" [dim](resumed at {source.fraction_at(position) or 0:.0%})[/dim]"
        total = source.size if self.lines else source.total
        self._task = self._progress.add_task(description, total=total, count="")
        self.update(position)
        self._progress.start()

    @classmethod
    def open(cls, progress: bool | None, name: str, source: Any, position: int) -> ProgressBar | None:
        """A bar, or None when none is wanted (see :func:`wanted`)."""
        total = source.size if isinstance(source, LineSource) else source.total
        return cls(name, source, position) if wanted(progress, total is not None) else None

    def update(self, position: int) -> None:
        completed = self.source.offset_at(position) if self.lines else position
        unit = "lines" if self.lines else "items"
        self._progress.update(self._task, completed=completed, count=f"{position:,} {unit}")

    def close(self, position: int) -> None:
        self.update(position)
        self._progress.stop()


__all__ = ["REFRESH", "ProgressBar", "wanted"]
