"""Flows killed with SIGKILL: the rerun starts at the interrupted step, with the state and
the heavy data committed before it."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np

import safepoint
from safepoint import Checkpointer
from safepoint.flow import Flow
from safepoint.format import verify_checkpoint

PRELUDE = """
import hashlib, json, os, sys, time
from pathlib import Path
import numpy as np
from safepoint.flow import Flow

HERE = Path(__file__).parent

def note(line):
    with open(HERE / "calls.txt", "a") as f:
        f.write(line + "\\n")
"""

KILLABLE = PRELUDE + """
flow = Flow("crashy", location=HERE / "store")

@flow.step
def a(state, data):
    note("a")
    state["a"] = state["seed"] * 2

@flow.step
def b(state, data):
    note("b " + json.dumps(state, sort_keys=True))
    (HERE / "b.started").touch()
    if os.environ.get("HANG") == "1":
        time.sleep(60)
    state["b"] = state["a"] + 1

@flow.step
def c(state, data):
    note("c")
    state["c"] = state["b"] * 3

print(json.dumps(flow.run({"seed": 5}), sort_keys=True))
"""

HEAVY = PRELUDE + """
flow = Flow("heavy", location=HERE / "store")

@flow.step
def make(state, data):
    note("make")
    values = np.random.default_rng(7).standard_normal(12_500_000)  # 100 MB of float64
    return {"values": values, "label": "normal"}

@flow.step
def use(state, data):
    note("use")
    (HERE / "use.started").touch()
    if os.environ.get("HANG") == "1":
        time.sleep(60)
    values = data["make"]["values"]
    state["digest"] = hashlib.sha256(values.tobytes()).hexdigest()
    state["dtype"], state["shape"] = str(values.dtype), list(values.shape)
    state["label"] = data["make"]["label"]

print(json.dumps(flow.run(), sort_keys=True))
"""


def wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the script exited early:\n{process.communicate()[1]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} did not appear")
        time.sleep(0.01)


def kill_after(path: Path, process: subprocess.Popen[str]) -> None:
    """SIGKILL ``process`` at a random instant after it signals (through ``path``) that the
    step started."""
    wait_for(path, process)
    time.sleep(random.uniform(0.0, 0.05))
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL


def test_rerun_after_kill_starts_at_the_interrupted_step(script, tmp_path):
    pipeline = script(KILLABLE)
    kill_after(tmp_path / "b.started", pipeline.start(env={"HANG": "1"}))
    assert pipeline.calls() == ["a", 'b {"a": 10, "seed": 5}']

    inspect = Flow("crashy", location=tmp_path / "store")
    assert [row.status for row in inspect.status()] == ["done", "pending", "pending"]
    assert inspect.state_before("b") == {"seed": 5, "a": 10}

    rerun = pipeline.run(env={"HANG": "0"})
    assert pipeline.calls() == ['b {"a": 10, "seed": 5}', "c"]
    assert json.loads(rerun.stdout) == {"seed": 5, "a": 10, "b": 11, "c": 33}


def test_heavy_returned_data_reaches_the_next_step_after_a_crash(script, tmp_path):
    pipeline = script(HEAVY)
    kill_after(tmp_path / "use.started", pipeline.start(env={"HANG": "1"}))
    assert pipeline.calls() == ["make", "use"]

    rerun = pipeline.run(env={"HANG": "0"})
    assert pipeline.calls() == ["use"]  # no loader anywhere; `make` is not run again
    expected = np.random.default_rng(7).standard_normal(12_500_000)
    assert json.loads(rerun.stdout) == {
        "digest": hashlib.sha256(expected.tobytes()).hexdigest(), "dtype": "float64",
        "shape": [12_500_000], "label": "normal"}


TORTURE = PRELUDE + """
flow = Flow("torture", location=HERE / "store")

@flow.step
def s0(state, data):
    state["sizes"] = [1_000_000]
    return np.arange(1_000_000, dtype=np.int64)

@flow.step
def s1(state, data):
    time.sleep(0.1)
    state["sizes"].append(2)
    return {"tripled": data["s0"] * 3}

@flow.step
def s2(state, data):
    time.sleep(0.1)
    state["checksum"] = int((data["s1"]["tripled"] + data["s0"]).sum() % 1_000_003)
    return data["s1"]["tripled"][::1000].copy()

@flow.step
def s3(state, data):
    time.sleep(0.1)
    state["tail"] = data["s2"][-3:].tolist()

(HERE / "ready").touch()
print(json.dumps(flow.run({"start": True}), sort_keys=True))
"""


def test_kills_at_random_instants_never_change_the_result(script, tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    pipeline = script(TORTURE)
    values = np.arange(1_000_000, dtype=np.int64)
    expected = {
        "start": True, "sizes": [1_000_000, 2], "checksum": int((values * 4).sum() % 1_000_003),
        "tail": (values * 3)[::1000][-3:].tolist()}
    # Kills while the flow is first under way, then while a completed flow starts over.
    for attempts in (6, 3):
        for _ in range(attempts):
            (tmp_path / "ready").unlink(missing_ok=True)
            process = pipeline.start()
            wait_for(tmp_path / "ready", process)
            try:
                out, err = process.communicate(timeout=rng.uniform(0.0, 0.35))
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
            else:
                assert process.returncode == 0 and json.loads(out) == expected, f"seed {seed}: {err}"
        assert json.loads(pipeline.run().stdout) == expected, f"seed {seed}"

    checkpointer = Checkpointer("torture", location=tmp_path / "store")
    flow = Flow("torture", location=tmp_path / "store")
    assert [row.status for row in flow.status()] == ["done"] * 4
    # The store holds one commit per returned output (the small state is in the record),
    # all intact, and nothing any kill left behind.
    assert len(checkpointer.steps()) == 3
    for number in checkpointer.steps():
        assert verify_checkpoint(checkpointer.store, "torture", number).ok
    assert np.array_equal(flow.output("s0"), values)
    report = safepoint.check(tmp_path / "store")
    assert report.ok and report.clean, report.findings
