"""Layer 8: the ``safepoint`` command line.

Commands live in focused modules that each register on :data:`app`: ``inspect`` (ls,
show), ``maintenance`` (verify, rm, gc), ``compare`` (diff, export), ``watch``, ``jobs``
(run) and ``demo``. ``common`` holds the options they share and turns every failure into
one line (:class:`~safepoint.cli.common.SafeGroup`).
"""

from __future__ import annotations

import importlib

import typer

import safepoint
from safepoint.cli.common import SafeGroup

app = typer.Typer(
    name="safepoint",
    help="Crash-safe checkpoints: list, inspect, watch, verify and clean them; run jobs "
    "that resume.",
    no_args_is_help=True,
    cls=SafeGroup,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"safepoint {safepoint.__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print the version and exit."),
) -> None:
    """Crash-safe checkpoints: list, inspect, watch, verify and clean them; run jobs that
    resume."""


for _module in ("inspect", "maintenance", "watch", "compare", "jobs", "demo"):
    importlib.import_module(f"safepoint.cli.{_module}")


def main() -> None:
    """Console-script entry point (also ``python -m safepoint``)."""
    app(prog_name="safepoint")
