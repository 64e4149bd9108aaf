"""Records per writer generation: a new writer's first record starts its own segment, which
must hold everything still alive (the newest checkpoint of the state, live step results),
and what nothing in it refers to any more is removed (an older writer may have died before
it removed it)."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
from lease_support import CONTEXT, assert_consistent, events, killed_before_release

import safepoint
from safepoint.checkpointer import Checkpointer
from safepoint.policy import manual
from safepoint.tasks import TaskContext, task


class Stop(Exception):
    """Leaves a run's block with an error: it is not complete, its checkpoint stays."""


def test_a_new_writer_whose_first_record_is_a_step_keeps_the_checkpoint(tmp_path: Path) -> None:
    location = str(tmp_path / "store")
    seen: list[tuple[int, int, dict[str, int]]] = []

    def attempt() -> None:
        try:
            with safepoint.resume("job", location=location, policy=manual()) as run:
                seen.append((run.attempt, run.position, dict(run.state)))
                if run.attempt == 2:
                    run.step("prepare", int, 7)  # the first record this writer commits
                    raise Stop
                run.state.setdefault("total", 0)
                for i in run.range(10):
                    if run.attempt == 1 and i == 5:
                        raise Stop
                    run.state["total"] += i
                    run.checkpoint()
        except Stop:
            pass

    for _ in range(3):
        attempt()
    # attempt 2 resumed at item 5 and committed only a step record; attempt 3 still
    # resumes at item 5 with the state of that checkpoint
    assert seen == [(1, 0, {}), (2, 5, {"total": 10}), (3, 5, {"total": 10})]
    assert_consistent(location)


def test_a_task_whose_resumed_attempt_records_a_step_first_keeps_its_state(tmp_path: Path) -> None:
    location = str(tmp_path / "store")
    seen: list[dict[str, int]] = []

    @task(policy=manual())
    def job(ctx: TaskContext) -> dict[str, int]:
        seen.append(dict(ctx.state))
        if ctx.attempt == 1:
            ctx.state["x"] = 42
            ctx.checkpoint()
            raise Stop
        ctx.step("a", int, 1)
        if ctx.attempt == 2:
            raise Stop
        return dict(ctx.state)

    for _ in range(2):
        try:
            job.run((), {}, job_id="j", location=location)
        except Stop:
            pass
    assert job.run((), {}, job_id="j", location=location) == {"x": 42}
    assert seen == [{}, {"x": 42}, {"x": 42}]
    assert_consistent(location)


def test_a_checkpoint_a_killed_writer_did_not_remove_goes_with_the_next_writer(tmp_path: Path) -> None:
    location, path = str(tmp_path / "store"), str(tmp_path / "events")
    child = CONTEXT.Process(
        target=killed_before_release, args=(location, "job", path))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert [e.event for e in events(path)] == ["dying"]
    reader = Checkpointer("job", location=location)
    assert len(reader.steps()) == 2  # the superseded state's checkpoint is still there
    with safepoint.resume("job", location=location, keep_completed=True) as run:
        np.testing.assert_array_equal(run.state["big"], np.arange(10_000.0) + 1)
        run.state["done"] = True
    assert len(reader.steps()) == 1  # only the checkpoint the newest record refers to
    assert_consistent(location)
