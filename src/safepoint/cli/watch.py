"""``safepoint watch``: a live view of every run, task, flow and checkpoint name in a store.

Each refresh reads what ``ls`` reads (one record per name, and its lease), so it is as cheap
on a shared store as ``ls`` every ``--interval`` seconds. Rates and ETAs come from what this
watch saw change between refreshes: the first frame (and ``--once``) has none.
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Annotated, Any

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from safepoint.cli import app
from safepoint.cli.catalog import NameSummary, summarize_store
from safepoint.cli.common import (
    JsonOption,
    LocationArgument,
    LocationOption,
    describe_failure,
    open_location,
    pick_location,
)
from safepoint.cli.inspect import owner_text, short_age
from safepoint.cli.output import out, print_json
from safepoint.cli.tables import Column, fit
from safepoint.store import Store

WINDOW = 60.0
"""Seconds of history a rate is measured over."""
BAR = 10
"""Width of a progress bar, in characters."""

COLUMNS = (
    Column("name", wrap=True, min_width=10),
    Column("kind", drop=3),
    Column("status"),
    Column("progress", justify="right"),
    Column("rate", justify="right", drop=2),
    Column("eta", justify="right", drop=4),
    Column("saved", justify="right", drop=1),
)
DETAIL_COLUMNS = (
    Column("name", wrap=True, min_width=10),
    Column("attempt", justify="right"),
    Column("owner", wrap=True, min_width=12),
    Column("last error", wrap=True, min_width=16),
)
_STATUS_STYLE = {"running": "green", "stale": "bold red", "complete": "blue", "idle": "yellow"}


@dataclass
class Speed:
    """How fast a name moves: ``rate`` units per second (items of an execution's loop, or
    checkpoint steps), ``eta`` seconds left (when its progress is known)."""

    rate: float | None = None
    eta: float | None = None
    unit: str = "items"


class Tracker:
    """What changed since earlier refreshes, per name: (commit time, position, progress)."""

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self._seen: dict[str, deque[tuple[float, float, float | None]]] = {}

    def speed(self, s: NameSummary, now: float) -> Speed:
        unit = "steps" if s.kind == "checkpoint" else "items"
        position = s.latest_step if s.kind == "checkpoint" else s.position
        if s.updated is None or position is None or s.complete:
            self._seen.pop(s.name, None)
            return Speed(unit=unit)
        history = self._seen.setdefault(s.name, deque())
        if history and (position < history[-1][1] or s.updated < history[-1][0]):
            history.clear()  # a new loop, a new attempt from an earlier point: start over
        if not history or s.updated > history[-1][0]:
            history.append((s.updated, float(position), s.progress))
        while len(history) > 2 and history[-1][0] - history[1][0] >= self.window:
            history.popleft()
        if len(history) < 2:
            return Speed(unit=unit)
        (t0, p0, f0), (t1, p1, f1) = history[0], history[-1]
        rate = (p1 - p0) / (t1 - t0)
        eta = None
        if f0 is not None and f1 is not None and f1 > f0:
            eta = max(0.0, (1 - f1) * (t1 - t0) / (f1 - f0) - (now - t1))
        return Speed(rate=rate, eta=eta, unit=unit)


def rate_text(speed: Speed) -> str:
    """``12/s``, ``1.5k/s``, ``3.0/min``; ``-`` when unknown."""
    rate = speed.rate
    if rate is None:
        return "-"
    for per, factor in (("s", 1), ("min", 60), ("h", 3600)):
        value = rate * factor
        if value >= 1 or per == "h":
            if value >= 10_000:
                return f"{value / 1000:.0f}k/{per}"
            if value >= 1000:
                return f"{value / 1000:.1f}k/{per}"
            return f"{value:.0f}/{per}" if value >= 10 else f"{value:.1f}/{per}"
    raise AssertionError("unreachable")


def eta_text(seconds: float | None) -> str:
    """``45 s``, ``12 min``, ``3.5 h``, ``4 days``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def progress_cell(s: NameSummary) -> str:
    """A bar and a percentage when the fraction is known, else where it is."""
    if s.kind == "checkpoint":
        return "-" if s.latest_step is None else f"step {s.latest_step}"
    fraction = 1.0 if s.complete else s.progress
    if fraction is None:
        return "-" if s.position is None else f"at {s.position:,}"
    fraction = min(1.0, max(0.0, fraction))
    done = round(fraction * BAR)
    return (f"[green]{'━' * done}[/][dim]{'─' * (BAR - done)}[/] "
            f"{fraction * 100:3.0f}%")


def _status(s: NameSummary) -> str:
    style = _STATUS_STYLE.get(s.status)
    return f"[{style}]{escape(s.status)}[/]" if style else escape(s.status)


def frame(store: Store, summaries: list[NameSummary], speeds: dict[str, Speed], now: float,
          width: int, interval: float | None, problem: str | None = None) -> RenderableType:
    """One screen of ``watch``: a header, a row per name, who writes each and its error."""
    counts: dict[str, int] = {}
    for s in summaries:
        counts[s.status] = counts.get(s.status, 0) + 1
    tally = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()) if status != "-")
    what = f"{len(summaries)} name{'' if len(summaries) == 1 else 's'}" + (
        f": {tally}" if tally else "")
    clock = time.strftime("%H:%M:%S", time.localtime(now))
    every = "" if interval is None else f", every {interval:g} s (Ctrl+C quits)"
    parts: list[RenderableType] = [
        Text.from_markup(f"[bold]safepoint watch[/] {escape(store.url)}", overflow="fold"),
        Text(f"{what}; {clock}{every}", overflow="fold"),
    ]
    if problem:
        parts.append(Text(f"cannot refresh: {problem}", style="red", overflow="fold"))
    if not summaries:
        parts.append(Text("no checkpoints yet", style="dim"))
        return Group(*parts)
    rows = [[escape(s.name), s.kind, _status(s), progress_cell(s), rate_text(speeds[s.name]),
             eta_text(speeds[s.name].eta), short_age(s.updated, now)] for s in summaries]
    table, _ = fit(None, COLUMNS, rows, width)
    parts += [Text(), table]
    details = [[escape(s.name), "-" if s.attempt is None else str(s.attempt),
                escape(owner_text(s.owner)), f"[red]{escape(s.error)}[/]" if s.error else ""]
               for s in summaries if s.owner or s.error or s.attempt]
    if details:
        detail_table, _ = fit(None, DETAIL_COLUMNS, details, width)
        parts += [Text(), detail_table]
    return Group(*parts)


def snapshot(store: Store, summaries: list[NameSummary], speeds: dict[str, Speed],
             now: float) -> dict[str, Any]:
    """The ``--json`` form of one refresh."""
    names = []
    for s in summaries:
        speed = speeds[s.name]
        names.append({**asdict(s), "age": None if s.updated is None else now - s.updated,
                      "rate": speed.rate, "rate_unit": speed.unit, "eta": speed.eta})
    return {"location": store.url, "time": now, "names": names}


@app.command()
def watch(
    location_argument: LocationArgument = None,
    location: LocationOption = None,
    interval: Annotated[float, typer.Option(
        "--interval", "-n", min=0.1, help="Seconds between refreshes.")] = 2.0,
    once: Annotated[bool, typer.Option(
        "--once", help="Print one frame and exit (for scripts and logs).")] = False,
    as_json: JsonOption = False,
) -> None:
    """Watch every run, task, flow and checkpoint in a store live: progress, rate, ETA,
    status (running, stale, idle, complete), attempt, owner, last save and last error."""
    store = open_location(pick_location(location_argument, location))
    console = out()
    tracker = Tracker()
    state: dict[str, Any] = {"summaries": summarize_store(store), "problem": None}

    def refresh() -> None:
        try:
            state["summaries"], state["problem"] = summarize_store(store), None
        except Exception as exc:  # a network hiccup: keep the last frame, say so, go on
            state["problem"] = describe_failure(exc)[0]

    def speeds(now: float) -> dict[str, Speed]:
        return {s.name: tracker.speed(s, now) for s in state["summaries"]}

    def data(now: float) -> dict[str, Any]:
        return snapshot(store, state["summaries"], speeds(now), now)

    def view(now: float) -> RenderableType:
        return frame(store, state["summaries"], speeds(now), now, console.width,
                     None if once else interval, state["problem"])

    if once:
        if as_json:
            print_json(data(time.time()))
        else:
            console.print(view(time.time()))
        return
    try:
        if as_json:
            while True:
                sys.stdout.write(json.dumps(data(time.time()), allow_nan=True, default=str)
                                 + "\n")
                sys.stdout.flush()
                time.sleep(interval)
                refresh()
        elif not console.is_terminal:  # a log: a frame every interval, appended
            while True:
                console.print(view(time.time()))
                console.print()
                time.sleep(interval)
                refresh()
        else:
            with Live(view(time.time()), console=console, screen=True,
                      auto_refresh=False) as live:
                while True:
                    time.sleep(interval)
                    refresh()
                    live.update(view(time.time()), refresh=True)
    except KeyboardInterrupt:
        if not as_json and console.is_terminal:
            console.print(view(time.time()))  # what it showed last stays on the screen


__all__ = ["Speed", "Tracker", "eta_text", "frame", "progress_cell", "rate_text", "snapshot"]
