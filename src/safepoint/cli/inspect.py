"""``safepoint ls | show``: what is in a store, and one name in it.

Both read manifests and execution records only (small JSON files), never the blobs.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from safepoint.cli import app
from safepoint.cli.catalog import NameSummary, describe_step, summarize_store
from safepoint.cli.common import (
    JsonOption,
    LocationArgument,
    LocationOption,
    complete_names,
    open_location,
    pick_location,
)
from safepoint.cli.output import human_age, human_bytes, human_progress, out, print_json
from safepoint.cli.tables import Column, print_table
from safepoint.cli.tree import row_text

# ------------------------------------------------------------------------- ls

LS_COLUMNS = (
    Column("name", wrap=True, min_width=10),
    Column("kind", drop=6),
    Column("status", drop=7),
    Column("steps", justify="right", drop=5),
    Column("latest", justify="right", drop=3),
    Column("progress", justify="right", drop=4),
    Column("age", drop=2),
    Column("size", justify="right", drop=1),
)


def by_priority(columns: tuple[Column, ...], rows: list[list[str]]) -> list[Column]:
    """``columns``, where those with nothing to show (every cell ``-``) go first when the
    table is too wide."""
    empty = {i for i, c in enumerate(columns)
             if c.drop and rows and all(row[i] in ("-", "") for row in rows)}
    order = sorted(range(len(columns)),
                   key=lambda i: (i not in empty, columns[i].drop))
    ranks = {i: rank + 1 for rank, i in enumerate(k for k in order if columns[k].drop)}
    return [Column(c.header, c.justify, c.wrap, c.min_width, ranks.get(i, 0))
            for i, c in enumerate(columns)]


def ls_rows(summaries: list[NameSummary], now: float) -> list[list[str]]:
    rows = []
    for s in summaries:
        steps = str(s.steps) + (f" [red]({s.damaged} bad)[/]" if s.damaged else "")
        progress = "done" if s.complete else human_progress(s.progress)
        rows.append([
            escape(s.name), s.kind, s.status, steps,
            "-" if s.latest_step is None else str(s.latest_step), progress,
            short_age(s.updated, now),
            human_bytes(s.nbytes) + (f" ({human_bytes(s.shared)} shared)" if s.shared else "")])
    return rows


@app.command("ls")
def list_command(
    location_argument: LocationArgument = None,
    location: LocationOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the checkpoints, runs, tasks and flows in a store, with their status."""
    store = open_location(pick_location(location_argument, location))
    summaries = summarize_store(store)
    if as_json:
        print_json([asdict(s) for s in summaries])
        return
    if not summaries:
        out().print(f"no checkpoints in {escape(store.url)}")
        return
    rows = ls_rows(summaries, time.time())
    print_table(out(), escape(store.url), by_priority(LS_COLUMNS, rows), rows)


# ----------------------------------------------------------------------- show

TREE_COLUMNS = (
    Column("path", wrap=True, min_width=16),
    Column("type", drop=2),
    Column("dtype", drop=3),
    Column("shape/value", wrap=True, min_width=12),
    Column("size", justify="right", drop=1),
)
STEP_COLUMNS = (
    Column("step", wrap=True, min_width=12),
    Column("status"),
    Column("duration", justify="right", drop=1),
    Column("error", wrap=True, min_width=16),
)


@app.command()
def show(
    name: Annotated[str, typer.Argument(
        autocompletion=complete_names, help="The checkpoint, run, task or flow name.")],
    step: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--step", "-s", min=0, help="Which step [default: the newest].")] = None,
    full: Annotated[bool, typer.Option(
        "--all", "-a", help="A row for every leaf of the state (a long list or dict is "
        "one row otherwise).")] = False,
    location: LocationOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one name: a run's, task's or flow's status, progress, steps and state; a
    checkpoint's metadata and the structure of its state (reads no array data)."""
    info = describe_step(open_location(location), name, step, full=full)
    if as_json:
        print_json(info)
        return
    console = out()
    if "step" not in info:
        _show_execution(console, info)
        return
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["created"]))
    lines = [
        f"[bold]{escape(name)}[/] step {info['step']} ({info['kind']}) in "
        f"{escape(info['location'])}",
        f"saved    {created} ({human_age(time.time() - info['created'])}), "
        f"{human_bytes(info['nbytes'])}"
        + (f", of which {human_bytes(info['shared_bytes'])} shared with other steps"
           if info["shared_bytes"] else ""),
        f"steps    {step_list(info['steps'])}",
    ]
    if info["run_damage"]:
        lines.append(f"[red]record   damaged: {escape(info['run_damage'])}[/]")
    for label, values in (("metadata", info["metadata"]), ("extra", info["extra"])):
        for key, value in values.items():
            lines.append(f"{label} {escape(str(key))} = {escape(repr(value))}")
    if info["pickled"]:
        lines.append(f"[yellow]pickled  {escape(', '.join(info['pickled']))} "
                     "(restore needs allow_pickle=True)[/]")
    for line in lines:
        console.print(line)
    _print_tree(console, info["tree"])


def _print_tree(console: Console, rows: list[dict[str, Any]]) -> None:
    cells = [[escape(r["path"]), escape(r["type"]), escape(r["dtype"]), escape(row_text(r)),
              human_bytes(r["nbytes"]) if r["nbytes"] else ""] for r in rows]
    print_table(console, "state", by_priority(TREE_COLUMNS, cells), cells)


def _show_execution(console: Console, info: dict[str, Any]) -> None:
    """A run, task or flow: its writer, where it is, its steps first, then its state."""
    run = info["run"]
    console.print(f"[bold]{escape(info['name'])}[/] ({info['kind']}) in "
                  f"{escape(info['location'])}")
    console.print(escape(status_line(run)))
    console.print(escape(position_line(run)))
    if run.get("message"):
        console.print(f"message  {escape(str(run['message']))}")
    if run.get("error"):
        console.print(f"[red]error    {escape(str(run['error']))}[/]")
    for problem in info["damage"]:
        console.print(f"[red]damaged  {escape(problem)}[/]")
    if info["table"]:
        cells = [[escape(r["name"]), escape(r["status"]),
                  "" if r["duration"] is None else f"{r['duration']:.2f} s",
                  escape(r["error"] or "")] for r in info["table"]]
        print_table(console, "steps", STEP_COLUMNS, cells)
    if info["tree"]:
        _print_tree(console, info["tree"])


def short_age(updated: float | None, now: float) -> str:
    """How long ago, for an ``age`` column: ``just now``, ``42 s``, ``3 min``, ``2 days``."""
    return human_age(None if updated is None else now - updated).removesuffix(" ago")


def owner_text(owner: dict[str, Any] | None) -> str:
    """``pid 4242 on node-3``, or ``nobody``."""
    if not owner:
        return "nobody"
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"


def status_line(run: dict[str, Any]) -> str:
    who = owner_text(run.get("owner"))
    liveness = run.get("liveness")
    text = {"running": f"running: written by {who}",
            "stale": f"stale: {who} stopped renewing its lease (hung, or its host is gone)",
            "complete": "complete", "idle": "idle: no writer (stopped, killed or between attempts)"}
    return f"status   {text.get(str(liveness), str(liveness))}, attempt {run.get('attempt')}"


def position_line(run: dict[str, Any]) -> str:
    total = run.get("total")
    where = f"{run.get('position')}" + ("" if total is None else f" of {total}")
    updated = run.get("updated")
    age = human_age(None if updated is None else time.time() - updated)
    return f"position {where} ({human_progress(run.get('progress'))}), updated {age}"


def step_list(steps: list[int], limit: int = 12) -> str:
    if len(steps) <= limit:
        return ", ".join(map(str, steps))
    head = ", ".join(map(str, steps[: limit // 2]))
    tail = ", ".join(map(str, steps[-limit // 2 :]))
    return f"{head}, ... {tail} ({len(steps)} in all)"


__all__ = ["LS_COLUMNS", "by_priority", "ls_rows", "owner_text", "position_line",
           "short_age", "status_line", "step_list"]
