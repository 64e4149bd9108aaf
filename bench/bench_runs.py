"""Run benchmarks: what a resumable stream costs, per item, per commit, and to resume.

On a file of random integers (1,000,000 lines; 100,000 with ``--quick``), side by side in
one run, every loop with the same body (``state["total"] += int(line)``):

1. a plain ``for line in open(path)`` loop against ``run.lines`` with the default policy,
   with ``every(items=1000)`` (durable commits), with a user-written policy that does the
   same (a :class:`~safepoint.Policy` subclass as docs/runs.md shows, "a policy of your
   own"), and with ``every(items=1000)`` and ``commit="async"``; then, with
   ``durable=False`` (no ``fdatasync``, whose cost on a shared disk varies far more than a
   policy costs), the built-in ``every(items=1000)``, the user-written policy, and a plain
   function of the Tick that does the same (asked after every item, by design): the
   user-written policies are compared with the built-in one;
2. the cost of one durable commit inside the loop (the every-1000 loop less the
   default-policy loop, divided by the extra commits) against the floor: the plain loop
   appending a record of the same size to a file and calling ``fdatasync`` every 1000
   lines (less the plain loop, divided by the appends), measured in the same rounds;
3. the default policy's loop again, alternating with the plain loop alone (15 rounds): the
   target, away from the loops above whose thousand ``fdatasync`` calls delay its flushes
   (their writeback is flushed first, with ``os.sync``);
4. resuming at 90% against resuming at 0% (open the run, read the first line), and a naive
   resume that re-reads the file up to 90%.

    python -m bench --only runs
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from pathlib import Path
from typing import Any

from bench import Case, Report, compare, settle
from safepoint.policy import Policy, Tick, every, manual
from safepoint.run import resume
from safepoint.store.journal import HEADER, scan

_sync = getattr(os, "fdatasync", os.fsync)


class EveryThousand(Policy):
    """``every(items=1000)`` written as a user would (docs/runs.md, "a policy of your own")."""

    uses_clock = False  # never due by time alone: no watchdog thread
    uses_fraction = False  # never reads tick.fraction

    def __init__(self, items: int = 1000) -> None:
        self.items = items

    def __call__(self, tick: Tick) -> bool:
        return tick.items >= self.items

    def horizon(self, since: int, position: int, total: int | None, fraction_at_last: float) -> int | None:
        return self.items - since  # no need to ask before then


def every_thousand(tick: Tick) -> bool:
    """The same as a plain function: asked after every item, with the watchdog running."""
    return tick.items >= 1000


class _Stop(Exception):
    """Leaves a run block without completing the run."""


def write_numbers(path: Path, count: int) -> None:
    rng = random.Random(0)
    path.write_text("\n".join(str(rng.randint(-(10**9), 10**9)) for _ in range(count)) + "\n")


def plain(path: Path) -> int:
    state = {"total": 0}
    with open(path) as f:
        for line in f:
            state["total"] += int(line)
    return state["total"]


def resumable(path: Path, store: Path, **options: Any) -> int:
    """The same loop in a run; returns the commits it made."""
    with resume("bench", location=store, **options) as run:
        state = run.state
        state["total"] = 0
        for line in run.lines(path):
            state["total"] += int(line)
    return run.commits


def record_size(path: Path, store: Path) -> int:
    """Bytes of one journal record of the benchmark's run (for the floor)."""
    with contextlib.suppress(_Stop), resume("probe", location=store, policy=manual()) as run:
        run.state["total"] = 0
        for index, line in enumerate(run.lines(path)):
            run.state["total"] += int(line)
            if index == 1000:
                run.checkpoint()
                raise _Stop
    found = scan(next((store / "probe").glob("run-*.journal")).read_bytes())
    size = HEADER + len(found.records[-1][1])  # the newest record, as one commit appends it
    shutil.rmtree(store / "probe")
    return size


def plain_with_appends(path: Path, directory: Path, size: int, every_n: int) -> int:
    """The plain loop, appending a ``size``-byte record to a file and calling fdatasync
    every ``every_n`` lines: the floor of a durable small commit at that rate."""
    record = b"x" * size
    fd = os.open(directory / "floor.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)
    state, count = {"total": 0}, 0
    try:
        with open(path) as f:
            for line in f:
                state["total"] += int(line)
                count += 1
                if count == every_n:
                    os.write(fd, record)
                    _sync(fd)
                    count = 0
    finally:
        os.close(fd)
    return state["total"]


def park_at(path: Path, store: Path, name: str, lines: int) -> None:
    """Leave run ``name`` with a checkpoint after ``lines`` lines."""
    with contextlib.suppress(_Stop), resume(name, location=store, policy=manual()) as run:
        run.state["total"] = 0
        for index, line in enumerate(run.lines(path)):
            run.state["total"] += int(line)
            if index + 1 == lines:
                run.checkpoint()
                raise _Stop


def first_line_after_resume(path: Path, store: Path, name: str) -> str:
    with contextlib.suppress(_Stop), resume(name, location=store) as run:
        line = next(iter(run.lines(path)))
        raise _Stop
    return line


def first_line_after_rereading(path: Path, skip: int) -> str:
    with open(path) as f:
        for index, line in enumerate(f):
            if index == skip:
                return line
    raise ValueError("short file")


DEFAULT = "run.lines, default policy"
BUILTIN = "run.lines, every(items=1000)"
USER = "run.lines, user-written Policy = every(items=1000)"
ASYNC = "run.lines, every(items=1000), async"
NOSYNC = ", durable=False"
BUILTIN_CPU, USER_CPU = BUILTIN + NOSYNC, USER + NOSYNC
CALLABLE_CPU = "run.lines, a function of the Tick = every(items=1000)" + NOSYNC


def run(report: Report, quick: bool) -> None:
    count = report.pick(full=1_000_000, quick=100_000)
    repeat = report.pick(full=7, quick=2)
    with report.scratch("runs") as scratch:
        path, store = scratch / "numbers.txt", scratch / "store"
        write_numbers(path, count)
        size = record_size(path, store)
        commits: dict[str, list[int]] = {}

        def loop(label: str, **options: Any) -> Case:
            commits[label] = []
            return Case(lambda _: resumable(path, store, **options), after=commits[label].append)

        floor_name = f"plain loop + append {size} B & fdatasync every 1000"
        timings = compare({
            "plain loop": Case(lambda _: plain(path)),
            DEFAULT: loop(DEFAULT),
            BUILTIN: loop(BUILTIN, policy=every(items=1000)),
            USER: loop(USER, policy=EveryThousand()),
            ASYNC: loop(ASYNC, policy=every(items=1000), commit="async"),
            floor_name: Case(lambda _: plain_with_appends(path, scratch, size, 1000)),
            # the same policies without fdatasync: what the policy itself costs, out of the disk's noise
            BUILTIN_CPU: loop(BUILTIN_CPU, policy=every(items=1000), durable=False),
            USER_CPU: loop(USER_CPU, policy=EveryThousand(), durable=False),
            CALLABLE_CPU: loop(CALLABLE_CPU, policy=every_thousand, durable=False),
        }, repeat=repeat)
        stream = report.section(
            "Stream: a resumable loop against a plain one", reference="plain loop", statistic="best",
            description=f"{count:,} lines; every loop's body is state['total'] += int(line); "
                        f"durable commits unless durable=False; best of {repeat}")
        stream.add_all(timings)

        def against(label: str, builtin: str) -> str:
            spread = stream.spread(label, to=builtin)
            return (f"; {stream.ratio(label, to=builtin):.2f}× {builtin.removeprefix('run.lines, ')}"
                    + (f" ({spread.text()})" if spread else ""))

        for label, made in commits.items():
            low, high = min(made), max(made)
            stream.row(label).note = f"{low}-{high} commits written (coalesced)" if label == ASYNC else (
                f"{high} commits" if low == high else f"{low}-{high} commits")
        stream.row(USER).note += against(USER, BUILTIN)
        stream.row(USER_CPU).note += against(USER_CPU, BUILTIN_CPU)
        stream.row(CALLABLE_CPU).note += against(CALLABLE_CPU, BUILTIN_CPU)
        stream.row(floor_name).note = f"{count // 1000} appends"

        # One commit: what it adds to a loop, per round (the rounds are interleaved).
        rounds = zip(timings[BUILTIN].samples, timings[DEFAULT].samples, commits[BUILTIN], commits[DEFAULT],
                     timings[floor_name].samples, timings["plain loop"].samples, strict=True)
        ours, floor = [], []
        for every_s, default_s, every_n, default_n, floor_s, plain_s in rounds:
            ours.append((every_s - default_s) / (every_n - default_n))
            floor.append((floor_s - plain_s) / (count // 1000))
        commit = report.section(
            "Stream: one durable commit inside a loop", reference="append + fdatasync",
            description="time a commit every 1000 lines adds to the loop, median of the rounds")
        commit.add("append + fdatasync", floor, note=f"{size} B, the size of one of our records")
        commit.add("safepoint commit", ours, note="journal record: state, offset, file identity")

        # The target, measured apart: in the table above the default-policy loop alternates
        # with loops that call fdatasync a thousand times, whose writeback then delays its
        # own few flushes; here only the two loops alternate, with more rounds, after that
        # writeback is flushed.
        settle()
        alone = compare({"plain loop": Case(lambda _: plain(path)), DEFAULT: Case(lambda _: resumable(path, store))},
                        repeat=report.pick(full=15, quick=2))
        focused = report.section(
            "Stream: the default policy alone with a plain loop", reference="plain loop",
            statistic="best",
            description=f"{count:,} lines, the same loops as above, alternating with nothing "
                        "else; best of the rounds")
        focused.add_all(alone)

        start, ninety = 1, int(count * 0.9)
        park_at(path, store, "at-start", start)
        park_at(path, store, "at-90", ninety)
        resumes = compare({
            "resume at 0%": Case(lambda _: first_line_after_resume(path, store, "at-start")),
            "resume at 90%": Case(lambda _: first_line_after_resume(path, store, "at-90")),
            "re-read to 90% (no seek)": Case(lambda _: first_line_after_rereading(path, ninety)),
        }, repeat=report.pick(full=15, quick=3))
        resume_section = report.section(
            "Resume: open the run and read the next line", reference="resume at 0%",
            description="includes the durable commit of the new attempt number")
        resume_section.add_all(resumes)

    report.target("run.lines, default policy: overhead ≤ 5%", focused.ratio(DEFAULT), at_most=1.05,
                  spread=focused.spread(DEFAULT))
    report.target("a user-written every(items=1000) ≤ 1.05× the built-in (durable=False: the policy's own cost)",
                  stream.ratio(USER_CPU, to=BUILTIN_CPU), at_most=1.05,
                  spread=stream.spread(USER_CPU, to=BUILTIN_CPU))
    report.target("a user-written every(items=1000) ÷ the built-in, durable commits (no target)",
                  stream.ratio(USER, to=BUILTIN), spread=stream.spread(USER, to=BUILTIN))
    report.target("a user-written every(items=1000) ÷ a plain loop, durable commits (no target)",
                  stream.ratio(USER), spread=stream.spread(USER))
    report.target("every(items=1000) as a function of the Tick ÷ the built-in, durable=False "
                  "(asked after every item; no target)", stream.ratio(CALLABLE_CPU, to=BUILTIN_CPU),
                  spread=stream.spread(CALLABLE_CPU, to=BUILTIN_CPU))
    report.target("every(items=1000): one commit ≤ 2× append + fdatasync",
                  commit.ratio("safepoint commit"), at_most=2.0,
                  spread=commit.spread("safepoint commit"))
    report.target("commit=\"async\", every(items=1000): overhead ≤ 20%",
                  stream.ratio(ASYNC), at_most=1.2, spread=stream.spread(ASYNC))
    report.target("resume at 90% ≤ 1.1× resume at 0%", resume_section.ratio("resume at 90%"), at_most=1.1,
                  spread=resume_section.spread("resume at 90%"))
