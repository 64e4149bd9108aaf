"""``safepoint demo``: kill -9 a stream in the middle, resume it, check the result."""

from __future__ import annotations

from pathlib import Path

import typer

from safepoint.cli import app
from safepoint.run.demo import run_demo


@app.command()
def demo(
    count: int = typer.Option(1_000_000, min=1000, help="How many random integers to sum."),
    seed: int | None = typer.Option(None, help="Seed of the numbers and of the kill point."),
    directory: Path | None = typer.Option(
        None, "--dir", help="Where to write numbers.txt and the checkpoints (kept); "
        "default: a temporary directory, removed afterwards."),
    seconds: float = typer.Option(
        4.0, min=0.5, help="Simulated work in all, spread over the lines, so the crash can be watched."),
) -> None:
    """Sum a file as a resumable stream, SIGKILL the worker midway, resume, check the sum."""
    raise typer.Exit(run_demo(directory, count=count, seed=seed, seconds=seconds))
