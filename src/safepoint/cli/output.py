"""What the command line prints: consoles, one-line errors, human sizes and ages."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape


def out() -> Console:
    """A console on the current stdout (looked up at each call, so test runners can capture)."""
    return Console(file=sys.stdout, highlight=False)


def err() -> Console:
    """A console on the current stderr, for errors and notices."""
    return Console(file=sys.stderr, highlight=False)


def print_error(message: str) -> None:
    """One red line on stderr, never wrapped."""
    err().print(f"[bold red]error:[/] [red]{escape(message)}[/]", soft_wrap=True)


def print_json(value: Any) -> None:
    """``value`` as indented JSON on stdout, plain (no colour codes) so tools can parse it."""
    sys.stdout.write(json.dumps(value, indent=2, allow_nan=True, default=str) + "\n")


def human_bytes(size: int | None) -> str:
    """``1536`` -> ``"1.5 KiB"``; None -> ``"-"``."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float | None) -> str:
    """How long ago, in words: ``"just now"``, ``"3 min ago"``, ``"2 days ago"``."""
    if seconds is None:
        return "-"
    if seconds < 0:
        return "in the future"  # a clock skew between machines sharing a store
    if seconds < 5:
        return "just now"
    for limit, size, unit in ((60, 1, "s"), (3600, 60, "min"), (86400, 3600, "h")):
        if seconds < limit:
            return f"{int(seconds // size)} {unit} ago"
    days = int(seconds // 86400)
    return f"{days} day ago" if days == 1 else f"{days} days ago"


def human_progress(progress: float | None) -> str:
    """``0.421`` -> ``"42%"``; None -> ``"-"``."""
    if progress is None:
        return "-"
    return f"{progress * 100:.0f}%"
