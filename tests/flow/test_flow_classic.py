"""The classic resumable pipeline, every run in a fresh process: f1 succeeds, f2 fails, the
fixed flow resumes at f2 without touching f1, and the next run starts over."""

from __future__ import annotations

import json

import pytest

from safepoint.flow import Flow
from safepoint.run import describe_run
from safepoint.store import open_store

PIPELINE = """
import json, os, sys
from pathlib import Path
from safepoint.flow import Flow

HERE = Path(__file__).parent

def note(*words):
    with open(HERE / "calls.txt", "a") as f:
        f.write(" ".join(words) + "\\n")

flow = Flow("classic", location=HERE / "store")

def load1(state):
    note("load1")
    return {"numbers": [1, 2, 3]}

def save1(state, data):
    note("save1")
    (HERE / "f1.json").write_text(json.dumps(data["numbers"]))

@flow.step(load=load1, save=save1)
def f1(state, data):
    note("f1")
    state["d"] = sum(data["numbers"])

def load2(state):
    note("load2")
    return {"numbers": json.loads((HERE / "f1.json").read_text())}

@flow.step(load=load2)
def f2(state, data):
    note("f2", json.dumps(state, sort_keys=True))
    if os.environ.get("F2_FAILS") == "1":
        raise RuntimeError("f2 is broken")
    state["e"] = state["d"] * 10 + len(data["numbers"])

def load3(state):
    note("load3")
    return {}

@flow.step(load=load3)
def f3(state, data):
    note("f3")
    state["f"] = state["e"] + 1

kwargs = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
print(json.dumps(flow.run({"x": 1}, **kwargs), sort_keys=True))
"""

F2_INPUT = 'f2 {"d": 6, "x": 1}'
FINAL = {"x": 1, "d": 6, "e": 63, "f": 64}


def test_classic_scenario_across_processes(script, tmp_path):
    pipeline = script(PIPELINE)

    # First run: f1 completes, f2 raises.
    failed = pipeline.run(env={"F2_FAILS": "1"}, ok=False)
    assert failed.returncode != 0 and "f2 is broken" in failed.stderr
    assert pipeline.calls() == ["load1", "f1", "save1", F2_INPUT]
    inspect = Flow("classic", location=tmp_path / "store")
    rows = {row.name: row for row in inspect.status()}
    assert [rows[n].status for n in ("f1", "f2", "f3")] == ["done", "failed", "pending"]
    assert rows["f2"].error == "RuntimeError: f2 is broken"
    assert 'raise RuntimeError("f2 is broken")' in rows["f2"].traceback
    assert inspect.state_before("f2") == {"x": 1, "d": 6}

    # f2 fixed, the flow built anew in a new process: f1 is skipped (no loader, no body);
    # f2 is the first step run here, so its loader runs; f3's loader does not (reload="first").
    fixed = pipeline.run(env={"F2_FAILS": "0"})
    assert json.loads(fixed.stdout) == FINAL
    assert pipeline.calls() == ["load2", F2_INPUT, "f3"]
    assert [row.status for row in inspect.status()] == ["done", "done", "done"]

    # The flow completed: the next run starts from f1 again.
    again = pipeline.run()
    assert json.loads(again.stdout) == FINAL
    assert pipeline.calls() == ["load1", "f1", "save1", F2_INPUT, "f3"]

    # reload="always" calls the loader of every step that runs.
    always = pipeline.run({"reload": "always"})
    assert json.loads(always.stdout) == FINAL
    assert pipeline.calls() == [
        "load1", "f1", "save1", "load2", F2_INPUT, "load3", "f3"]

    # start_at=1 starts at f2 with the state recorded before it.
    at_f2 = pipeline.run({"start_at": 1})
    assert json.loads(at_f2.stdout) == FINAL
    assert pipeline.calls() == ["load2", F2_INPUT, "f3"]


def test_show_reads_the_step_table_from_the_flow_record(script, tmp_path):
    """`safepoint show NAME` reads the status of every step from the flow's newest record."""
    pipeline = script(PIPELINE)
    pipeline.run(env={"F2_FAILS": "1"}, ok=False)
    info = describe_run(open_store(tmp_path / "store"), "classic")
    assert info is not None and info.kind == "flow" and not info.complete
    assert info.progress == pytest.approx(1 / 3)
    assert [(r["name"], r["status"], r["error"]) for r in info.steps] == [
        ("f1", "done", None), ("f2", "failed", "RuntimeError: f2 is broken")]
    assert all(isinstance(r["duration"], float) for r in info.steps)
    assert info.error == "RuntimeError: f2 is broken"
