"""Attempt fencing without Dask: attempts in one process, threads racing, the commit window."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from safepoint.checkpointer import Checkpointer
from safepoint.errors import StaleAttempt, StepExists
from safepoint.fencing import Attempt, attempt_key, list_attempts
from safepoint.policy import every, manual
from safepoint.store import LocalStore
from safepoint.tasks import TaskContext, run_task, task
from safepoint.tasks.context import ATTEMPT_STRIDE


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def test_a_newer_attempt_fences_the_older_one(store: LocalStore) -> None:
    first = Attempt.begin(store, "job")
    first.check()
    second = Attempt.begin(store, "job")
    assert (first.number, second.number) == (1, 2)
    with pytest.raises(StaleAttempt, match="attempt 1 was taken over by attempt 2") as info:
        first.check()
    assert (info.value.attempt, info.value.current) == (1, 2)
    second.check()
    assert not first.is_current() and second.is_current()


def test_racing_attempts_take_distinct_numbers(store: LocalStore) -> None:
    barrier = threading.Barrier(8)
    numbers: list[int] = []

    def begin() -> None:
        barrier.wait()
        numbers.append(Attempt.begin(store, "job", durable=False).number)

    threads = [threading.Thread(target=begin) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(numbers) == list(range(1, 9)) == list_attempts(store, "job")


def test_a_removed_or_replaced_marker_fences_too(store: LocalStore) -> None:
    old = Attempt.begin(store, "job")
    store.delete("job")  # the job completed (or was deleted) meanwhile
    with pytest.raises(StaleAttempt, match="marker of attempt 1 is gone"):
        old.check()
    fresh = Attempt.begin(store, "job")  # the job started afresh: number 1 again
    assert fresh.number == 1
    with pytest.raises(StaleAttempt):
        old.check()  # same number, another token
    fresh.check()
    assert store.read(attempt_key("job", 1))


def test_a_fenced_save_leaves_nothing_visible(store: LocalStore) -> None:
    old = Attempt.begin(store, "job")
    checkpointer = Checkpointer("job", location=store, fence=old.check, durable=False)
    checkpointer.save(1, {"x": 1})
    Attempt.begin(store, "job")
    with pytest.raises(StaleAttempt):
        checkpointer.save(2, {"x": "x" * 10_000, "big": bytes(100_000)})
    assert checkpointer.steps() == [1]
    assert store.list("job/000000000002") == []  # its blobs were removed again
    assert checkpointer.restore().state == {"x": 1}


def test_two_task_attempts_in_one_process(tmp_path: Path) -> None:
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
            outcomes[label] = run_task(job, 10, job_id="j", location=location)
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


def test_a_late_commit_in_the_check_window_never_wins(store: LocalStore) -> None:
    """Attempt 1 passes its check, attempt 2 starts before attempt 1's commit lands: the
    late commit is visible, but attempt 2's checkpoints sort after it, and attempt 1's next
    commit is refused."""
    stride = ATTEMPT_STRIDE
    a = Attempt.begin(store, "job")
    seen_by_b: list[Any] = []
    b_checkpointer = Checkpointer("job", location=store, durable=False)

    def check_then_b_starts() -> None:
        a.check()
        if not seen_by_b:  # B starts in the window between A's check and A's commit
            b = Attempt.begin(store, "job")
            b_checkpointer.fence = b.check
            seen_by_b.append(b_checkpointer.restore().state)

    a_checkpointer = Checkpointer("job", location=store, fence=a.check, durable=False)
    a_checkpointer.save(stride + 1, {"done": 1})
    a_checkpointer.fence = check_then_b_starts
    a_checkpointer.save(stride + 2, {"done": 2})  # lands after B started: the window
    assert seen_by_b == [{"done": 1}]

    b_checkpointer.save(2 * stride + 1, {"done": seen_by_b[0]["done"] + 1})
    assert b_checkpointer.restore().state == {"done": 2}
    assert b_checkpointer.latest_step() == 2 * stride + 1  # B's progress is what resumes
    a_checkpointer.fence = a.check
    with pytest.raises(StepExists):  # never back before B's step (tasks report StaleAttempt)
        a_checkpointer.save(stride + 3, {"done": 3})
    with pytest.raises(StaleAttempt):
        a_checkpointer.save(3 * stride, {"done": 3})


def test_a_checkpoint_left_without_attempt_markers_is_resumed_by_a_higher_attempt(tmp_path: Path) -> None:
    """E.g. a stale attempt's late commit after the job was removed on completion."""
    location = tmp_path / "store"
    seen: list[tuple[int, int]] = []

    @task(policy=manual(), durable=False)
    def job(ctx: TaskContext) -> int:
        seen.append((ctx.attempt, ctx.state.get("runs", 0)))
        ctx.state["runs"] = ctx.state.get("runs", 0) + 1
        ctx.checkpoint()
        if ctx.attempt < 3:
            raise RuntimeError("crash")
        return ctx.state["runs"]

    for _ in range(2):
        with pytest.raises(RuntimeError):
            run_task(job, job_id="j", location=location)
    LocalStore(location).delete("j/attempts")
    assert run_task(job, job_id="j", location=location) == 3
    assert seen == [(1, 0), (2, 1), (3, 2)]
