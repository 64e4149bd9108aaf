"""Crash-point sweeps of runs: a SIGKILL at every site of a loop, under every policy.

For each case (a policy, where the body checkpoints, what the loop reads) an uninterrupted
reference child records, at every site (the start of each item, after its state change,
after a checkpoint in its body, after the loop), what a resume would start from there. Then,
for every site, a fresh child is killed exactly there; the test checks that the kill left
what the reference had made durable (state and position of one commit: the items in the
state are exactly the items the position counts), resumes, and compares with the
reference: the same final state, every item after the resume point done once, none before
it done again. The commits of the reference are pinned per case, so that a policy that
stopped committing cannot pass unnoticed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import safepoint
from crash_sweep import (
    Crash,
    EveryThird,
    FakeClock,
    Probe,
    crash_everywhere,
    distinct,
    durable,
    every_third,
    play,
    sweep,
)
from safepoint.policy import PolicyLike, after_substep, every, manual
from safepoint.run import Run

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fork and SIGKILL")

NAME = "sweep"
N = 10


@dataclass(frozen=True)
class Case:
    """One loop to sweep."""

    id: str
    policy: Callable[[], PolicyLike | None]
    commits: tuple[int, ...]
    """The positions the uninterrupted run commits, in order (pinned)."""
    dt: float = 1.0
    """Seconds of the fake clock each item takes."""
    checkpoint_at: frozenset[int] = frozenset()
    """Items whose body ends with ``run.checkpoint()``."""
    maybe: bool = False
    """Every other item's body ends with ``run.maybe_checkpoint()``."""
    source: str = "range"
    """``range``, ``iterate`` (a list) or ``lines`` (a file of numbers)."""


CASES = [
    Case("every-1", lambda: every(items=1), tuple(range(1, N + 1))),
    Case("every-3", lambda: every(items=3), (3, 6, 9, 10)),
    Case("every-3-maybe", lambda: every(items=3), (3, 6, 9, 10), maybe=True, source="iterate"),
    Case("every-3-checkpoint", lambda: every(items=3), (3, 5, 8, 10), checkpoint_at=frozenset({4}),
         source="lines"),
    Case("seconds-3", lambda: every(seconds=3), (3, 6, 9, 10)),
    Case("seconds-3-maybe", lambda: every(seconds=3), (3, 6, 9, 10), maybe=True),
    Case("manual-maybe", manual, (10,), maybe=True, source="lines"),  # maybe never commits
    Case("manual-checkpoints", manual, (3, 6, 7, 10), checkpoint_at=frozenset({2, 5, 6})),
    Case("after-substep-checkpoint", after_substep, (5, 10), checkpoint_at=frozenset({4})),
    Case("default", lambda: None, (2, 4, 6, 8, 10), dt=0.25),  # every 0.5 s of the fake clock
    Case("function-maybe", lambda: every_third, (3, 6, 9, 10), maybe=True, source="iterate"),
    Case("subclass-checkpoint", EveryThird, (3, 5, 8, 10), checkpoint_at=frozenset({4})),
]


def items(run: Run, case: Case, folder: Path) -> Iterator[int]:
    """The loop of ``case``: 0 .. N-1 from a range, a list or the lines of a file."""
    if case.source == "range":
        return run.range(N)
    if case.source == "iterate":
        return run.iterate(list(range(N)))
    return (int(line) for line in run.lines(folder / "items.txt"))


def child_for(case: Case) -> Callable[[Path, str | None, int, bool], None]:
    """The child of ``case``: a run that appends each item to its state and adds its
    square to a total, passing a site before and after each item's state change."""

    def child(folder: Path, plan: str | None, attempt: int, reference: bool) -> None:
        store, clock = folder / "store", FakeClock()
        probe = Probe(folder, plan, attempt, (lambda: durable(store, NAME)) if reference else None)
        with safepoint.resume(NAME, location=store, policy=case.policy(), clock=clock,
                              keep_completed=True) as run:
            run.state.setdefault("done", [])
            run.state.setdefault("total", 0)
            for i in items(run, case, folder):
                clock.advance(case.dt)
                probe.site(f"start {i}")
                probe.call(str(i))
                run.state["done"].append(i)
                run.state["total"] += i * i
                probe.site(f"mid {i}")
                if i in case.checkpoint_at:
                    run.checkpoint()
                    probe.site(f"end {i}")
                elif case.maybe:
                    run.maybe_checkpoint()
                    probe.site(f"end {i}")
            probe.site("after")
        probe.finish(run.state)

    return child


def position(saved: dict[str, Any] | None) -> int:
    """Items a resume from ``saved`` counts as done."""
    if saved is None or not saved["frames"]:
        return 0
    _, at, finished = saved["frames"][-1]
    return N if finished or saved["complete"] else at


def crashed_after(site: str) -> int:
    """Items the crashed child had started when it died at ``site``."""
    if site == "after":
        return N
    where, index = site.split()
    return int(index) + (where != "start")


def write_items(folder: Path) -> None:
    """The input of the ``lines`` cases."""
    (folder / "items.txt").write_text("".join(f"{i}\n" for i in range(N)))


def killed(folder: Path) -> tuple[dict[str, Any] | None, bool]:
    """What a kill left: what a resume starts from, and whether the store has no damage."""
    return durable(folder / "store", NAME), safepoint.check(folder / "store").ok


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_a_crash_at_any_point_of_a_run_resumes_exactly(case: Case, tmp_path: Path) -> None:
    child = child_for(case)
    folder = tmp_path / "reference"
    folder.mkdir()
    write_items(folder)
    reference = play(child, folder, [], reference=True)
    expected = {"done": list(range(N)), "total": sum(i * i for i in range(N))}
    assert reference.result == expected
    ends = len(case.checkpoint_at) if not case.maybe else N
    assert len(reference.sites) == 2 * N + ends + 1  # start and mid of each item, ends, after
    assert distinct([position(s) for _, s in reference.sites if s is not None]) == list(case.commits)
    for _, saved in reference.sites:  # each commit holds the state of the items it counts
        done = position(saved)
        tree = saved["tree"] if saved is not None else {"done": [], "total": 0}
        assert tree == {"done": list(range(done)), "total": sum(i * i for i in range(done))}

    def resumed_exactly(crash: Crash) -> None:
        assert crash.killed == (crash.expected, True)  # what the reference had committed there
        found = crash.outcome
        assert found is not None and found.result == expected
        assert found.calls.get(1, []) == [str(i) for i in range(crashed_after(crash.site))]
        assert found.calls.get(2, []) == [str(i) for i in range(position(crash.expected), N)]
        report = safepoint.check(crash.folder / "store")
        assert report.ok and report.clean, report.findings

    sweep(crash_everywhere(child, tmp_path, reference.sites, killed, setup=write_items),
          resumed_exactly)
    report = safepoint.check(reference.folder / "store")
    assert report.ok and report.clean, report.findings


def test_a_manual_checkpoint_then_a_crash_items_later_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """The former bug, as reported: manual(), run.checkpoint() at the end of item 9, a kill
    during item 12; the resume gave [0..9, 9, 10..19] (item 9 done twice)."""
    n = 20

    def child(folder: Path, plan: str | None, attempt: int, reference: bool) -> None:
        probe = Probe(folder, plan, attempt)
        with safepoint.resume(NAME, location=folder / "store", policy=manual()) as run:
            run.state.setdefault("done", [])
            for i in run.range(n):
                probe.call(str(i))
                run.state["done"].append(i)
                if i == 9:
                    run.checkpoint()
                probe.site(f"mid {i}")
        probe.finish(run.state["done"])

    found = play(child, tmp_path, ["mid 12"])
    assert found.result == list(range(n))
    assert found.calls == {1: [str(i) for i in range(13)], 2: [str(i) for i in range(10, n)]}
    report = safepoint.check(tmp_path / "store")
    assert report.ok and report.clean, report.findings


# ------------------------------------------------------------------ nested loops

OUTER, INNER = 3, 3
LEAVES = [[i, j] for i in range(OUTER) for j in range(INNER)]


@dataclass(frozen=True)
class NestedCase:
    """Two nested loops to sweep: the inner item appends ``[i, j]`` to ``done``, the outer
    item appends ``i`` to ``rows`` after its inner loop."""

    id: str
    policy: Callable[[], PolicyLike | None]
    commits: tuple[tuple[int, int], ...]
    """(leaves, rows) counted done by each commit of the uninterrupted run, in order."""
    dt: float = 1.0
    inner_checkpoint_at: frozenset[tuple[int, int]] = frozenset()
    outer_end: str | None = None
    """``checkpoint`` or ``maybe``: how each outer item's body ends."""


EVERY_LEAF = ((1, 0), (2, 0), (3, 0), (3, 1), (4, 1), (5, 1), (6, 1), (6, 2), (7, 2), (8, 2),
              (9, 2), (9, 3))
NESTED = [
    # boundaries of both loops count; the inner loop's end always commits
    NestedCase("every-2", lambda: every(items=2), ((2, 0), (3, 0), (4, 1), (6, 1), (7, 2), (9, 2), (9, 3))),
    NestedCase("every-1-outer-maybe", lambda: every(items=1), EVERY_LEAF, outer_end="maybe"),
    NestedCase("manual-inner-checkpoint", manual, ((3, 0), (5, 1), (6, 1), (9, 2), (9, 3)),
               inner_checkpoint_at=frozenset({(1, 1)})),
    NestedCase("manual-outer-checkpoint", manual, ((3, 0), (3, 1), (6, 1), (6, 2), (9, 2), (9, 3)),
               outer_end="checkpoint"),
    NestedCase("function", lambda: every_third, ((3, 0), (5, 1), (6, 1), (8, 2), (9, 2), (9, 3))),
]


def nested_child_for(case: NestedCase) -> Callable[[Path, str | None, int, bool], None]:
    def child(folder: Path, plan: str | None, attempt: int, reference: bool) -> None:
        store, clock = folder / "store", FakeClock()
        probe = Probe(folder, plan, attempt, (lambda: durable(store, NAME)) if reference else None)
        with safepoint.resume(NAME, location=store, policy=case.policy(), clock=clock,
                              keep_completed=True) as run:
            run.state.setdefault("done", [])
            run.state.setdefault("rows", [])
            for i in run.range(OUTER):
                probe.site(f"outer {i}")
                for j in run.range(INNER):
                    clock.advance(case.dt)
                    probe.site(f"start {i}.{j}")
                    probe.call(f"{i}.{j}")
                    run.state["done"].append([i, j])
                    probe.site(f"mid {i}.{j}")
                    if (i, j) in case.inner_checkpoint_at:
                        run.checkpoint()
                        probe.site(f"end {i}.{j}")
                probe.site(f"inner-done {i}")
                probe.call(f"row {i}")
                run.state["rows"].append(i)
                probe.site(f"row {i}")
                if case.outer_end == "checkpoint":
                    run.checkpoint()
                    probe.site(f"row-end {i}")
                elif case.outer_end == "maybe":
                    run.maybe_checkpoint()
                    probe.site(f"row-end {i}")
            probe.site("after")
        probe.finish(run.state)

    return child


def nested_done(saved: dict[str, Any] | None) -> tuple[int, int]:
    """(leaves, rows) a resume from ``saved`` counts as done."""
    if saved is None or not saved["frames"]:
        return 0, 0
    frames = saved["frames"]
    if saved["complete"] or (len(frames) == 1 and frames[0][2]):
        return len(LEAVES), OUTER
    outer = frames[0][1]
    if len(frames) == 1:
        return outer * INNER, outer
    _, inner, finished = frames[1]
    return outer * INNER + (INNER if finished else inner), outer


def nested_crashed_after(site: str) -> list[str]:
    """The calls the crashed child made before it died at ``site``."""
    calls = [c for i in range(OUTER) for c in [*(f"{i}.{j}" for j in range(INNER)), f"row {i}"]]
    if site == "after":
        return calls
    where, at = site.split()
    index = {"outer": lambda: calls.index(f"{at}.0"), "inner-done": lambda: calls.index(f"row {at}"),
             "row": lambda: calls.index(f"row {at}") + 1, "row-end": lambda: calls.index(f"row {at}") + 1,
             "start": lambda: calls.index(at), "mid": lambda: calls.index(at) + 1,
             "end": lambda: calls.index(at) + 1}[where]()
    return calls[:index]


def nested_calls_from(leaves: int, rows: int) -> list[str]:
    """The calls a resume from (leaves, rows) done makes: the rest, each once."""
    calls = []
    for i in range(rows, OUTER):
        calls += [f"{i}.{j}" for j in range(INNER) if i * INNER + j >= leaves]
        calls.append(f"row {i}")
    return calls


@pytest.mark.parametrize("case", NESTED, ids=lambda case: case.id)
def test_a_crash_at_any_point_of_nested_loops_resumes_exactly(case: NestedCase, tmp_path: Path) -> None:
    child = nested_child_for(case)
    reference = play(child, tmp_path / "reference", [], reference=True)
    expected = {"done": LEAVES, "rows": list(range(OUTER))}
    assert reference.result == expected
    ends = len(case.inner_checkpoint_at) + (OUTER if case.outer_end else 0)
    assert len(reference.sites) == 2 * len(LEAVES) + 3 * OUTER + ends + 1
    assert distinct([nested_done(s) for _, s in reference.sites if s is not None]) == list(case.commits)
    for _, saved in reference.sites:
        leaves, rows = nested_done(saved)
        tree = saved["tree"] if saved is not None else {"done": [], "rows": []}
        assert tree == {"done": LEAVES[:leaves], "rows": list(range(rows))}

    def resumed_exactly(crash: Crash) -> None:
        assert crash.killed == (crash.expected, True)
        found = crash.outcome
        assert found is not None and found.result == expected
        assert found.calls.get(1, []) == nested_crashed_after(crash.site)
        assert found.calls.get(2, []) == nested_calls_from(*nested_done(crash.expected))
        report = safepoint.check(crash.folder / "store")
        assert report.ok and report.clean, report.findings

    sweep(crash_everywhere(child, tmp_path, reference.sites, killed), resumed_exactly)
    report = safepoint.check(reference.folder / "store")
    assert report.ok and report.clean, report.findings
