"""Each checkpoint strategy of tasks fires exactly when it should (an injected clock)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from safepoint.policy import PolicyLike, after_substep, every, manual, on_progress
from safepoint.tasks import TaskContext, default_policy, run_task, task


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def commits(ctx: TaskContext) -> int:
    """How many checkpoints (of the state) this attempt has committed."""
    return ctx.checkpoints


def run(store: Path, policy: PolicyLike, body: Callable[[TaskContext], list[bool]],
        clock: FakeClock | None = None) -> list[bool]:
    """Run ``body`` as a task and check that every boundary it reports matches a commit."""

    @task(policy=policy, clock=clock or FakeClock(), durable=False)
    def job(ctx: TaskContext) -> list[bool]:
        fired = body(ctx)
        assert commits(ctx) == sum(fired)
        return fired

    return run_task(job, job_id="job", location=store)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


def test_every_items_counts_boundaries(store: Path) -> None:
    fired = run(store, every(items=3), lambda ctx: [ctx.maybe_checkpoint() for _ in range(8)])
    assert fired == [False, False, True, False, False, True, False, False]


def test_range_items_are_boundaries(store: Path) -> None:
    def loop(ctx: TaskContext) -> list[bool]:
        seen = []  # commits at the start of each item, and after the loop
        for _ in ctx.range(5):
            seen.append(commits(ctx))
        seen.append(commits(ctx))
        return [after > before for before, after in itertools.pairwise(seen)]

    # after items 1 and 3, and once when the loop ends (as every loop of a run does)
    assert run(store, every(items=2), loop) == [False, True, False, True, True]


def test_every_seconds_uses_the_clock_since_the_last_checkpoint(store: Path) -> None:
    clock = FakeClock()

    def body(ctx: TaskContext) -> list[bool]:
        fired = []
        for step in [4, 4, 4, 3, 6, 9, 1]:  # seconds passing before each boundary
            clock.now += step
            fired.append(ctx.maybe_checkpoint())
        return fired

    # at 4, 8, 12 (fires), 15 (3 s since), 21 (9 s since), 30 (18 s since: fires), 31 (1 s since)
    assert run(store, every(seconds=10), body, clock) == [False, False, True, False, False, True, False]


def test_every_seconds_counts_from_a_manual_checkpoint(store: Path) -> None:
    clock = FakeClock()

    def body(ctx: TaskContext) -> list[bool]:
        clock.now += 8
        ctx.checkpoint()
        clock.now += 8
        first = ctx.maybe_checkpoint()  # 16 s since the start, 8 since the checkpoint
        clock.now += 2
        return [True, first, ctx.maybe_checkpoint()]

    assert run(store, every(seconds=10), body, clock) == [True, False, True]


def test_on_progress_fires_each_time_progress_advanced_enough(store: Path) -> None:
    def body(ctx: TaskContext) -> list[bool]:
        fired = []
        for fraction in [0.1, 0.24, 0.25, 0.3, 0.49, 0.5, 1.0]:
            ctx.progress(fraction)
            fired.append(ctx.maybe_checkpoint())
        return fired

    assert run(store, on_progress(0.25), body) == [False, False, True, False, False, True, True]


def test_manual_checkpoints_only_when_asked(store: Path) -> None:
    def body(ctx: TaskContext) -> list[bool]:
        fired = [ctx.maybe_checkpoint() for _ in range(3)]
        ctx.step("a", int)
        with ctx.substep("b"):
            pass
        fired += [commits(ctx) > 0]
        ctx.checkpoint()
        return [*fired, True]

    assert run(store, manual(), body) == [False, False, False, False, True]


def test_after_substep_checkpoints_after_each_step_and_block_only(store: Path) -> None:
    def body(ctx: TaskContext) -> list[bool]:
        fired = [ctx.maybe_checkpoint()]
        for name in ["a", "b"]:
            before = commits(ctx)
            ctx.step(name, int)
            fired.append(commits(ctx) == before + 1)
        with ctx.substep("c"):
            inside = commits(ctx)  # not before the block ends
        fired.append(commits(ctx) == inside + 1)
        before = commits(ctx)
        for _ in ctx.range(3):
            assert commits(ctx) == before  # loop items are not sub-steps
        fired.append(commits(ctx) == before + 1)  # but a loop that ends commits once
        return fired

    assert run(store, after_substep(), body) == [False, True, True, True, True]


def test_combined_strategies_fire_when_any_fires(store: Path) -> None:
    clock = FakeClock()

    def body(ctx: TaskContext) -> list[bool]:
        fired = []
        for seconds, fraction in [(1, 0.1), (1, 0.6), (1, 0.65), (30, 0.7), (1, 0.75)]:
            clock.now += seconds
            ctx.progress(fraction)
            fired.append(ctx.maybe_checkpoint())
        return fired

    policy = on_progress(0.5) | every(seconds=20)
    assert run(store, policy, body, clock) == [False, True, False, True, False]


def test_both_strategies_must_agree_with_and(store: Path) -> None:
    def body(ctx: TaskContext) -> list[bool]:
        fired = []
        for fraction in [0.5, 0.5, 0.5, 0.6, 0.9]:
            ctx.progress(fraction)
            fired.append(ctx.maybe_checkpoint())
        return fired

    assert run(store, every(items=2) & on_progress(0.5), body) == [False, True, False, False, False]


def test_the_default_is_after_each_substep_and_every_ten_seconds(store: Path) -> None:
    clock = FakeClock()

    def body(ctx: TaskContext) -> list[bool]:
        ctx.step("a", int)
        clock.now += 9
        fired = [True, ctx.maybe_checkpoint()]
        clock.now += 1
        fired.append(ctx.maybe_checkpoint())
        return fired

    assert run(store, default_policy(), body, clock) == [True, False, True]


def test_a_plain_callable_is_a_policy(store: Path) -> None:
    fired = run(store, lambda tick: tick.items == 2, lambda ctx: [ctx.maybe_checkpoint() for _ in range(4)])
    assert fired == [False, True, False, True]
