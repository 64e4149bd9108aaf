"""``safepoint verify | rm | gc``: check a store, and clean it.

``verify`` reads every blob to check its checksum; ``rm`` and ``gc`` are the only commands
that write to a store.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from safepoint import knobs
from safepoint.checkpointer import (
    Checkpointer,
    committed_steps,
    is_name,
    list_names,
    remove_name,
    require_store,
)
from safepoint.cli import app
from safepoint.cli.catalog import not_found
from safepoint.cli.common import JsonOption, LocationOption, complete_names, open_location
from safepoint.cli.output import err, human_bytes, out, print_json
from safepoint.cli.tables import Column, print_table
from safepoint.consistency import check
from safepoint.errors import CheckpointNotFound, CorruptCheckpoint
from safepoint.format import read_manifest
from safepoint.store import Store, check_name

PROGRESS_MIN_BYTES = 64 << 20
"""``verify`` shows a progress bar when it has at least this many bytes to read (or when
stdout is a terminal)."""

VERIFY_COLUMNS = (
    Column("name", wrap=True, min_width=12),
    Column("step", justify="right"),
    Column("status"),
    Column("checked", justify="right", drop=1),
)
# --------------------------------------------------------------------- verify


@app.command()
def verify(
    name: Annotated[Optional[str], typer.Argument(  # noqa: UP045
        autocompletion=complete_names,
        help="The checkpoint name [default: every name in the store].", show_default=False)] = None,
    location: LocationOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check every checksum of every step and run journal; exit status 1 if anything is damaged
    (the same check as `safepoint.check`, which `gc` uses too)."""
    store = open_location(location)
    names = [check_name(name)] if name is not None else list_names(store)
    total = sum(_blob_bytes(store, n) for n in names)
    show_bar = not as_json and (total >= PROGRESS_MIN_BYTES or sys.stdout.isatty())
    columns = (TextColumn("verifying"), BarColumn(), DownloadColumn(binary_units=True),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err(), transient=True, disable=not show_bar) as progress:
        task = progress.add_task("verify", total=total)
        report = check(store, names=names, on_bytes=lambda size: progress.advance(task, size))
    if name is not None and not report.checked:
        raise not_found(store, name)
    results = [{"name": c.name, "step": c.step, "ok": c.ok, "checked_bytes": c.checked_bytes,
                "problems": c.problems} for c in report.checked]
    ok = all(r["ok"] for r in results)
    if as_json:
        print_json({"ok": ok, "location": store.url, "results": results})
    else:
        _print_verify(store, results)
    if not ok:
        raise typer.Exit(1)


def _blob_bytes(store: Store, name: str) -> int:
    """The data bytes of ``name``'s steps (for the progress bar; damage counts 0: verify
    reports it)."""
    total = 0
    try:
        steps = committed_steps(store, name)
    except CorruptCheckpoint:
        return 0
    for step in steps:
        try:
            total += sum(int(size) for _, size in read_manifest(store, name, step).files)
        except (CorruptCheckpoint, CheckpointNotFound, TypeError, ValueError, AttributeError):
            pass
    return total


def _print_verify(store: Store, results: list[dict[str, Any]]) -> None:
    console = out()
    if not results:
        console.print(f"nothing to verify in {escape(store.url)}")
        return
    rows = [[escape(r["name"]), "journal" if r["step"] is None else str(r["step"]),
             "[green]ok[/]" if r["ok"] else f"[red]DAMAGED ({len(r['problems'])})[/]",
             human_bytes(r["checked_bytes"])] for r in results]
    print_table(console, escape(store.url), VERIFY_COLUMNS, rows)
    damaged = [r for r in results if not r["ok"]]
    for r in damaged:
        for problem in r["problems"]:
            where = "journal" if r["step"] is None else f"step {r['step']}"
            console.print(f"[red]{escape(r['name'])} {where}: {escape(problem)}[/]")
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
    name: Annotated[str, typer.Argument(
        autocompletion=complete_names, help="The checkpoint, run, task or flow to remove.")],
    step: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--step", "-s", min=0, help="Remove only this step.")] = None,
    location: LocationOption = None,
    as_json: JsonOption = False,
) -> None:
    """Remove a name (all its steps, leftovers and run records), or one step of it."""
    store = open_location(location)
    check_name(name)
    require_store(store)
    if step is not None:
        Checkpointer(name, location=store).delete(step)
        if as_json:
            print_json({"location": store.url, "name": name, "step": step, "steps": 1,
                        "kept": []})
        else:
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
    if as_json:
        print_json({"location": store.url, "name": name, "step": None, "steps": count,
                    "kept": [{"key": key, "reason": why} for key, why in report.kept]})
        return
    console = out()
    for key, why in report.kept:
        console.print(f"kept {escape(key)}: {escape(why)}")
    console.print(f"removed {escape(name)} ({count} step{'' if count == 1 else 's'}) "
                  f"from {escape(store.url)}")


# ------------------------------------------------------------------------- gc


def _size(store: Store, key: str) -> int:
    """Bytes under ``key`` (a file, or a folder's files), 0 if it is gone."""
    try:
        info = store.stat(key)
        if info.kind != "dir":
            return info.size if info.kind == "file" else 0
        return sum(_size(store, f"{key}/{e.name}") for e in store.scan(key))
    except (FileNotFoundError, NotADirectoryError, CorruptCheckpoint):
        return 0


@app.command()
def gc(
    min_age: Annotated[float, typer.Option(
        "--min-age", min=0, help="Remove only leftovers at least this many seconds old, so "
        "that a save in progress elsewhere is never broken.")] = knobs.GC_MIN_AGE,
    location: LocationOption = None,
    as_json: JsonOption = False,
) -> None:
    """Remove what crashed saves left behind (never a committed checkpoint), and say what
    was kept and why."""
    store = open_location(location)
    require_store(store)
    report = check(store, fix=True, data=False, min_age=min_age)
    removed: list[dict[str, Any]] = [{"key": f.key, "nbytes": f.nbytes} for f in report.removed]
    kept: list[dict[str, Any]] = [
        {"key": f.key, "nbytes": _size(store, f.key), "what": f.what,
         "reason": f.detail.removeprefix(f"{store.url}/{f.key}: ")}
        for f in report.findings if f.what in ("kept", "foreign", "damage")]
    freed = sum(r["nbytes"] for r in removed)
    if as_json:
        print_json({"location": store.url, "count": len(removed), "nbytes": freed,
                    "removed": removed, "kept": kept})
        return
    console = out()
    for r in removed:
        console.print(f"removed {escape(r['key'])} ({human_bytes(r['nbytes'])})")
    for k in kept:
        console.print(f"kept {escape(k['key'])} ({human_bytes(k['nbytes'])}): "
                      f"{escape(k['reason'])}")
    console.print(f"{len(removed)} leftover{'' if len(removed) == 1 else 's'} removed, "
                  f"{human_bytes(freed)} freed from {escape(store.url)}")
    in_flight = [k for k in kept if k["what"] == "kept" and "save may be in progress" in k["reason"]]
    busy = [k for k in in_flight if "is running" in k["reason"]]
    young = [k for k in in_flight if k not in busy]
    if busy:
        size = human_bytes(sum(k["nbytes"] for k in busy))
        console.print(f"[yellow]{len(busy)} kept ({size}) under names whose writer is running: "
                      "a save may still be writing them, however old; the writer removes its "
                      "own leftovers, or run gc again once it stops[/]")
    if young:
        size = human_bytes(sum(k["nbytes"] for k in young))
        console.print(f"[yellow]{len(young)} kept ({size}): younger than {min_age:g} s, so a "
                      "save may still be writing them; `safepoint gc --min-age 0` removes "
                      "them when nothing writes to this store[/]")
