"""Crash-point sweeps of tasks: a SIGKILL at every site of a task whose loop runs a durable
step in every item, under every policy; and a second SIGKILL at every site of the resume.

The task runs a top-level step (``prepare``), then ``ctx.range(N)`` whose item calls the
step ``square`` and adds its result to ``ctx.state``; items may end with
``ctx.checkpoint()`` or ``ctx.maybe_checkpoint()``. Sites: inside each step, after the
step and the item's state change, after its checkpoint call, after the loop. Every crash
point must resume to the uninterrupted result, and a step whose outcome was recorded
before a crash must never run again: each call of a step is logged (fsync'd) by the child,
and the sweep counts them.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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
    probe_store_changes,
    sweep,
)
from safepoint.policy import PolicyLike, after_substep, every, manual
from safepoint.tasks import TaskContext

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fork and SIGKILL")

NAME = "sweep"
N = 8
BASE = 100
EXPECTED = {"done": list(range(N)), "total": sum(BASE + i * i for i in range(N))}
CALLS = ["prepare", *(f"square {i}" for i in range(N))]
"""The calls of step functions in an uninterrupted run, in order."""
KEYS = ["#0", *(f"0:{i}#0" for i in range(N))]
"""The keys of their step records (the top level, then item i of loop 0)."""


@dataclass(frozen=True)
class Case:
    """One task to sweep."""

    id: str
    policy: Callable[[], PolicyLike | None]
    commits: tuple[int, ...]
    """The positions the uninterrupted run commits, in order (pinned; 0 is a commit at
    the top level, before the loop)."""
    dt: float = 1.0
    checkpoint_at: frozenset[int] = frozenset()
    maybe: bool = False
    first_crash: str | None = None
    """For the double sweep: where the first attempt dies (then the second attempt is
    killed at each of its sites)."""


# A completed sub-step counts as a boundary for the policy (docs/tasks.md), so a count
# policy sees two per item here: the step and the item.
CASES = [
    Case("every-1", lambda: every(items=1), (0, *range(1, N + 1))),
    Case("every-3", lambda: every(items=3), (1, 3, 5, 7, 8), first_crash="mid 6"),
    Case("manual-checkpoints", manual, (3, 6, 8), checkpoint_at=frozenset({2, 5}),
         first_crash="mid 4"),
    Case("after-substep-checkpoint", after_substep, (0, 4, 8), checkpoint_at=frozenset({3})),
    # after_substep() | every(seconds=10): after the top-level step, then every 4 items
    Case("default", lambda: None, (0, 4, 8), dt=2.5, first_crash="mid 6"),
    Case("function-maybe", lambda: every_third, (1, 3, 5, 7, 8), maybe=True),
    Case("subclass-checkpoint", EveryThird, (1, 3, 4, 6, 8), checkpoint_at=frozenset({3})),
]


def child_for(case: Case, *, store_changes: bool = False) -> Callable[[Path, str | None, int, bool], None]:
    """The child of ``case``: runs (or resumes) the job to its end. With ``store_changes``,
    every change to the store is a site too, and ``ctx.results`` holds an array, so that
    every checkpoint writes (and releases) a checkpoint step of its own."""

    def child(folder: Path, plan: str | None, attempt: int, reference: bool) -> None:
        store, clock = folder / "store", FakeClock()
        probe = Probe(folder, plan, attempt, (lambda: durable(store, NAME)) if reference else None)
        if store_changes:
            probe_store_changes(probe)

        def prepare() -> int:
            probe.call("prepare")
            probe.site("inside prepare")
            return BASE

        def square(i: int) -> int:
            probe.call(f"square {i}")
            probe.site(f"inside {i}")
            return i * i

        @safepoint.task(policy=case.policy(), clock=clock)
        def sweep_task(ctx: TaskContext, n: int) -> dict[str, Any]:
            ctx.state.setdefault("done", [])
            ctx.state.setdefault("total", 0)
            if store_changes:
                ctx.results.setdefault("table", np.arange(4000, dtype=np.int64))
            base = ctx.step("prepare", prepare)
            probe.site("begin")
            for i in ctx.range(n):
                clock.advance(case.dt)
                probe.site(f"start {i}")
                value = ctx.step("square", square, i)
                ctx.state["done"].append(i)
                ctx.state["total"] += base + value
                probe.site(f"mid {i}")
                if i in case.checkpoint_at:
                    ctx.checkpoint()
                    probe.site(f"end {i}")
                elif case.maybe:
                    ctx.maybe_checkpoint()
                    probe.site(f"end {i}")
            probe.site("after")
            return dict(ctx.state)

        probe.finish(safepoint.run_task(sweep_task, N, job_id=NAME, location=store))

    return child


def position(saved: dict[str, Any] | None) -> int:
    """Items a resume from ``saved`` counts as done."""
    if saved is None or not saved["frames"]:
        return 0
    _, at, finished = saved["frames"][-1]
    return N if finished or saved["complete"] else at


def calls_before(site: str) -> int:
    """How many step calls an uninterrupted run has made when it reaches ``site``."""
    where, _, at = site.partition(" ")
    if where in ("begin", "after") or at == "prepare":
        return 1 if where != "after" else 1 + N
    return 1 + int(at) + (where != "start")


def completed_before(site: str) -> int:
    """How many steps (in the order of CALLS) have completed at ``site``."""
    return calls_before(site) - site.startswith("inside")


def consistent(saved: dict[str, Any] | None, completed: int) -> None:
    """What is durable when ``completed`` steps have completed: a state of exactly the
    items the position counts, and the outcome of every step a resume from there reaches
    (the top-level one, and those of the items from the position on)."""
    committed = saved is not None and saved["frames"] is not None
    done = position(saved)
    state = saved["tree"]["state"] if committed else {"done": [], "total": 0}
    assert state == {"done": list(range(done)), "total": sum(BASE + i * i for i in range(done))}
    needed = {key for i, key in enumerate(KEYS[:completed]) if i == 0 or i - 1 >= done}
    assert needed <= set(saved["steps"] if saved is not None else ()), "a completed step is lost"


def commits(sites: list[tuple[str, Any]]) -> list[int]:
    """The positions of the state records seen at ``sites``, without repeats."""
    return distinct([position(s) for _, s in sites if s is not None and s["frames"] is not None])


def killed(folder: Path) -> tuple[dict[str, Any] | None, bool]:
    """What a kill left: what a resume starts from, and whether the store has no damage."""
    return durable(folder / "store", NAME), safepoint.check(folder / "store").ok


def reference_of(case: Case, folder: Path, crashes: list[str]) -> Any:
    """The uninterrupted run after ``crashes``; checks every commit it made."""
    reference = play(child_for(case), folder, crashes, reference=True)
    assert reference.result == EXPECTED
    before = max((completed_before(c) for c in crashes), default=0)
    for site, saved in reference.sites:
        consistent(saved, max(before, completed_before(site)))
    return reference


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_a_crash_at_any_point_of_a_task_resumes_exactly_and_runs_no_step_twice(
        case: Case, tmp_path: Path) -> None:
    reference = reference_of(case, tmp_path / "reference", [])
    ends = len(case.checkpoint_at) if not case.maybe else N
    assert len(reference.sites) == 3 + 3 * N + ends
    assert commits(reference.sites) == list(case.commits)

    def resumed_exactly(crash: Crash) -> None:
        assert crash.killed == (crash.expected, True)  # what the reference had committed there
        found = crash.outcome
        assert found is not None and found.result == EXPECTED
        made = calls_before(crash.site)
        assert found.calls.get(1, []) == CALLS[:made]
        # the step running at the crash runs again; no step recorded before it does
        assert found.calls.get(2, []) == CALLS[made - crash.site.startswith("inside"):]
        report = safepoint.check(crash.folder / "store")
        assert report.ok and report.clean, report.findings

    sweep(crash_everywhere(child_for(case), tmp_path, reference.sites, killed), resumed_exactly)
    report = safepoint.check(reference.folder / "store")
    assert report.ok and report.clean, report.findings


@pytest.mark.parametrize("case", [c for c in CASES if c.first_crash], ids=lambda case: case.id)
def test_a_second_crash_at_any_point_of_the_resume_runs_no_step_twice(case: Case, tmp_path: Path) -> None:
    """The resume of a crashed task is killed again, at each of its sites: what the first
    attempt recorded (its position, and the steps it completed past it) must survive the
    second writer's records too."""
    assert case.first_crash is not None
    reference = reference_of(case, tmp_path / "reference", [case.first_crash])

    def resumed_exactly(crash: Crash) -> None:
        assert crash.killed == (crash.expected, True)
        found = crash.outcome
        assert found is not None and found.result == EXPECTED
        counts = Counter(call for calls in found.calls.values() for call in calls)
        interrupted = Counter(s.replace("inside ", "square ").replace("square prepare", "prepare")
                              for s in (case.first_crash, crash.site) if s.startswith("inside"))
        assert counts == Counter(CALLS) + interrupted  # each step once, plus each interrupted one
        report = safepoint.check(crash.folder / "store")
        assert report.ok and report.clean, report.findings

    crashes = crash_everywhere(child_for(case), tmp_path, reference.sites, killed,
                               before=(case.first_crash,))
    sweep(crashes, resumed_exactly)


@pytest.mark.parametrize("before", [(), ("mid 4",)], ids=["first-attempt", "resume"])
def test_a_crash_at_any_change_to_the_store_runs_no_step_twice_and_leaves_it_clean(
        tmp_path: Path, before: tuple[str, ...]) -> None:
    """Kills inside safepoint: before and after every change the task makes to its store
    (its lease, its journal, every step record, every checkpoint of its state and results
    and the deletion of the one before), in its first attempt and in the resume of an
    attempt killed in item 4 (whose new segment carries the checkpoint and the steps past
    it)."""
    case = next(c for c in CASES if c.id == "manual-checkpoints")
    child = child_for(case, store_changes=True)
    reference = play(child, tmp_path / "reference", list(before), reference=True)
    assert reference.result == EXPECTED
    sites = reference.sites
    assert sum(" write_blob " in site for site, _ in sites) >= 3  # the checkpoints of the state
    assert any(" delete " in site for site, _ in sites)
    attempt = len(before) + 2  # the resume after the swept crash

    def resumed_exactly(crash: Crash) -> None:
        assert crash.killed == (crash.expected, True)
        found = crash.outcome
        assert found is not None and found.result == EXPECTED
        saved = crash.expected
        if saved is not None and saved["complete"]:
            expected_calls: list[str] = []  # the job's recorded result is returned
        else:
            durable_steps = set(saved["steps"]) if saved is not None else set()
            expected_calls = [call for call, key in zip(CALLS, KEYS, strict=True)
                              if key not in durable_steps and (key == "#0" or int(key[2:-2]) >= position(saved))]
        assert found.calls.get(attempt, []) == expected_calls  # no recorded step runs again
        report = safepoint.check(crash.folder / "store")
        assert report.ok and report.clean, report.findings

    sweep(crash_everywhere(child, tmp_path, sites, killed, before=before), resumed_exactly)
    report = safepoint.check(reference.folder / "store")
    assert report.ok and report.clean, report.findings
