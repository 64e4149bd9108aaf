"""``safepoint run``: run a command and restart it when it crashes."""

from __future__ import annotations

import shlex
from typing import Annotated

import typer
from rich.markup import escape

from safepoint.cli import app
from safepoint.cli.output import err, print_error
from safepoint.supervisor import Supervisor

# Shell conventions for a command that could not be started.
_NOT_FOUND, _NOT_EXECUTABLE = 127, 126


@app.command(
    help="Run COMMAND; restart it when it crashes, with SAFEPOINT_ATTEMPT=1, 2, ... set.\n\n"
    "A command that exits non-zero or dies by a signal is restarted, so a job that saves "
    "checkpoints continues where it stopped. SIGINT and SIGTERM are passed on to the command, "
    "which is then not restarted. The exit status is the command's last one (128 + N for a "
    "death by signal N).",
    context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True},
    epilog="Example: safepoint run --max-restarts 5 -- python train.py --epochs 10",
)
def run(
    command: Annotated[list[str], typer.Argument(
        help="The command and its arguments (put them after `--`).", metavar="COMMAND",
        show_default=False)],
    max_restarts: Annotated[int, typer.Option(
        "--max-restarts", "-n", min=0, help="Restart at most this many times.")] = 3,
    backoff: Annotated[float, typer.Option(
        "--backoff", min=0, help="Seconds to wait before the first restart; doubles after "
        "each one, up to --max-backoff.")] = 1.0,
    max_backoff: Annotated[float, typer.Option(
        "--max-backoff", min=0, help="The longest wait between restarts, in seconds.")] = 60.0,
) -> None:
    """Run a command under a :class:`Supervisor` (the help text above says what it does)."""
    console = err()
    supervisor = Supervisor(
        command, max_restarts=max_restarts, backoff=backoff, max_backoff=max_backoff,
        notify=lambda line: console.print(f"[yellow]{escape(line)}[/]", soft_wrap=True))
    try:
        status = supervisor.run()
    except FileNotFoundError:
        print_error(f"command not found: {shlex.quote(command[0])}")
        raise typer.Exit(_NOT_FOUND) from None
    except PermissionError:
        print_error(f"permission denied: cannot execute {shlex.quote(command[0])}")
        raise typer.Exit(_NOT_EXECUTABLE) from None
    raise typer.Exit(status)
