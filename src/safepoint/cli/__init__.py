"""Layer 8: the ``safepoint`` command line.

Commands live in focused modules that each register on :data:`app`:
``inspect`` (ls, show, verify, rm, gc), ``jobs`` (run) and ``demo``.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="safepoint",
    help="Crash-safe checkpoints: list, inspect, verify and clean them; run jobs that resume.",
    no_args_is_help=True,
    add_completion=False,
)

for _module in ("safepoint.cli.inspect", "safepoint.cli.compare", "safepoint.cli.jobs", "safepoint.cli.demo"):
    importlib.import_module(_module)


def main() -> None:
    """Console-script entry point."""
    app()
