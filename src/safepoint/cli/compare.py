"""``safepoint diff | export``: compare two steps of a name, write one step into a file other
tools load (see :mod:`safepoint.exchange` and ``docs/export.md``).

``diff`` reads the two manifests, and with values the changed numeric leaves only; it
exits with status 0 whether or not the steps differ. ``export`` writes one file and never
touches the store.
"""

from __future__ import annotations

import warnings
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from safepoint.cli import app
from safepoint.cli.common import (
    JsonOption,
    LocationOption,
    complete_names,
    describe_failure,
    open_location,
)
from safepoint.cli.output import err, human_bytes, out, print_error, print_json
from safepoint.cli.tables import Column, print_table
from safepoint.errors import SafepointError
from safepoint.exchange import LeafDiff, LeafInfo, diff_steps, export_step

DIFF_COLUMNS = (
    Column("path", wrap=True, min_width=16),
    Column("change", wrap=True, min_width=8),
    Column("dtype", wrap=True, min_width=8),
    Column("shape/value", wrap=True, min_width=12),
    Column("max |b-a|", justify="right"),
)
EXPORT_COLUMNS = (
    Column("dtype", wrap=True, min_width=8),
    Column("shape", wrap=True, min_width=10),
    Column("size", justify="right"),
)

# ----------------------------------------------------------------------- diff


@app.command()
def diff(
    name: Annotated[str, typer.Argument(
        autocompletion=complete_names, help="The checkpoint name.")],
    a: Annotated[int, typer.Argument(min=0, help="The step to compare from.")],
    b: Annotated[int, typer.Argument(min=0, help="The step to compare to.")],
    location: LocationOption = None,
    no_values: Annotated[bool, typer.Option(
        "--no-values", help="Compare manifests and checksums only: read no array data, "
        "so no max |b-a|.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Which leaves were added, removed or changed from step A to step B (exit status 0
    whether or not they differ, 1 on errors)."""
    result = diff_steps(name, a, b, location=open_location(location), values=not no_values)
    if as_json:
        print_json(result.to_json())
        return
    console = out()
    console.print(f"[bold]{escape(result.name)}[/] step {a} -> step {b} in "
                  f"{escape(result.location)}")
    if result.identical:
        leaves = "1 leaf" if result.unchanged == 1 else f"{result.unchanged} leaves"
        console.print(f"no differences ({leaves}, all the same)")
        return
    rows = [[escape(leaf.path), _change_cell(leaf), escape(_pair(leaf, lambda i: i.dtype)),
             escape(_pair(leaf, _shape_text)), _number(leaf.max_abs_diff)]
            for leaf in result.leaves]
    console.print()
    print_table(console, None, DIFF_COLUMNS, rows)
    counts = [f"{len(result.added)} added", f"{len(result.removed)} removed",
              f"{len(result.changed)} changed", f"{result.unchanged} unchanged"]
    tail = "" if result.values else " (values not compared: --no-values)"
    console.print(", ".join(counts) + tail)


def _change_cell(leaf: LeafDiff) -> str:
    if leaf.status == "added":
        return "[green]added[/]"
    if leaf.status == "removed":
        return "[red]removed[/]"
    return f"[yellow]{escape(', '.join(leaf.changes))}[/]"


def _shape_text(info: LeafInfo) -> str:
    if info.value is not None:
        return info.value
    return "" if info.shape is None else str(info.shape)


def _pair(leaf: LeafDiff, field: Any) -> str:
    """``field`` of the leaf in A and in B: one text when they agree, ``x -> y`` when not."""
    if leaf.a is None or leaf.b is None:
        side = leaf.a if leaf.b is None else leaf.b
        assert side is not None
        return str(field(side))
    before, after = str(field(leaf.a)), str(field(leaf.b))
    return before if before == after else f"{before} -> {after}"


def _number(value: int | float | None) -> str:
    if value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


# --------------------------------------------------------------------- export


@app.command()
def export(
    name: Annotated[str, typer.Argument(
        autocompletion=complete_names, help="The checkpoint name.")],
    to: Annotated[str, typer.Option(
        "--to", "-o", help="The file to write: .npz, .safetensors or .pt.",
        show_default=False)],
    step: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--step", "-s", min=0, help="Which step [default: the newest intact one].")] = None,
    fmt: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--format", "-f", help="npz, safetensors or torch [default: from the file's suffix].",
        show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the file if it exists.")] = False,
    skip_unsupported: Annotated[bool, typer.Option(
        "--skip-unsupported", help="Leave out the leaves the format cannot hold (listed) "
        "instead of failing.")] = False,
    location: LocationOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write one step's state to a .npz, .safetensors or torch .pt file."""
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = export_step(name, step=step, to=to, format=fmt, location=open_location(location),
                                 overwrite=force, skip_unsupported=skip_unsupported)
        except (SafepointError, OSError) as exc:
            error = exc
    for warning in caught:  # e.g. a damaged newest step skipped: one line each
        err().print(f"[yellow]warning: {escape(str(warning.message))}[/]", soft_wrap=True)
    if error is not None:
        message, status = describe_failure(error)
        print_error(message)
        raise typer.Exit(status)
    if as_json:
        print_json(result.to_json())
        return
    console = out()
    flat = result.format != "torch"
    rows = []
    for entry in result.entries:
        label = entry.key if flat and entry.key is not None else entry.path
        dtype = entry.dtype or (f"{entry.type} (json)" if entry.kind == "metadata"
                                else entry.type)
        shape = "" if entry.shape is None else str(entry.shape)
        rows.append([escape(label), escape(dtype), escape(shape),
                     human_bytes(entry.nbytes) if entry.kind == "array" else ""])
    columns = (Column("key" if flat else "path", wrap=True, min_width=16), *EXPORT_COLUMNS)
    print_table(console, escape(result.path), columns, rows)
    for path, why in result.skipped:
        console.print(f"[yellow]skipped {escape(path)}: {escape(why)}[/]")
    arrays = sum(1 for e in result.entries if e.kind == "array")
    others = len(result.entries) - arrays
    what = f"{arrays} array{'' if arrays == 1 else 's'}"
    if others:
        what += f", {others} plain value{'' if others == 1 else 's'}"
    console.print(f"exported {escape(result.name)} step {result.step} to {escape(result.path)} "
                  f"({result.format}, {what}, {human_bytes(result.size)})")
