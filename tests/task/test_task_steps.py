"""Sub-steps, loops, state and results of tasks, resumed after a failure in the same process."""

from __future__ import annotations

import asyncio
import pickle
import threading
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import task_support

from safepoint.checkpointer import Checkpointer, committed_steps
from safepoint.errors import (
    PACKAGE_DIR,
    InputChanged,
    SafepointError,
    StateMismatch,
    UnsupportedType,
)
from safepoint.policy import after_substep, every, manual
from safepoint.run import describe_run
from safepoint.store import LocalStore
from safepoint.tasks import StepMismatch, SubstepCompleted, TaskContext, run_task, task


class Crash(Exception):
    """Stands for a crash at a chosen point of a task."""


def crash_if(condition: bool) -> None:
    if condition:
        raise Crash


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


def test_a_step_runs_once_and_a_resume_returns_its_recorded_result(store: Path) -> None:
    calls: list[str] = []

    def load(n: int) -> np.ndarray:
        calls.append("load")
        return np.arange(n, dtype=np.int64)  # 80 kB: stored as a blob

    @task(durable=False)
    def job(ctx: TaskContext, n: int) -> int:
        rows = ctx.step("load", load, n)
        crash_if(ctx.attempt == 1)
        return int(rows.sum())

    with pytest.raises(Crash):
        run_task(job, 10_000, job_id="j", location=store)
    assert calls == ["load"]
    assert run_task(job, 10_000, job_id="j", location=store) == sum(range(10_000))
    assert calls == ["load"]  # the resumed attempt used the recorded array
    assert committed_steps(LocalStore(store), "j") == []  # the array is gone with the job's steps
    assert run_task(job, 10_000, job_id="j", location=store) == sum(range(10_000))  # idempotent


def test_the_same_job_id_with_other_arguments_is_refused(store: Path) -> None:
    @task(durable=False)
    def job(ctx: TaskContext, path: str) -> None:
        ctx.checkpoint()
        crash_if(True)

    with pytest.raises(Crash):
        run_task(job, "a.csv", job_id="j", location=store)
    with pytest.raises(InputChanged, match=r"other arguments \(recorded: .*a.csv"):
        run_task(job, "b.csv", job_id="j", location=store)
    with pytest.raises(Crash):  # fresh=True forgets the old job before comparing anything
        job.run(("b.csv",), {}, job_id="j", location=store, fresh=True)
    with pytest.raises(InputChanged, match=r"recorded: .*b.csv"):
        run_task(job, "a.csv", job_id="j", location=store)


def test_steps_with_the_same_name_in_a_loop_are_told_apart_by_their_index(store: Path) -> None:
    calls: list[int] = []

    def square(i: int) -> int:
        calls.append(i)
        return i * i

    @task(durable=False)
    def job(ctx: TaskContext) -> list[int]:
        out = [ctx.step("square", square, i) for i in range(4)]
        crash_if(ctx.attempt == 1)
        out.append(ctx.step("none", lambda: None) is None)
        return out

    with pytest.raises(Crash):
        run_task(job, job_id="loop", location=store)
    assert run_task(job, job_id="loop", location=store) == [0, 1, 4, 9, True]
    assert calls == [0, 1, 2, 3]


def test_a_recorded_step_under_another_name_is_an_error_not_reuse(store: Path) -> None:
    order = ["a", "b"]

    @task(durable=False)
    def job(ctx: TaskContext) -> None:
        for name in order:
            ctx.step(name, str.upper, name)
        crash_if(True)

    with pytest.raises(Crash):
        run_task(job, job_id="j", location=store)
    order.reverse()
    with pytest.raises(StepMismatch, match=r"sub-step 0 was recorded as 'a'.*now calls 'b'") as info:
        run_task(job, job_id="j", location=store)
    assert (info.value.index, info.value.recorded, info.value.current) == (0, "a", "b")


def test_substep_blocks_with_completed_and_results(store: Path) -> None:
    runs: list[str] = []

    @task(durable=False)
    def job(ctx: TaskContext) -> float:
        if not ctx.completed("train"):
            with ctx.substep("train"):
                runs.append("train")
                ctx.results["weights"] = np.linspace(0, 1, 2000)
        crash_if(ctx.attempt == 1)
        with pytest.raises(SubstepCompleted, match="guard the block"), ctx.substep("train"):
            runs.append("twice")
        return float(ctx.results["weights"].sum())

    with pytest.raises(Crash):
        run_task(job, job_id="blocks", location=store)
    assert run_task(job, job_id="blocks", location=store) == pytest.approx(1000.0)
    assert runs == ["train"]


def test_a_block_that_raises_is_not_recorded(store: Path) -> None:
    @task(durable=False)
    def job(ctx: TaskContext) -> bool:
        if ctx.attempt == 1:
            with ctx.substep("x"):
                raise Crash
        return ctx.completed("x")

    with pytest.raises(Crash):
        run_task(job, job_id="j", location=store)
    assert run_task(job, job_id="j", location=store) is False


def test_sub_steps_do_not_nest(store: Path) -> None:
    @task(durable=False)
    def job(ctx: TaskContext) -> None:
        ctx.step("outer", lambda: ctx.step("inner", int))

    with pytest.raises(SafepointError, match="'inner' started inside sub-step 'outer'"):
        run_task(job, job_id="j", location=store)


def test_range_resumes_after_the_last_checkpointed_item(store: Path) -> None:
    done: list[tuple[int, int]] = []

    @task(policy=every(items=4), durable=False)
    def job(ctx: TaskContext, n: int) -> int:
        ctx.state.setdefault("total", 0)
        for i in ctx.range(n):
            crash_if(ctx.attempt == 1 and i == 10)
            done.append((ctx.attempt, i))
            ctx.state["total"] += i
        return ctx.state["total"]

    with pytest.raises(Crash):
        run_task(job, 20, job_id="r", location=store)
    assert run_task(job, 20, job_id="r", location=store) == sum(range(20))
    # checkpoints after items 3 and 7: items 8 and 9 are redone, nothing else
    assert done == [(1, i) for i in range(10)] + [(2, i) for i in range(8, 20)]


def test_nested_ranges_resume_at_the_exact_inner_item(store: Path) -> None:
    seen: list[tuple[int, int]] = []

    @task(policy=every(items=1), durable=False)
    def job(ctx: TaskContext) -> list[tuple[int, int]]:
        for epoch in ctx.range(3):
            for batch in ctx.range(5):
                crash_if(ctx.attempt == 1 and (epoch, batch) == (1, 2))
                crash_if(ctx.attempt == 2 and (epoch, batch) == (2, 4))
                seen.append((epoch, batch))
        return seen

    for _ in range(2):
        with pytest.raises(Crash):
            run_task(job, job_id="nested", location=store)
    run_task(job, job_id="nested", location=store)
    assert seen == [(e, b) for e in range(3) for b in range(5)]


def test_a_resume_that_fails_after_its_first_step_keeps_the_checkpoint_and_the_steps(store: Path) -> None:
    """The second attempt's first record is a step record: the segment it starts must also
    carry the checkpoint (it did not: a third attempt restarted from item 0 and ran the
    steps of items 0-2 again) and the steps the first attempt completed past it (item 4's
    was dropped and ran again)."""
    calls: list[int] = []

    def square(i: int) -> int:
        calls.append(i)
        return i * i

    @task(policy=manual(), durable=False)
    def job(ctx: TaskContext, n: int) -> int:
        ctx.state.setdefault("total", 0)
        for i in ctx.range(n):
            crash_if(ctx.attempt == 1 and i == 5)
            ctx.state["total"] += ctx.step("square", square, i)
            crash_if(ctx.attempt == 2 and i == 5)
            if i == 2:
                ctx.checkpoint()
        return ctx.state["total"]

    for _ in range(2):
        with pytest.raises(Crash):
            run_task(job, 8, job_id="twice", location=store)
    assert describe_run(LocalStore(store), "twice").position == 3
    assert run_task(job, 8, job_id="twice", location=store) == sum(i * i for i in range(8))
    assert calls == list(range(8))  # every step once, through three attempts


def test_a_loop_whose_length_changed_is_refused(store: Path) -> None:
    sizes = [5, 6]

    @task(durable=False, policy=every(items=1))
    def job(ctx: TaskContext) -> None:
        for i in ctx.range(sizes.pop(0)):
            crash_if(i == 2)

    with pytest.raises(Crash):
        run_task(job, job_id="j", location=store)
    with pytest.raises(StateMismatch, match=r"\(5 items\) but this run iterates range\(0, 6, 1\) \(6 items\)"):
        run_task(job, job_id="j", location=store)


def test_state_attempt_and_resumed(store: Path) -> None:
    seen: list[tuple[int, bool, dict[str, Any]]] = []

    @task(policy=manual(), durable=False)
    def job(ctx: TaskContext) -> None:
        seen.append((ctx.attempt, ctx.resumed, dict(ctx.state)))
        ctx.state["visits"] = ctx.state.get("visits", 0) + 1
        ctx.checkpoint()
        crash_if(ctx.attempt < 3)

    for _ in range(2):
        with pytest.raises(Crash):
            run_task(job, job_id="s", location=store)
    run_task(job, job_id="s", location=store)
    assert seen == [(1, False, {}), (2, True, {"visits": 1}), (3, True, {"visits": 2})]


def test_keep_completed_returns_the_recorded_result_without_running(store: Path) -> None:
    runs: list[int] = []

    @task(keep_completed=True, durable=False)
    def job(ctx: TaskContext, x: int) -> dict[str, Any]:
        runs.append(x)
        ctx.step("big", np.zeros, 10_000)
        assert committed_steps(LocalStore(store), "keep")  # the big result, gone at the end
        return {"x": x, "array": np.full(3000, x)}

    first = run_task(job, 7, job_id="keep", location=store)
    again = run_task(job, 7, job_id="keep", location=store)
    assert runs == [7]
    assert again["x"] == 7 and np.array_equal(again["array"], first["array"])
    local = LocalStore(store)
    assert len(committed_steps(local, "keep")) == 1  # only the result (3000 values: an array)
    info = describe_run(local, "keep")
    assert (info.kind, info.complete, info.progress, info.liveness) == ("task", True, 1.0, "complete")


def test_without_keep_completed_a_rerun_runs_again(store: Path) -> None:
    runs: list[int] = []

    @task(durable=False, keep_completed=False)
    def job(ctx: TaskContext) -> int:
        runs.append(ctx.attempt)
        return len(runs)

    assert run_task(job, job_id="again", location=store) == 1
    assert run_task(job, job_id="again", location=store) == 2
    assert runs == [1, 1]  # a fresh job: attempt numbers start over


def test_checkpoints_show_kind_progress_and_attempt(store: Path) -> None:
    bodies: list[dict[str, Any]] = []

    @task(policy=manual(), durable=False)
    def job(ctx: TaskContext) -> None:
        ctx.progress(0.25, "a quarter")
        ctx.checkpoint()
        bodies.append(describe_run(LocalStore(store), "show"))

    run_task(job, job_id="show", location=store)
    info = bodies[0]
    assert (info.kind, info.progress, info.attempt, info.complete) == ("task", 0.25, 1, False)
    assert info.message == "a quarter" and info.liveness == "running"


def test_default_job_id_is_the_function_name_and_an_argument_hash(store: Path) -> None:
    @task(durable=False)
    def add(ctx: TaskContext, a: int, *, b: int = 0, c: int = 0) -> int:
        return a + b + c

    job_id = add.job_id(1, b=2, c=3)
    assert job_id.startswith("test_default_job_id_is_the_function_name_and_an_argument_hash._locals_.add-")
    assert job_id == add.job_id(1, c=3, b=2)  # keyword order does not matter
    assert job_id != add.job_id(2, b=2, c=3)
    assert job_id != add.job_id(1, b=2, c=4)
    assert run_task(add, 1, b=2, c=3, location=store) == 6


def test_calling_a_task_runs_it_as_a_job_in_the_default_store(
        store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFEPOINT_DIR", str(store))

    @task(keep_completed=True, durable=False)
    def double(ctx: TaskContext, x: int) -> int:
        return 2 * x

    assert double(21) == 42
    assert (store / double.job_id(21)).is_dir()


def test_a_job_id_used_by_another_function_is_refused(store: Path) -> None:
    @task(keep_completed=True, durable=False)
    def one(ctx: TaskContext) -> int:
        return 1

    @task(durable=False)
    def two(ctx: TaskContext) -> int:
        return 2

    run_task(one, job_id="shared", location=store)
    with pytest.raises(InputChanged, match=r"was started by .*one, not .*two"):
        run_task(two, job_id="shared", location=store)


def test_a_name_holding_plain_checkpoints_is_not_taken_for_a_task(store: Path) -> None:
    Checkpointer("plain", location=store, durable=False).save(1, {"x": 1})
    with pytest.raises(SafepointError, match="not a task's"):
        run_task(task(lambda ctx: 1), job_id="plain", location=store)


def test_arguments_must_be_state_tree_values(store: Path) -> None:
    @task(durable=False)
    def job(ctx: TaskContext, thing: object) -> None:
        pass

    with pytest.raises(UnsupportedType, match="arguments are recorded with the job"):
        run_task(job, object(), location=store)


def test_bad_calls_get_clear_errors(store: Path) -> None:
    @task(durable=False)
    def job(ctx: TaskContext, what: str) -> None:
        if what == "progress":
            ctx.progress(1.5)
        elif what == "name":
            ctx.step("", int)
        elif what == "fn":
            ctx.step("x", 42)  # type: ignore[arg-type]
        elif what == "async":
            async def fetch() -> int:
                return 1
            ctx.step("fetch", fetch)

    with pytest.raises(ValueError, match=r"progress must be a number in \[0, 1\]"):
        run_task(job, "progress", location=store)
    with pytest.raises(TypeError, match="sub-step name must be a non-empty str"):
        run_task(job, "name", location=store)
    with pytest.raises(TypeError, match="needs a callable fn"):
        run_task(job, "fn", location=store)
    with pytest.raises(TypeError, match=r"await ctx.astep\('fetch'"):
        run_task(job, "async", location=store)
    with pytest.raises(SafepointError, match="invalid job_id"):
        run_task(job, "x", job_id="../escape", location=store)


def test_async_tasks_and_async_steps(store: Path) -> None:
    calls: list[str] = []

    async def fetch(x: int) -> int:
        calls.append("fetch")
        await asyncio.sleep(0)
        return x + 1

    @task(durable=False, policy=after_substep())
    async def job(ctx: TaskContext, x: int) -> int:
        y = await ctx.astep("fetch", fetch, x)
        z = await ctx.astep("plain", lambda v: v * 10, y)
        crash_if(ctx.attempt == 1)
        return z

    with pytest.raises(Crash):
        asyncio.run(run_task(job, 1, job_id="a", location=store))
    assert asyncio.run(run_task(job, 1, job_id="a", location=store)) == 20
    assert calls == ["fetch"]


def test_tasks_pickle_by_reference_or_by_value() -> None:
    assert pickle.loads(pickle.dumps(task_support.three_steps)) is task_support.three_steps
    cloudpickle = pytest.importorskip("cloudpickle")

    @task(keep_completed=True, policy=every(items=5))
    def local(ctx: TaskContext) -> int:
        return 5

    copy = cloudpickle.loads(cloudpickle.dumps(local))
    assert copy.keep_completed and copy.qualified_name == local.qualified_name
    assert copy.fn(None) == 5


def test_small_results_live_in_the_record_and_large_ones_in_their_own_folder(store: Path) -> None:
    folders: list[int] = []

    def listing() -> int:  # how many results are stored as checkpoint steps
        return len(committed_steps(LocalStore(store), "sizes"))

    @task(durable=False)
    def job(ctx: TaskContext) -> tuple[int, list[int], np.ndarray]:
        small = ctx.step("small", int, "7")
        folders.append(listing())
        long = ctx.step("long", list, range(5000))  # no array, but too long for the record
        folders.append(listing())
        array = ctx.step("array", np.ones, 1000)
        folders.append(listing())
        crash_if(ctx.attempt == 1)
        return small, long, array

    with pytest.raises(Crash):
        run_task(job, job_id="sizes", location=store)
    small, long, array = run_task(job, job_id="sizes", location=store)
    assert (small, long, array.tolist()) == (7, list(range(5000)), [1.0] * 1000)
    assert folders[:3] == [0, 1, 2]


def _frames(error: BaseException) -> list[tuple[bool, str]]:
    """(is safepoint's, function name) for each frame of the traceback, outermost first."""
    return [(frame.filename.startswith(PACKAGE_DIR), frame.name)
            for frame in traceback.extract_tb(error.__traceback__)]


def _between(frames: list[tuple[bool, str]], outer: str, inner: str) -> list[tuple[bool, str]]:
    names = [name for _, name in frames]
    return frames[names.index(outer) + 1:names.index(inner)]


def parse(text: str) -> int:
    return int(text)


@task
def failing_substep(ctx: TaskContext, text: str) -> int:
    with ctx.substep("parse"):
        return parse(text)


@task
def failing_step(ctx: TaskContext, text: str) -> int:
    return ctx.step("parse", parse, text)


@pytest.mark.parametrize("call", ["call", "run_task", "run"])
def test_a_failing_sub_steps_traceback_shows_the_users_frames(store: Path, call: str) -> None:
    with pytest.raises(ValueError, match="invalid literal") as info:
        if call == "call":
            failing_substep("x")
        elif call == "run_task":
            run_task(failing_substep, "x", location=store)
        else:
            failing_substep.run(("x",), {}, location=store)
    frames = _frames(info.value)
    assert frames[0][1] == "test_a_failing_sub_steps_traceback_shows_the_users_frames"
    assert frames[-2:] == [(False, "failing_substep"), (False, "parse")]
    assert len([f for f in _between(frames, frames[0][1], "failing_substep") if f[0]]) <= 1
    assert type(info.value) is ValueError
    assert any("stopped" in note for note in info.value.__notes__)  # the run's note is kept


def test_a_failing_durable_steps_traceback_shows_the_users_frames(store: Path) -> None:
    with pytest.raises(ValueError) as info:
        run_task(failing_step, "x", location=store)
    frames = _frames(info.value)
    assert [ours for ours, _ in _between(frames, frames[0][1], "failing_step")].count(True) <= 1
    assert [ours for ours, _ in _between(frames, "failing_step", "parse")].count(True) <= 1
    assert frames[-1] == (False, "parse")
    text = "".join(traceback.format_exception(info.value))
    assert "task.py" not in text


def test_an_async_tasks_traceback_shows_the_users_frames(store: Path) -> None:
    @task
    async def fetch(ctx: TaskContext) -> None:
        await asyncio.sleep(0)
        raise LookupError("gone")

    with pytest.raises(LookupError) as info:
        asyncio.run(run_task(fetch, location=store))
    frames = _frames(info.value)
    assert frames[-2:] == [(True, "entry"), (False, "fetch")]  # asyncio's frames, then these
    assert [ours for ours, _ in frames].count(True) == 1


def test_a_sub_step_result_that_cannot_be_stored_names_the_step_and_its_path(store: Path) -> None:
    @task(allow_pickle=True)
    def job(ctx: TaskContext) -> Any:
        return ctx.step("connect", lambda: {"conn": threading.Lock()})

    with pytest.raises(UnsupportedType) as info:
        run_task(job, job_id="conn", location=store)
    assert str(info.value).startswith(
        "task 'conn': sub-step 'connect' ran, but its result cannot be recorded (a resume runs "
        "it again): result['conn']: cannot pickle a lock (_thread.lock) even with allow_pickle=True")
    assert info.value.tree_path == "result['conn']"


def test_a_return_value_that_cannot_be_stored_names_the_job_and_its_path(store: Path) -> None:
    @task
    def job(ctx: TaskContext) -> Any:
        return {"model": {"hook": print}}

    with pytest.raises(UnsupportedType) as info:
        run_task(job, job_id="ret", location=store)
    assert str(info.value).startswith("job 'ret' returned, but its return value cannot be "
                                      "recorded: result['model']['hook']: cannot store a ")


def test_arguments_that_cannot_be_stored_are_named_as_the_caller_wrote_them(store: Path) -> None:
    @task
    def job(ctx: TaskContext, path: str, *, options: Any = None) -> None:
        pass

    with pytest.raises(UnsupportedType, match=r": args\[0\]: cannot store an object \(") as info:
        run_task(job, object(), location=store)
    assert info.value.tree_path == "args[0]"
    with pytest.raises(UnsupportedType, match=r": kwargs\['options'\]\['lock'\]: cannot store a "
                       r"lock \(_thread.lock\)"):
        run_task(job, "p", options={"lock": threading.Lock()}, location=store)
