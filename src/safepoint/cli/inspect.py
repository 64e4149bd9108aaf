"""``safepoint ls | show | verify | rm | gc``: look at, check and clean a store.

Every command reads manifests only (small JSON files), except ``verify``, which reads every
blob to check its checksum. Nothing here writes to a store except ``rm`` and ``gc``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.console import JustifyMethod
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from safepoint import knobs
from safepoint.checkpointer import (
    Checkpointer,
    committed_steps,
    is_name,
    latest_problem,
    list_names,
    remove_name,
    require_store,
)
from safepoint.cli import app
from safepoint.cli.catalog import (
    describe_step,
    not_found,
    summarize_store,
    verify_journal,
)
from safepoint.cli.output import (
    err,
    human_age,
    human_bytes,
    human_progress,
    out,
    print_json,
    reporting_errors,
)
from safepoint.consistency import check
from safepoint.errors import CheckpointNotFound, CorruptCheckpoint, SafepointError
from safepoint.format import read_manifest, verify_checkpoint
from safepoint.store import Store, check_name, open_store

PROGRESS_MIN_BYTES = 64 << 20
"""``verify`` shows a progress bar when it has at least this many bytes to read (or when
stdout is a terminal)."""


LocationOption = Annotated[
    Optional[str],  # noqa: UP045 - typer reads this annotation at run time
    typer.Option("--location", "-l", help="Store: a directory or fsspec URL "
                 "[default: $SAFEPOINT_DIR or ./.safepoint]", show_default=False),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def _open(location: str | None) -> Store:
    try:
        return open_store(location or None)
    except (ValueError, ImportError) as exc:  # fsspec: unknown protocol, backend not installed
        raise SafepointError(f"cannot open the store {location!r}: {exc}") from exc


def _table(title: str) -> Table:
    """A compact table: a rule under the header, one space between columns."""
    return Table(box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False, title=title,
                 title_justify="left")


# ------------------------------------------------------------------------- ls


@app.command("ls")
def list_command(
    location: Annotated[Optional[str], typer.Argument(  # noqa: UP045
        help="Store: a directory or fsspec URL [default: $SAFEPOINT_DIR or ./.safepoint]",
        show_default=False)] = None,
    as_json: JsonOption = False,
) -> None:
    """List the checkpoints and runs in a store."""
    with reporting_errors():
        store = _open(location)
        summaries = summarize_store(store)
    if as_json:
        print_json([asdict(s) for s in summaries])
        return
    if not summaries:
        out().print(f"no checkpoints in {escape(store.url)}")
        return
    now = time.time()
    table = _table(escape(store.url))
    for column in ("name", "kind", "status", "steps", "latest", "progress", "age", "size"):
        justify: JustifyMethod = "right" if column in ("steps", "latest", "progress", "size") else "left"
        if column == "name":  # long names fold; the other columns never wrap
            width = min(12, max(len(s.name) for s in summaries))
            table.add_column(column, overflow="fold", min_width=width)
        else:
            table.add_column(column, justify=justify, no_wrap=True)
    for s in summaries:
        steps = str(s.steps) + (f" [red]({s.damaged} bad)[/]" if s.damaged else "")
        progress = "done" if s.complete else human_progress(s.progress)
        table.add_row(
            escape(s.name), s.kind, s.status, steps,
            "-" if s.latest_step is None else str(s.latest_step), progress,
            human_age(None if s.updated is None else now - s.updated), human_bytes(s.nbytes))
    out().print(table)


# ----------------------------------------------------------------------- show


@app.command()
def show(
    name: Annotated[str, typer.Argument(help="The checkpoint name.")],
    step: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--step", "-s", min=0, help="Which step [default: the newest].")] = None,
    location: LocationOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one checkpoint: metadata and the structure of its state (reads no array data)."""
    with reporting_errors():
        info = describe_step(_open(location), name, step)
    if as_json:
        print_json(info)
        return
    console = out()
    if "step" not in info:
        _show_execution(console, info)
        return
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["created"]))
    lines = [
        f"[bold]{escape(name)}[/] step {info['step']} ({info['kind']}) in {escape(info['location'])}",
        f"saved    {created} ({human_age(time.time() - info['created'])}), "
        f"{human_bytes(info['nbytes'])}",
        f"steps    {_step_list(info['steps'])}",
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
        console.print(line, soft_wrap=True)
    console.print(_tree_table(info["tree"]))


def _tree_table(rows: list[dict[str, Any]]) -> Table:
    tree = _table("state")
    for column in ("path", "type", "dtype", "shape", "size"):
        tree.add_column(column, justify="right" if column == "size" else "left")
    for row in rows:
        tree.add_row(escape(row["path"]), row["type"], escape(row["dtype"]), escape(row["shape"]),
                     human_bytes(row["nbytes"]) if row["nbytes"] else "")
    return tree


def _show_execution(console: Any, info: dict[str, Any]) -> None:
    """A run, task or flow: its writer, where it is, its steps first, then its state."""
    run = info["run"]
    console.print(f"[bold]{escape(info['name'])}[/] ({info['kind']}) in "
                  f"{escape(info['location'])}", soft_wrap=True)
    console.print(_status_line(run), soft_wrap=True)
    console.print(_run_line(run), soft_wrap=True)
    if run.get("message"):
        console.print(f"message  {escape(str(run['message']))}", soft_wrap=True)
    if run.get("error"):
        console.print(f"[red]error    {escape(str(run['error']))}[/]", soft_wrap=True)
    for problem in info["damage"]:
        console.print(f"[red]damaged  {escape(problem)}[/]", soft_wrap=True)
    if info["table"]:
        rows = [{"step": r["name"], "status": r["status"],
                 "duration": "" if r["duration"] is None else f"{r['duration']:.2f} s",
                 "error": r["error"]} for r in info["table"]]
        console.print(_dict_table(rows, "steps"))
    if info["tree"]:
        console.print(_tree_table(info["tree"]))


def _status_line(run: dict[str, Any]) -> str:
    owner = run.get("owner") or {}
    who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}" if owner else "nobody"
    liveness = run.get("liveness")
    text = {"running": f"running: written by {who}",
            "stale": f"stale: {who} stopped renewing its lease (hung, or its host is gone)",
            "complete": "complete", "idle": "idle: no writer (stopped, killed or between attempts)"}
    return f"status   {text.get(str(liveness), str(liveness))}, attempt {run.get('attempt')}"


def _run_line(run: dict[str, Any]) -> str:
    total = run.get("total")
    where = f"{run.get('position')}" + ("" if total is None else f" of {total}")
    updated = run.get("updated")
    age = human_age(None if updated is None else time.time() - updated)
    return f"position {where} ({human_progress(run.get('progress'))}), updated {age}"


def _step_list(steps: list[int], limit: int = 12) -> str:
    if len(steps) <= limit:
        return ", ".join(map(str, steps))
    head = ", ".join(map(str, steps[: limit // 2]))
    tail = ", ".join(map(str, steps[-limit // 2 :]))
    return f"{head}, ... {tail} ({len(steps)} in all)"


def _dict_table(rows: list[dict[str, Any]], title: str) -> Table:
    columns: list[str] = []
    for row in rows:
        columns.extend(str(k) for k in row if str(k) not in columns)
    table = _table(title)
    for column in columns:
        table.add_column(escape(column))
    for row in rows:
        cells = {str(k): v for k, v in row.items()}
        table.add_row(*(escape("" if cells.get(c) is None else str(cells[c])) for c in columns))
    return table


# --------------------------------------------------------------------- verify


@app.command()
def verify(
    name: Annotated[Optional[str], typer.Argument(  # noqa: UP045
        help="The checkpoint name [default: every name in the store].", show_default=False)] = None,
    location: LocationOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check every checksum of every step and run journal; exit status 1 if anything is damaged."""
    with reporting_errors():
        store = _open(location)
        names = [check_name(name)] if name is not None else list_names(store)
        targets, broken, latest = [], [], {}
        for n in names:
            try:
                steps = committed_steps(store, n)
                targets += [(n, s) for s in steps]
                if steps:
                    latest[(n, steps[-1])] = latest_problem(store, n)
            except CorruptCheckpoint as exc:  # a name that is a link, say: one bad name
                broken.append({"name": n, "step": None, "ok": False, "checked_bytes": 0,
                               "problems": [str(exc)]})
        journals = [j for j in (verify_journal(store, n) for n in names if not
                                any(b["name"] == n for b in broken)) if j is not None]
        if name is not None and not targets and not journals and not broken:
            raise not_found(store, name)
        total = sum(_blob_bytes(store, n, s) for n, s in targets)
        show_bar = not as_json and (total >= PROGRESS_MIN_BYTES or sys.stdout.isatty())
        results = _verify_all(store, targets, total, show_bar) + journals + broken
        for r in results:
            problem = latest.get((r["name"], r["step"]))
            if problem:
                r["ok"] = False
                r["problems"].append(problem)
    ok = all(r["ok"] for r in results)
    if as_json:
        print_json({"ok": ok, "location": store.url, "results": results})
    else:
        _print_verify(store, results)
    if not ok:
        raise typer.Exit(1)


def _verify_all(store: Store, targets: list[tuple[str, int]], total: int, show_bar: bool
                ) -> list[dict[str, Any]]:
    results = []
    columns = (TextColumn("verifying"), BarColumn(), DownloadColumn(binary_units=True),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err(), transient=True, disable=not show_bar) as progress:
        task = progress.add_task("verify", total=total)
        for name, step in targets:
            report = verify_checkpoint(store, name, step,
                                       on_bytes=lambda size: progress.advance(task, size))
            results.append({"name": name, "step": step, "ok": report.ok,
                            "checked_bytes": report.checked_bytes, "problems": report.problems})
    return results


def _blob_bytes(store: Store, name: str, step: int) -> int:
    try:
        return sum(int(size) for _, size in read_manifest(store, name, step).files)
    except (CorruptCheckpoint, CheckpointNotFound, TypeError, ValueError, AttributeError):
        return 0  # verify reports it


def _print_verify(store: Store, results: list[dict[str, Any]]) -> None:
    console = out()
    if not results:
        console.print(f"nothing to verify in {escape(store.url)}")
        return
    table = _table(escape(store.url))
    for column in ("name", "step", "status", "checked"):
        table.add_column(column, justify="right" if column in ("step", "checked") else "left")
    for r in results:
        status = "[green]ok[/]" if r["ok"] else f"[red]DAMAGED ({len(r['problems'])})[/]"
        step = "journal" if r["step"] is None else str(r["step"])
        table.add_row(escape(r["name"]), step, status, human_bytes(r["checked_bytes"]))
    console.print(table)
    damaged = [r for r in results if not r["ok"]]
    for r in damaged:
        for problem in r["problems"]:
            where = "journal" if r["step"] is None else f"step {r['step']}"
            console.print(f"[red]{escape(r['name'])} {where}: {escape(problem)}[/]", soft_wrap=True)
    steps = [r for r in results if r["step"] is not None]
    bad_steps = [r for r in damaged if r["step"] is not None]
    if bad_steps:
        console.print(f"[red]{len(bad_steps)} of {len(steps)} checkpoints are damaged.[/] "
                      "`restore()` skips them; `safepoint rm NAME --step N` removes one.")
    if len(bad_steps) < len(damaged):
        console.print("[red]A damaged journal:[/] a run resumes from its newest intact record "
                      "(with a warning); one with no intact record, or one that refers to a "
                      "missing checkpoint, cannot resume: `safepoint rm NAME` removes it, and "
                      "it then starts over.")
    if not damaged:
        what = "1 checkpoint" if len(results) == 1 else f"all {len(results)} checkpoints"
        console.print(f"[green]{what} intact[/] "
                      f"({human_bytes(sum(r['checked_bytes'] for r in results))} checked)")


# ------------------------------------------------------------------------- rm


@app.command()
def rm(
    name: Annotated[str, typer.Argument(help="The checkpoint name to remove.")],
    step: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--step", "-s", min=0, help="Remove only this step.")] = None,
    location: LocationOption = None,
) -> None:
    """Remove a name (all its steps, leftovers and run records), or one step of it."""
    with reporting_errors():
        store = _open(location)
        check_name(name)
        require_store(store)
        if step is not None:
            Checkpointer(name, location=store).delete(step)
            out().print(f"removed {escape(name)} step {step} from {escape(store.url)}")
            return
        if not is_name(store, name):
            raise CheckpointNotFound(
                f"nothing safepoint wrote is named {name!r} in {store.url}; `safepoint ls "
                f"{store.url}` lists what is there", name=name)
        try:
            count = len(committed_steps(store, name))
        except CorruptCheckpoint:  # a name that is a link: removing the link is all there is
            count = 0
        report = remove_name(store, name)
    console = out()
    for key, why in report.kept:
        console.print(f"kept {escape(key)}: {why}", soft_wrap=True)
    console.print(f"removed {escape(name)} ({count} step{'' if count == 1 else 's'}) "
                  f"from {escape(store.url)}")


# ------------------------------------------------------------------------- gc


@app.command()
def gc(
    min_age: Annotated[float, typer.Option(
        "--min-age", min=0, help="Remove only leftovers at least this many seconds old, so "
        "that a save in progress elsewhere is never broken.")] = knobs.GC_MIN_AGE,
    location: LocationOption = None,
    as_json: JsonOption = False,
) -> None:
    """Remove what crashed saves left behind (never a committed checkpoint)."""
    with reporting_errors():
        store = _open(location)
        require_store(store)
        report = check(store, fix=True, data=False, min_age=min_age)
    removed: list[dict[str, Any]] = [{"key": f.key, "nbytes": f.nbytes} for f in report.removed]
    kept: list[dict[str, Any]] = [
        {"key": f.key, "reason": f.detail.removeprefix(f"{store.url}/{f.key}: ")}
        for f in report.findings if f.what in ("kept", "foreign", "damage")]
    freed = sum(r["nbytes"] for r in removed)
    if as_json:
        print_json({"location": store.url, "count": len(removed), "nbytes": freed,
                    "removed": removed, "kept": kept})
        return
    console = out()
    for r in removed:
        console.print(f"removed {escape(r['key'])} ({human_bytes(r['nbytes'])})", soft_wrap=True)
    for k in kept:
        console.print(f"kept {escape(k['key'])}: {escape(k['reason'])}", soft_wrap=True)
    console.print(f"{len(removed)} leftover{'' if len(removed) == 1 else 's'} removed, "
                  f"{human_bytes(freed)} freed from {escape(store.url)}")
