"""Attempts of one job in one process: a takeover fences the older attempt, which can no
longer commit or complete; a duplicate submission waits for the running one."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from safepoint import check
from safepoint.errors import LeaseHeld, StaleAttempt
from safepoint.policy import every
from safepoint.tasks import TaskContext, run_task, task


def test_a_takeover_fences_the_older_attempt(tmp_path: Path) -> None:
    location = tmp_path / "store"
    a_paused, a_go, b_paused, b_go = (threading.Event() for _ in range(4))
    done: list[tuple[int, int]] = []

    @task(policy=every(items=1), durable=False)
    def job(ctx: TaskContext, n: int) -> dict[str, int]:
        ctx.state.setdefault("total", 0)
        for i in ctx.range(n):
            if (ctx.attempt, i) == (1, 4):  # attempt 1 hangs here...
                a_paused.set()
                assert a_go.wait(10)
            if (ctx.attempt, i) == (2, 7):  # ...attempt 2 takes over, and waits here
                b_paused.set()
                assert b_go.wait(10)
            done.append((ctx.attempt, i))
            ctx.state["total"] += i
        return {"total": ctx.state["total"], "attempt": ctx.attempt}

    outcomes: dict[int, Any] = {}

    def attempt(label: int) -> None:
        try:
            outcomes[label] = job.run((10,), {}, job_id="j", location=location,
                                      takeover=label == 2)
        except BaseException as exc:  # collected for the main thread's assertions
            outcomes[label] = exc

    first = threading.Thread(target=attempt, args=(1,))
    first.start()
    assert a_paused.wait(10)
    second = threading.Thread(target=attempt, args=(2,))
    second.start()
    assert b_paused.wait(10)
    a_go.set()  # the old attempt wakes up: its next commit is refused
    first.join(10)
    assert isinstance(outcomes[1], StaleAttempt)
    assert (outcomes[1].attempt, outcomes[1].current) == (1, 2)
    b_go.set()
    second.join(10)
    assert outcomes[2] == {"total": sum(range(10)), "attempt": 2}
    # attempt 2 resumed from attempt 1's checkpoint after item 3
    assert sorted(done) == [(1, i) for i in range(5)] + [(2, i) for i in range(4, 10)]
    assert check(location).ok


def test_a_duplicate_submission_waits_for_the_running_attempt(tmp_path: Path) -> None:
    location = tmp_path / "store"
    started, go = threading.Event(), threading.Event()
    calls: list[int] = []

    @task(durable=False)
    def job(ctx: TaskContext) -> int:
        calls.append(ctx.attempt)
        started.set()
        assert go.wait(10)
        return 42

    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(run_task(job, job_id="j", location=location)))
    first.start()
    assert started.wait(10)
    with pytest.raises(LeaseHeld, match="is being written by task pid"):
        job.run((), {}, job_id="j", location=location, wait=0)  # refuse at once
    second = threading.Thread(target=lambda: results.append(run_task(job, job_id="j", location=location)))
    second.start()  # waits for the first
    go.set()
    first.join(10)
    second.join(10)
    assert results == [42, 42] and calls == [1]  # the duplicate got the result, ran nothing
    assert check(location).ok


def test_a_fenced_attempt_runs_no_further_step(tmp_path: Path) -> None:
    """A takeover fences the older attempt before its next step runs: a side effect in
    that step would otherwise happen twice."""
    location = tmp_path / "store"
    paused, go = threading.Event(), threading.Event()
    effects: list[tuple[int, str]] = []

    @task(durable=False)
    def job(ctx: TaskContext) -> str:
        ctx.step("prepare", effects.append, (ctx.attempt, "prepare"))
        if ctx.attempt == 1:
            paused.set()
            assert go.wait(10)
        ctx.step("send", effects.append, (ctx.attempt, "send"))
        return "sent"

    outcome: list[BaseException] = []

    def first_attempt() -> None:
        try:
            run_task(job, job_id="j", location=location)
        except BaseException as exc:  # collected for the main thread's assertions
            outcome.append(exc)

    first = threading.Thread(target=first_attempt)
    first.start()
    assert paused.wait(10)
    assert job.run((), {}, job_id="j", location=location, takeover=True) == "sent"
    go.set()
    first.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], StaleAttempt)
    assert effects == [(1, "prepare"), (2, "send")]  # "send" once, by the new attempt
    report = check(location)
    assert report.ok and report.clean, report.findings
