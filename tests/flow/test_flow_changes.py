"""Changed code and changed step lists: warned about, rerun on request, never silently reused."""

from __future__ import annotations

import importlib.util
import itertools
import textwrap
import warnings
from pathlib import Path
from types import ModuleType

import pytest

from safepoint.flow import Flow, StepChangedWarning, StepMismatch

_modules = itertools.count()

V1 = """
def prepare(state, data):
    CALLS.append("prepare")
    state["scale"] = 2

def train(state, data):
    CALLS.append("train")
    if FAIL:
        raise RuntimeError("not yet")
    state["model"] = state["scale"] * 10
"""

V1_REFORMATTED = """
def prepare(state, data):
    # the same code, commented and laid out differently
    CALLS.append(  "prepare" )
    state["scale"] = 2   # still 2

def train(state, data):
    CALLS.append("train")
    if FAIL:
        raise RuntimeError("not yet")
    state["model"] = state["scale"] * 10
"""

V2 = V1.replace('state["scale"] = 2', 'state["scale"] = 3')


def load_module(tmp_path: Path, source: str, *, fail: bool) -> ModuleType:
    """Import ``source`` from a file of its own, so that its functions have real source."""
    path = tmp_path / f"steps_{next(_modules)}.py"
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.CALLS, module.FAIL = [], fail
    return module


def build(tmp_path: Path, module: ModuleType, **options) -> Flow:
    flow = Flow("changes", location=tmp_path / "store", **options)
    flow.step(module.prepare)
    flow.step(module.train)
    return flow


def fail_in_train(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not yet"):
        build(tmp_path, load_module(tmp_path, V1, fail=True)).run()


def test_changed_code_of_a_completed_step_is_warned_about(tmp_path):
    fail_in_train(tmp_path)
    module = load_module(tmp_path, V2, fail=False)
    flow = build(tmp_path, module)
    assert [row.changed for row in flow.status()] == [True, False]
    with pytest.warns(StepChangedWarning, match=r"step 'prepare' changed.*rerun_changed=True") as caught:
        final = flow.run()
    assert caught[0].filename == __file__  # the warning points at the caller's line
    assert module.CALLS == ["train"] and final == {"scale": 2, "model": 20}


def test_rerun_changed_restarts_at_the_first_changed_step(tmp_path):
    fail_in_train(tmp_path)
    module = load_module(tmp_path, V2, fail=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        final = build(tmp_path, module, rerun_changed=True).run()
    assert module.CALLS == ["prepare", "train"] and final == {"scale": 3, "model": 30}


def test_comments_and_layout_are_not_changes(tmp_path):
    fail_in_train(tmp_path)
    module = load_module(tmp_path, V1_REFORMATTED, fail=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(tmp_path, module, rerun_changed=True).run()
    assert module.CALLS == ["train"]


def steps_flow(tmp_path: Path, names: list[str], calls: list[str], fail: str | None = None) -> Flow:
    flow = Flow("order", location=tmp_path)
    for name in names:
        def body(state, data, name=name):
            calls.append(name)
            if name == fail:
                raise RuntimeError(name)
            state[name] = True
        flow.step(name=name)(body)
    return flow


@pytest.mark.parametrize(("names", "index", "recorded", "current"), [
    (["a", "b_renamed", "c"], 1, "b", "b_renamed"),  # renamed
    (["b", "a", "c"], 0, "a", "b"),                  # reordered
    (["a", "c"], 1, "b", "c"),                       # removed
])
def test_a_different_step_where_one_completed_is_refused(tmp_path, names, index, recorded, current):
    with pytest.raises(RuntimeError):
        steps_flow(tmp_path, ["a", "b", "c"], [], fail="c").run()
    calls: list[str] = []
    flow = steps_flow(tmp_path, names, calls)
    with pytest.raises(StepMismatch) as raised:
        flow.run()
    error = raised.value
    assert (error.index, error.recorded, error.current) == (index, recorded, current)
    message = str(error)
    assert f"completed as {recorded!r} but is now {current!r}" in message
    assert "flow.reset()" in message and "safepoint rm order" in message
    assert f"start_at={index}" in message
    assert calls == []
    # The way out the message names works: rerun from the mismatched index.
    flow.run(start_at=index)
    assert calls == names[index:]


def test_a_removed_step_of_a_completed_flow_is_refused_when_reused(tmp_path):
    steps_flow(tmp_path, ["a", "b"], []).run()
    flow = steps_flow(tmp_path, ["a"], [])
    flow.keep_completed = True
    with pytest.raises(StepMismatch, match="'b' but no longer exists"):
        flow.run()
    flow.keep_completed = False
    assert flow.run() == {"a": True}  # starting over reuses nothing


def test_renaming_a_step_that_did_not_complete_is_fine(tmp_path):
    with pytest.raises(RuntimeError):
        steps_flow(tmp_path, ["a", "b"], [], fail="b").run()
    calls: list[str] = []
    assert steps_flow(tmp_path, ["a", "b2"], calls).run() == {"a": True, "b2": True}
    assert calls == ["b2"]


def test_a_step_appended_to_a_completed_flow_runs_alone(tmp_path):
    steps_flow(tmp_path, ["a", "b"], []).run()
    calls: list[str] = []
    assert steps_flow(tmp_path, ["a", "b", "c"], calls).run() == {"a": True, "b": True, "c": True}
    assert calls == ["c"]
