"""Flow records in one process: status, recorded inputs, failures, data passing, retention."""

from __future__ import annotations

import asyncio
import traceback
from datetime import datetime
from fractions import Fraction

import numpy as np
import pytest

import safepoint
from safepoint import Checkpointer, CorruptCheckpointWarning, knobs
from safepoint.errors import (
    PACKAGE_DIR,
    CheckpointNotFound,
    CorruptCheckpoint,
    KindMismatch,
    SafepointError,
    UnsupportedType,
)
from safepoint.flow import Flow
from safepoint.run.log import read_log
from safepoint.store import open_store


class FakeClock:
    """Wall-clock seconds that advance by ``tick`` at each reading."""

    def __init__(self, start: float = 1_700_000_000.0, tick: float = 2.5) -> None:
        self.now, self.tick = start, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def three_steps(flow: Flow, calls: list[str], *, train_fails: list[bool]) -> None:
    @flow.step
    def prep(state, data):
        calls.append("prep")
        state["n"] = 3
        data["cache"] = "in memory"

    @flow.step
    def train(state, data):
        calls.append(f"train {sorted(state)}")
        state["half"] = True
        if train_fails[0]:
            raise ValueError("diverged")
        state["model"] = state["n"] * 2

    @flow.step
    def report(state, data):
        calls.append("report")
        state["report"] = f"model {state['model']}"


def test_failure_is_recorded_with_error_traceback_and_input(tmp_path):
    clock = FakeClock()
    flow, calls, fails = Flow("f", location=tmp_path, clock=clock), [], [True]
    three_steps(flow, calls, train_fails=fails)
    initial = {"seed": 1}
    with pytest.raises(ValueError, match="diverged") as raised:
        flow.run(initial)
    assert any("stopped at step 'train'" in note for note in raised.value.__notes__)
    assert initial == {"seed": 1}  # the caller's dict is never changed

    prep, train, report = flow.status()
    assert (prep.name, prep.status, prep.duration, prep.error) == ("prep", "done", 2.5, None)
    assert prep.when == datetime.fromtimestamp(1_700_000_002.5)
    assert (train.status, train.error, train.duration) == ("failed", "ValueError: diverged", 2.5)
    assert 'raise ValueError("diverged")' in train.traceback and "in train" in train.traceback
    assert "engine.py" not in train.traceback and "drivers.py" not in train.traceback
    assert (report.status, report.duration, report.when, report.error) == ("pending", None, None, None)
    # The input train received, not what it changed before raising.
    assert flow.state_before("train") == {"seed": 1, "n": 3}
    assert flow.state_before(0) == {"seed": 1}
    with pytest.raises(CheckpointNotFound, match="has not reached it"):
        flow.state_before("report")

    # The same Flow object, fixed: resumes at train, with prep's in-memory data still there.
    fails[0] = False
    final = flow.run(initial)
    assert final == {"seed": 1, "n": 3, "half": True, "model": 6, "report": "model 6"}
    assert final is not initial and initial == {"seed": 1}
    assert calls == ["prep", "train ['n', 'seed']", "train ['n', 'seed']", "report"]
    assert [row.status for row in flow.status()] == ["done", "done", "done"]
    assert flow.state_before("report") == {"seed": 1, "n": 3, "half": True, "model": 6}


def test_status_from_another_object_shows_the_recorded_steps(tmp_path):
    flow, calls = Flow("f", location=tmp_path), []
    three_steps(flow, calls, train_fails=[True])
    with pytest.raises(ValueError):
        flow.run()
    viewer = Flow("f", location=tmp_path)  # no steps registered: the record speaks
    assert [(r.name, r.status) for r in viewer.status()] == [
        ("prep", "done"), ("train", "failed"), ("report", "pending")]
    assert viewer.state_before("train") == {"n": 3}


def test_returned_data_goes_to_later_steps_under_the_step_name(tmp_path):
    flow, seen = Flow("f", location=tmp_path), {}

    @flow.step
    def make(state, data):
        return {"table": np.arange(10_000.0), "unit": "m"}

    @flow.step
    def nothing(state, data):
        return None

    @flow.step
    def use(state, data):
        seen["keys"] = sorted(data)
        seen["total"] = float(data["make"]["table"].sum())
        with pytest.raises(KeyError, match="no data 'nothing'"):
            data["nothing"]

    flow.run()
    assert seen == {"keys": ["make"], "total": float(np.arange(10_000.0).sum())}
    assert flow.output("make")["unit"] == "m"
    with pytest.raises(CheckpointNotFound, match="returned no data"):
        flow.output("nothing")


def test_stored_outputs_are_read_only_when_asked_and_only_once(counting_store):
    def build(fail: bool, asks: list[str]) -> Flow:
        flow = Flow("lazy", location=counting_store)

        @flow.step
        def a(state, data):
            return np.full(100_000, 1.0)

        @flow.step
        def b(state, data):
            return np.full(100_000, 2.0)

        @flow.step
        def c(state, data):
            if fail:
                raise RuntimeError("later")
            asks.append(str(data.is_loaded("a")))
            state["a"] = float(data["a"].sum()) + float(data["a"][0])
            asks.append(str(data.is_loaded("a")))
            assert "b" in data and not data.is_loaded("b")

        return flow

    with pytest.raises(RuntimeError):
        build(True, []).run()
    counting_store.reads.clear()
    asks: list[str] = []
    assert build(False, asks).run() == {"a": 100_001.0}
    assert asks == ["False", "True"]
    outputs = {r.name: f"{r.tree['checkpoint']:012d}" for r in read_log(counting_store, "lazy").steps().values()
               if r.tree is not None and "checkpoint" in r.tree}
    blob_reads = {key.rsplit("/", 2)[1]: n for key, n in counting_store.reads.items() if key.endswith(".bin")}
    assert blob_reads == {outputs["a"]: 1}  # a's output, once; b's never


def test_store_keeps_only_the_newest_record_and_live_outputs(tmp_path):
    flow = Flow("f", location=tmp_path)
    checkpointer = Checkpointer("f", location=tmp_path)

    @flow.step
    def a(state, data):
        return np.zeros(10_000)

    @flow.step
    def b(state, data):
        state["b"] = 1

    @flow.step
    def c(state, data):
        return np.ones(10_000)

    def outputs() -> dict[str, int]:
        return {r.name: r.tree["checkpoint"] for r in read_log(checkpointer.store, "f").steps().values()
                if r.tree is not None}

    flow.run()
    first = outputs()
    assert sorted(first) == ["a", "c"] and checkpointer.steps() == sorted(first.values())
    flow.run()  # starts over: the old outputs are dropped
    second = outputs()
    assert checkpointer.steps() == sorted(second.values()) and not set(first.values()) & set(second.values())
    flow.run(start_at="b")  # restarts at b; a's output stays in use, c's is replaced
    third = outputs()
    assert third["a"] == second["a"] and third["c"] != second["c"]
    assert checkpointer.steps() == sorted(third.values())


def test_completed_flow_without_rerun_returns_its_final_state(tmp_path):
    calls: list[str] = []
    flow = Flow("f", location=tmp_path, keep_completed=True)
    three_steps(flow, calls, train_fails=[False])
    first = flow.run({"seed": 2})
    assert flow.run() == first and len(calls) == 3
    with pytest.warns(UserWarning, match="complete and keep_completed=True"):
        assert flow.run({"seed": 3}) == first and len(calls) == 3
    assert flow.run(start_at="report") == first and calls[-1] == "report"


def test_start_at_must_name_a_reached_step(tmp_path):
    flow = Flow("f", location=tmp_path)
    three_steps(flow, [], train_fails=[True])
    with pytest.raises(ValueError):
        flow.run()
    with pytest.raises(SafepointError, match=r"cannot start at 'report'.*'train'"):
        flow.run(start_at="report")
    with pytest.raises(ValueError, match="no step 'nope'"):
        flow.run(start_at="nope")
    with pytest.raises(ValueError, match="no step index 7"):
        flow.run(start_at=7)
    with pytest.raises(TypeError):
        flow.run(start_at=True)
    with pytest.raises(ValueError, match="reload"):
        flow.run(reload="never")


def test_reload_first_calls_only_the_first_loader_and_always_calls_each(tmp_path):
    flow, calls = Flow("f", location=tmp_path), []

    def loader(tag):
        def load(state):
            calls.append(tag)
            return {tag: True}
        return load

    for tag in ("one", "two", "three"):
        flow.step(load=loader(f"load-{tag}"), name=tag)(lambda state, data: None)
    flow.run()
    assert calls == ["load-one"]
    calls.clear()
    flow.run(reload="always")
    assert calls == ["load-one", "load-two", "load-three"]
    calls.clear()
    flow.run(start_at="two")
    assert calls == ["load-two"]


def test_a_loader_must_return_a_dict(tmp_path):
    flow = Flow("f", location=tmp_path)
    flow.step(load=lambda state: [1, 2], name="s")(lambda state, data: None)
    with pytest.raises(TypeError, match="loader of step 's' returned a list"):
        flow.run()
    assert flow.status()[0].status == "failed"


def test_unstorable_results_are_recorded_as_failures(tmp_path):
    flow, bad = Flow("f", location=tmp_path), [True]

    @flow.step
    def ok(state, data):
        state["ok"] = 1

    @flow.step
    def leaves_object(state, data):
        state["thing"] = object() if bad[0] else "fine"

    @flow.step
    def returns_object(state, data):
        return object()

    with pytest.raises(UnsupportedType, match=r"step 'leaves_object' .* state\['thing'\]"):
        flow.run()
    assert [r.status for r in flow.status()] == ["done", "failed", "pending"]
    bad[0] = False
    with pytest.raises(UnsupportedType, match=r"step 'returns_object' .* data\['returns_object'\]: cannot store an object"):
        flow.run()
    assert flow.state_before("returns_object") == {"ok": 1, "thing": "fine"}


def test_an_unstorable_initial_state_is_refused_before_any_step(tmp_path):
    flow, calls = Flow("f", location=tmp_path), []
    three_steps(flow, calls, train_fails=[False])
    with pytest.raises(UnsupportedType, match=r"initial_state\['conn'\]: cannot store"):
        flow.run({"conn": object()})
    assert calls == [] and Checkpointer("f", location=tmp_path).steps() == []


def test_allow_pickle_stores_any_returned_object(tmp_path):
    flow = Flow("f", location=tmp_path, allow_pickle=True)
    flow.step(name="make")(lambda state, data: Fraction(1, 3))
    flow.run()
    assert Flow("f", location=tmp_path, allow_pickle=True).output("make") == Fraction(1, 3)


def test_initial_state_is_ignored_with_a_warning_when_resuming(tmp_path):
    flow = Flow("f", location=tmp_path)
    three_steps(flow, [], train_fails=[True])
    with pytest.raises(ValueError):
        flow.run({"seed": 1})
    with pytest.warns(UserWarning, match="initial_state differs"), pytest.raises(ValueError):
        flow.run({"seed": 99})
    assert flow.state_before("train") == {"seed": 1, "n": 3}


def test_reset_forgets_everything(tmp_path):
    flow, calls = Flow("f", location=tmp_path), []
    three_steps(flow, calls, train_fails=[True])
    with pytest.raises(ValueError):
        flow.run()
    flow.reset()
    assert [r.status for r in flow.status()] == ["pending"] * 3
    with pytest.raises(ValueError):
        flow.run()
    assert calls == ["prep", "train ['n']", "prep", "train ['n']"]


def test_a_damaged_newest_commit_falls_back_to_the_one_before(tmp_path):
    flow, calls = Flow("f", location=tmp_path), []
    for name in ("a", "b", "c"):
        flow.step(name=name)(lambda state, data, name=name: calls.append(name) or np.full(2000, 1.0))
    flow.keep_completed = True
    flow.run()
    journal = next((tmp_path / "f").glob("run-*.journal"))
    data = journal.read_bytes()
    at = data.index(b'"key":"#2"')  # the record of step c, followed by the final state
    journal.write_bytes(data[:at] + b'"kez"' + data[at + 5:])
    calls.clear()
    with pytest.warns(CorruptCheckpointWarning, match="damaged"):
        flow.run()
    assert calls == ["c"]  # a and b are still recorded; c, whose record is damaged, reruns
    report = safepoint.check(tmp_path)
    assert report.ok, report.findings


def test_a_damaged_output_names_the_step_to_rerun(tmp_path):
    flow = Flow("f", location=tmp_path)
    flow.step(name="a")(lambda state, data: np.arange(5000.0))
    fail = [True]

    @flow.step
    def b(state, data):
        if fail[0]:
            raise RuntimeError
        state["x"] = float(data["a"][1])

    with pytest.raises(RuntimeError):
        flow.run()
    a_output = read_log(open_store(tmp_path), "f").steps()["#0"].tree["checkpoint"]
    blob = next((tmp_path / "f" / f"{a_output:012d}").glob("*.bin"))
    blob.write_bytes(b"\0" * blob.stat().st_size)
    fail[0] = False
    fresh = Flow("f", location=tmp_path)
    fresh.step(name="a")(flow._steps[0].fn)
    fresh.step(b)
    with pytest.raises(CorruptCheckpoint, match=r"step 'a'.*run\(start_at='a'\)"):
        fresh.run()
    assert fresh.run(start_at="a") == {"x": 1.0}


def test_a_name_used_by_other_checkpoints_is_refused(tmp_path):
    Checkpointer("weights", location=tmp_path).save(0, {"w": 1})
    flow = Flow("weights", location=tmp_path)
    flow.step(name="s")(lambda state, data: None)
    with pytest.raises(KindMismatch, match="not a flow"):
        flow.run()


def test_step_registration_errors(tmp_path):
    flow = Flow("f", location=tmp_path)
    with pytest.raises(ValueError, match="give this step a name"):
        flow.step(lambda state, data: None)
    flow.step(name="x")(lambda state, data: None)
    flow.step(name="y")(lambda state, data: None)
    fixed = flow.step(name="x")(lambda state, data: state.update(x=1))  # a notebook cell again
    assert flow.steps == ["x", "y"] and flow._steps[0].fn is fixed  # replaced in place
    with pytest.raises(TypeError, match="load= must be callable"):
        flow.step(load=3, name="y")
    with pytest.raises(SafepointError, match="no steps"):
        Flow("empty", location=tmp_path).run()


def _frames(error: BaseException) -> list[tuple[bool, str]]:
    """(is safepoint's, function name) for each frame of the traceback, outermost first."""
    return [(frame.filename.startswith(PACKAGE_DIR), frame.name)
            for frame in traceback.extract_tb(error.__traceback__)]


def _failing_flow(tmp_path, name: str) -> Flow:
    flow = Flow(name, location=tmp_path)

    @flow.step
    def prep(state, data):
        state["n"] = 1

    @flow.step
    def fit(state, data):
        return divide(state["n"], 0)

    return flow


def divide(a: int, b: int) -> float:
    return a / b


def test_a_failing_steps_traceback_shows_the_users_frames(tmp_path):
    flow = _failing_flow(tmp_path, "tb")
    with pytest.raises(ZeroDivisionError) as info:
        flow.run()
    frames = _frames(info.value)
    assert frames[0] == (False, "test_a_failing_steps_traceback_shows_the_users_frames")
    assert frames[-2:] == [(False, "fit"), (False, "divide")]
    assert sum(ours for ours, _ in frames) <= 1  # at most the one entry frame
    text = "".join(traceback.format_exception(info.value))
    assert "engine.py" not in text and "drivers.py" not in text
    assert "SAFEPOINT_FULL_TRACEBACKS=1" in text  # the one frame says how to see them all
    assert "flow 'tb' stopped at step 'fit'" in text  # the note is kept
    assert type(info.value) is ZeroDivisionError
    assert "in divide" in flow.status()[1].traceback  # the recorded one too


def test_an_async_failing_steps_traceback_shows_the_users_frames(tmp_path):
    flow = Flow("atb", location=tmp_path)

    @flow.step
    async def fetch(state, data):
        await asyncio.sleep(0)
        raise LookupError("no such page")

    with pytest.raises(LookupError) as info:
        asyncio.run(flow.arun())
    frames = _frames(info.value)
    user = [i for i, (ours, name) in enumerate(frames) if name == "fetch"]
    assert user and frames[user[0] - 1][0] and not frames[user[0] - 2][0]  # one frame between


def test_full_tracebacks_can_be_asked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(knobs, "TRIM_TRACEBACKS", False)
    with pytest.raises(ZeroDivisionError) as info:
        _failing_flow(tmp_path, "full").run()
    names = [name for ours, name in _frames(info.value) if ours]
    assert "_run_step" in names and "drive" in names


def test_an_error_safepoint_raises_keeps_its_frames(tmp_path):
    flow = Flow("empty", location=tmp_path)
    with pytest.raises(SafepointError, match="has no steps") as info:
        flow.run()
    assert "_execute" in [name for ours, name in _frames(info.value) if ours]
