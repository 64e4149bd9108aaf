"""``safepoint demo``: a real crash in the middle of a stream, then an exact resume.

The demo writes a file of random integers and sums it with ``run.lines`` in a worker
process. It kills the worker with SIGKILL (no cleanup, no last checkpoint: a real crash)
once its checkpoints show it between 20% and 80% through, starts it again, and checks that
the resumed sum equals a plain uninterrupted sum. The worker simulates a little work per
line so that the run lasts a few seconds; the checkpointing cost is then measured on the
bare loop, against a plain ``for line in open(...)``.

``python -m safepoint.run.demo worker NUMBERS STORE RESULT WORK_SECONDS`` runs the worker.
"""

from __future__ import annotations

import inspect
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

import safepoint.run as runs
from safepoint.store import open_store

RUN_NAME = "demo-sum"


def generate(path: Path, count: int, seed: int) -> None:
    """``count`` random integers, one per line."""
    values = np.random.default_rng(seed).integers(-(10**9), 10**9, size=count)
    path.write_text("\n".join(map(str, values.tolist())) + "\n")


def plain_sum(path: Path) -> int:
    """The sum as anyone would write it: no checkpoints."""
    total = 0
    with open(path) as f:
        for line in f:
            total += int(line)
    return total


def simulate_work(seconds: float) -> None:
    """Busy-wait ``seconds``: the processing a real job would do with each line."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


def worker(numbers: str, store: str, result: str, work_seconds: float) -> None:
    """The resumable sum; each line busy-waits ``work_seconds`` (simulated processing).

    The lines between the ``user code`` markers are what the demo prints as the code it
    runs (without those marked ``(demo)``): keep them what a user would write."""
    started = time.perf_counter()
    # user code
    with runs.resume("demo-sum", location=store) as run:  # resumes by name
        run.state.setdefault("total", 0)
        resumed_at = run.position  # (demo)
        for line in run.lines(numbers):  # after the last committed line
            run.state["total"] += int(line)
            simulate_work(work_seconds)
    # end of user code
    lines = run.position
    report = {"total": run.state["total"], "resumed_at": resumed_at, "lines": lines,
              "attempt": run.attempt, "commits": run.commits, "commit_seconds": run.commit_seconds,
              "seconds": time.perf_counter() - started}
    Path(result).write_text(json.dumps(report))


def user_code() -> str:
    """The lines of :func:`worker` a user would write, as the demo prints them."""
    source = inspect.getsource(worker).splitlines()
    start = next(i for i, line in enumerate(source) if line.strip() == "# user code")
    end = next(i for i, line in enumerate(source) if line.strip() == "# end of user code")
    kept = [line for line in source[start + 1 : end] if not line.endswith("# (demo)")]
    return "import safepoint.run as runs\n\n" + textwrap.dedent("\n".join(kept))


@dataclass
class Overhead:
    """What checkpointing cost on the bare loop: seconds of each round, plain and resumable."""

    plain: list[float]
    resumable: list[float]
    commits: int

    @property
    def ratios(self) -> list[float]:
        """Each round's overhead: resumable / plain - 1."""
        return [r / p - 1 for p, r in zip(self.plain, self.resumable, strict=True)]

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)


def measure_overhead(numbers: Path, store: Path, rounds: int = 5) -> Overhead:
    """``rounds`` rounds of a plain loop and of the resumable loop (default policy, same
    body), one after the other so that both see the same machine load."""
    overhead = Overhead([], [], 0)
    for _ in range(rounds):
        started = time.perf_counter()
        state = {"total": 0}
        with open(numbers) as f:
            for line in f:
                state["total"] += int(line)
        overhead.plain.append(time.perf_counter() - started)
        started = time.perf_counter()
        with runs.resume("demo-overhead", location=store, progress=False) as run:
            run.state["total"] = 0
            for line in run.lines(numbers):
                run.state["total"] += int(line)
        overhead.resumable.append(time.perf_counter() - started)
        overhead.commits = run.commits
    return overhead


@dataclass
class Attempt:
    seconds: float
    killed_at: float | None = None  # checkpointed fraction when killed


def _start_worker(numbers: Path, store: Path, result: Path, work: float) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "safepoint.run.demo", "worker", str(numbers), str(store),
               str(result), repr(work)]
    return subprocess.Popen(command)


def _crash_attempt(numbers: Path, store: Path, result: Path, work: float, rng: random.Random) -> Attempt:
    """Run the worker and SIGKILL it once its checkpoints pass a random point in 20-80%."""
    target = rng.uniform(0.2, 0.8)
    started = time.perf_counter()
    process = _start_worker(numbers, store, result, work)
    location = open_store(store)
    while process.poll() is None:
        info = runs.describe_run(location, RUN_NAME)
        if info is not None and info.progress is not None and target <= info.progress < 1:
            time.sleep(rng.uniform(0.0, 0.25))  # land between two checkpoints
            checkpointed = runs.describe_run(location, RUN_NAME)
            process.send_signal(signal.SIGKILL)
            if process.wait() == -signal.SIGKILL:
                return Attempt(time.perf_counter() - started, checkpointed.progress if checkpointed else None)
            break
        time.sleep(0.01)
    process.wait()
    return Attempt(time.perf_counter() - started)


def run_demo(directory: Path | None = None, *, count: int = 1_000_000, seed: int | None = None,
             seconds: float = 4.0, console: Console | None = None) -> int:
    """The whole demo; returns the exit status (0 only if the resumed sum is exact)."""
    console = console or Console()
    seed = random.randrange(1 << 30) if seed is None else seed
    if directory is None:
        with tempfile.TemporaryDirectory(prefix="safepoint-demo-") as tmp:
            return _demo(Path(tmp), count, seed, seconds, console)
    directory.mkdir(parents=True, exist_ok=True)
    return _demo(directory, count, seed, seconds, console)


def _demo(directory: Path, count: int, seed: int, seconds: float, console: Console) -> int:
    numbers, store, result = directory / "numbers.txt", directory / ".safepoint", directory / "result.json"
    open_store(store).delete(RUN_NAME)  # a leftover of an earlier demo in --dir
    result.unlink(missing_ok=True)
    rng = random.Random(seed)
    work = seconds / count
    console.rule("[bold]safepoint demo[/bold]: kill -9 in the middle of a stream, then resume")

    started = time.perf_counter()
    generate(numbers, count, seed)
    console.print(f"[bold]1.[/bold] wrote {numbers} — {count:,} random integers "
                  f"({numbers.stat().st_size / 1e6:.1f} MB, seed {seed}) "
                  f"[dim]{time.perf_counter() - started:.1f} s[/dim]")
    expected = plain_sum(numbers)
    console.print(f"[bold]2.[/bold] plain sum, no checkpoints: [cyan]{expected:,}[/cyan]")

    console.print(f"[bold]3.[/bold] resumable sum in a worker process, each line simulating "
                  f"{work * 1e6:.1f} µs of work (about {seconds:g} s in all); its code:")
    console.print(Syntax(user_code(), "python", theme="ansi_dark", background_color="default",
                         padding=(0, 0, 0, 3)))
    first = _crash_attempt(numbers, store, result, work, rng)
    if console.is_terminal:
        console.show_cursor(True)
        console.print()
    if first.killed_at is None:
        console.print("[red]the worker finished before it could be killed; give it more work "
                      "(--seconds) or more numbers (--count)[/red]")
        return 1
    info = runs.describe_run(open_store(store), RUN_NAME)
    position = info.position if info is not None else 0
    console.print(f"   [bold red]killed with SIGKILL[/bold red] after {first.seconds:.1f} s; its "
                  f"last checkpoint: line {position:,} ({first.killed_at:.0%})")

    console.print("[bold]4.[/bold] the same command again: it resumes from that checkpoint")
    second = _start_worker(numbers, store, result, work)
    if second.wait() != 0 or not result.exists():
        console.print(f"[red]the resumed worker failed (exit status {second.returncode})[/red]")
        return 1
    report = json.loads(result.read_text())
    exact = report["total"] == expected
    verdict = "[green]exact[/green]" if exact else f"[red]WRONG: expected {expected:,}[/red]"
    console.print(f"   sum after the crash and resume: [cyan]{report['total']:,}[/cyan] — {verdict}")

    overhead = measure_overhead(numbers, directory / "overhead")
    _summary(console, count, report, overhead)
    console.print("[bold]next:[/bold] examples/ holds runnable scripts (counter.py, "
                  "sum_numbers.py, train.py, task_local.py, flow_pipeline.py); docs/runs.md "
                  "starts the documentation, docs/cli.md covers `safepoint ls`, `show` and "
                  "`watch`.")
    return 0 if exact else 1


def _summary(console: Console, count: int, report: dict, overhead: Overhead) -> None:
    skipped = report["resumed_at"]
    per_line = report["seconds"] / max(1, count - skipped)
    table = Table(title="what resuming saved, what checkpointing cost", show_header=False,
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("lines not reprocessed", f"{skipped:,} of {count:,} ({skipped / count:.0%})")
    table.add_row("time saved", f"about {skipped * per_line:.1f} s: the resumed attempt took "
                  f"{report['seconds']:.1f} s instead of about {count * per_line:.1f} s")
    table.add_row("lines redone", "only those after the last checkpoint (at most 0.5 s of work)")
    table.add_row("commits", f"{report['commits']} by the resumed attempt, "
                  f"{1e3 * report['commit_seconds'] / max(1, report['commits']):.1f} ms each "
                  "(an fsync'd journal append)")
    ratios, rounds = overhead.ratios, len(overhead.ratios)
    table.add_row("checkpoint overhead", f"{overhead.median:+.1%} (median of {rounds} rounds, "
                  f"from {min(ratios):+.1%} to {max(ratios):+.1%}) vs a plain loop over the "
                  f"same {count:,} lines ({statistics.median(overhead.resumable):.2f} s vs "
                  f"{statistics.median(overhead.plain):.2f} s, {overhead.commits} commits, "
                  "no simulated work)")
    console.print(table)


def main(argv: list[str]) -> None:
    if len(argv) != 5 or argv[0] != "worker":
        raise SystemExit("usage: python -m safepoint.run.demo worker NUMBERS STORE RESULT WORK_SECONDS")
    worker(argv[1], argv[2], argv[3], float(argv[4]))


if __name__ == "__main__":
    main(sys.argv[1:])

__all__ = ["Overhead", "generate", "measure_overhead", "plain_sum", "run_demo", "user_code",
           "worker"]
