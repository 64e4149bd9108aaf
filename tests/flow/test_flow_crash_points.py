"""Crash-point sweeps of flows: a SIGKILL at every site of a five-step flow, and a second
SIGKILL at every site of its resume.

A flow checkpoints after every step (its policy is fixed: ``after_substep()``). Each step
appends its index to the state and adds up the data the step before it returned (the first
step reads what its loader returned; step 1 returns an array stored apart from its
record); step 2 has a saver. Sites: in the loader, at the
start and after the state change of each step, in the saver. Every crash point must resume
at the step it interrupted, with the state and the data committed before it, and end with
the uninterrupted result; no step that completed before a crash runs again.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import safepoint
from crash_sweep import (
    Crash,
    Probe,
    crash_everywhere,
    durable,
    fork,
    outcome,
    play,
    probe_store_changes,
    sweep,
)
from safepoint.flow import Flow

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fork and SIGKILL")

NAME = "sweep"
STEPS = 5
SEED = [1, 2]
CALLS = ["load", "s0", "s1", "s2", "save 2", "s3", "s4"]
"""The calls of user code in an uninterrupted run, in order."""


def output(k: int) -> Any:
    """What step ``k`` returns: step 1 an array large enough to be stored as a checkpoint
    step of its own, the others a small list kept inside their record."""
    return np.arange(4000, dtype=np.int64) if k == 1 else [k, k * k]


def state_after(steps: int) -> dict[str, Any]:
    """The state after the first ``steps`` steps."""
    total = sum(int(sum(SEED if k == 0 else output(k - 1))) + k for k in range(steps))
    return {"done": list(range(steps)), "total": total}


def child(folder: Path, plan: str | None, attempt: int, reference: bool, *,
          store_changes: bool = False) -> None:
    """Run (or resume) the flow to its end; with ``store_changes``, the sites include every
    change to the store."""
    store = folder / "store"
    probe = Probe(folder, plan, attempt, (lambda: durable(store, NAME)) if reference else None)
    if store_changes:
        probe_store_changes(probe)
    flow = Flow(NAME, location=store)

    def load(state: dict[str, Any]) -> dict[str, Any]:
        probe.call("load")
        probe.site("load 0")
        return {"seed": SEED}

    def save(state: dict[str, Any], data: Any) -> None:
        probe.call("save 2")
        probe.site("save 2")

    def step(k: int) -> Any:
        def run(state: dict[str, Any], data: Any) -> Any:
            probe.call(f"s{k}")
            probe.site(f"start {k}")
            state["done"].append(k)
            state["total"] += int(sum(data["seed"] if k == 0 else data[f"s{k - 1}"])) + k
            probe.site(f"mid {k}")
            return output(k)

        return run

    for k in range(STEPS):
        flow.step(name=f"s{k}", load=load if k == 0 else None, save=save if k == 2 else None)(step(k))
    probe.finish(flow.run({"done": [], "total": 0}))


def steps_done(saved: dict[str, Any] | None) -> int:
    """Steps whose outcome is recorded as done (a resume starts after them)."""
    keys = set(saved["steps"]) if saved is not None else set()
    count = 0
    while f"#{count}" in keys:
        count += 1
    return count


def step_of(site: str) -> int:
    return int(site.split()[1])


def made_before(site: str) -> int:
    """How many calls of user code an uninterrupted run has made at ``site``."""
    if site == "load 0":
        return 1
    if site == "save 2":
        return CALLS.index("save 2") + 1
    return CALLS.index(f"s{step_of(site)}") + 1


def first_call_of(step: int) -> int:
    """Where in CALLS a run that starts at ``step`` starts (the loader of step 0)."""
    return 0 if step == 0 else CALLS.index(f"s{step}")


def killed(folder: Path) -> tuple[dict[str, Any] | None, bool]:
    return durable(folder / "store", NAME), safepoint.check(folder / "store").ok


def reference_of(folder: Path, crashes: list[str]) -> Any:
    """The uninterrupted run after ``crashes``; every commit holds the state after the
    steps it records as done."""
    reference = play(child, folder, crashes, reference=True)
    assert reference.result == state_after(STEPS)
    for site, saved in reference.sites:
        assert steps_done(saved) == step_of(site)  # each step recorded before the next runs
        assert saved is not None and saved["tree"]["state"] == state_after(step_of(site))
    return reference


def test_a_crash_at_any_point_of_a_flow_resumes_at_the_step_it_interrupted(tmp_path: Path) -> None:
    reference = reference_of(tmp_path / "reference", [])
    assert [site for site, _ in reference.sites] == [
        "load 0", "start 0", "mid 0", "start 1", "mid 1", "start 2", "mid 2", "save 2",
        "start 3", "mid 3", "start 4", "mid 4"]

    def resumed_exactly(crash: Crash) -> None:
        assert crash.killed == (crash.expected, True)
        found = crash.outcome
        assert found is not None and found.result == state_after(STEPS)
        assert found.calls.get(1, []) == CALLS[:made_before(crash.site)]
        assert found.calls.get(2, []) == CALLS[first_call_of(step_of(crash.site)):]
        report = safepoint.check(crash.folder / "store")
        assert report.ok and report.clean, report.findings

    sweep(crash_everywhere(child, tmp_path, reference.sites, killed), resumed_exactly)
    report = safepoint.check(reference.folder / "store")
    assert report.ok and report.clean, report.findings


def test_a_second_crash_at_any_point_of_the_resume_runs_no_step_twice(tmp_path: Path) -> None:
    first = "mid 2"
    reference = reference_of(tmp_path / "reference", [first])
    assert reference.sites[0][0] == "start 2"  # the resume starts at the interrupted step

    def resumed_exactly(crash: Crash) -> None:
        assert crash.killed == (crash.expected, True)
        found = crash.outcome
        assert found is not None and found.result == state_after(STEPS)
        counts = Counter(call for calls in found.calls.values() for call in calls)
        again = Counter(CALLS[first_call_of(step_of(crash.site)):made_before(crash.site)])
        assert counts == Counter(CALLS) + Counter(["s2"]) + again
        report = safepoint.check(crash.folder / "store")
        assert report.ok and report.clean, report.findings

    sweep(crash_everywhere(child, tmp_path, reference.sites, killed, before=(first,)), resumed_exactly)


def store_child(folder: Path, plan: str | None, attempt: int, reference: bool) -> None:
    child(folder, plan, attempt, reference, store_changes=True)


def run_once(folder: Path) -> None:
    """A first run to the end, before the run that is swept (attempt 0 in the call log)."""
    assert fork(child, folder, None, 0) == 0


@pytest.mark.parametrize("runs_before", [0, 1], ids=["first-run", "rerun-of-a-completed-flow"])
def test_a_crash_at_any_change_to_the_store_resumes_exactly_and_leaves_it_clean(
        tmp_path: Path, runs_before: int) -> None:
    """Kills inside safepoint itself: before and after every write, commit and deletion the
    flow makes (its lease, its journal, each step's record, the array step 1 returns and
    its manifest; on a rerun of a completed flow, the reset of its steps and the deletion
    of their data), as well as at the flow's own sites."""
    setup = run_once if runs_before else None
    folder = tmp_path / "reference"
    folder.mkdir()
    if setup is not None:
        setup(folder)
    assert fork(store_child, folder, None, 1, True) == 0
    reference = outcome(folder)
    assert reference.result == state_after(STEPS)
    ops = {site.split()[3] for site, _ in reference.sites if site.startswith("op ")}
    assert {"create", "append", "delete"} <= ops, ops  # the lease, the journal, the cleanup
    assert any(" write_blob sweep/" in site for site, _ in reference.sites)  # the array's data

    def resumed_exactly(crash: Crash) -> None:
        assert crash.killed == (crash.expected, True)
        found = crash.outcome
        assert found is not None and found.result == state_after(STEPS)
        resumed = steps_done(crash.expected)  # the steps recorded when it died
        if resumed == STEPS:
            resumed = 0  # it had completed: the next run starts over (keep_completed=False)
        assert found.calls.get(2, []) == CALLS[first_call_of(resumed):]
        report = safepoint.check(crash.folder / "store")
        assert report.ok and report.clean, report.findings

    sweep(crash_everywhere(store_child, tmp_path, reference.sites, killed, setup=setup),
          resumed_exactly)
    report = safepoint.check(reference.folder / "store")
    assert report.ok and report.clean, report.findings
