"""Flows in a notebook, executed by a real Jupyter kernel (nbclient and ipykernel).

A notebook is where a flow's user works: a cell defines the steps, a step fails, a later
cell redefines the fixed step on the same flow object and the flow runs again; the kernel
restarts and the edited notebook runs from its top. These tests write such a notebook with
nbformat and execute it cell by cell in an ipykernel, restarting the kernel between runs,
and assert what the user sees in the cells' outputs.
"""

from __future__ import annotations

import os
import re
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from jupyter_core.utils import run_sync  # noqa: E402  (a dependency of nbclient)

SRC = str(Path(__file__).resolve().parents[2] / "src")
KERNEL_TIMEOUT = 120
ANSI = re.compile(r"\x1b\[[0-9;]*m")

SETUP = """
import os
from safepoint import Flow

flow = Flow("nb", location={store!r})
os.getpid()
"""

STEPS = """
import numpy as np

@flow.step
def clean(state, data):
    print("clean ran")
    return np.arange(state["rows"], dtype=np.float64)

@flow.step
def fit(state, data):
    print("fit ran")
    state["score"] = float(data["clean"].sum()) / {divisor}
"""

FIXED_FIT = """
@flow.step
def fit(state, data):                 # the fixed step, redefined in a later cell
    print("fit ran")
    state["score"] = float(data["clean"].sum()) / state["rows"]
"""


def code(source: str, *, raises: bool = False) -> Any:
    """A code cell; ``raises``: the cell is expected to raise (execution goes on)."""
    cell = nbformat.v4.new_code_cell(textwrap.dedent(source).strip())
    if raises:
        cell.metadata["tags"] = ["raises-exception"]
    return cell


class Kernel:
    """One notebook executed cell by cell in a real ipykernel, which can be restarted."""

    def __init__(self, folder: Path) -> None:
        self.nb = nbformat.v4.new_notebook()
        self.client = nbclient.NotebookClient(
            self.nb, kernel_name="python3", timeout=KERNEL_TIMEOUT,
            resources={"metadata": {"path": str(folder)}})

    def run(self, source: str, *, raises: bool = False) -> Any:
        """Append a cell to the notebook, execute it; the executed cell."""
        cell = code(source, raises=raises)
        self.nb.cells.append(cell)
        return self.client.execute_cell(cell, len(self.nb.cells) - 1)

    def restart(self) -> None:
        """Restart the kernel: a new process, nothing of the old one in memory."""
        run_sync(self.client.km.restart_kernel)()
        run_sync(self.client.kc.wait_for_ready)(timeout=KERNEL_TIMEOUT)


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [SRC, *filter(None, [os.environ.get("PYTHONPATH")])]))  # the kernel imports this safepoint
    kernel = Kernel(tmp_path)
    with kernel.client.setup_kernel():
        yield kernel


def stdout(cell: Any) -> str:
    return "".join(o.get("text", "") for o in cell.outputs
                   if o.output_type == "stream" and o.name == "stdout")


def stderr(cell: Any) -> str:
    return "".join(o.get("text", "") for o in cell.outputs
                   if o.output_type == "stream" and o.name == "stderr")


def value(cell: Any) -> str:
    """The text of the cell's value (its ``Out[n]``)."""
    results = [o for o in cell.outputs if o.output_type == "execute_result"]
    assert results, f"the cell has no value: {cell.outputs}"
    return results[-1].data["text/plain"]


def error(cell: Any) -> Any:
    errors = [o for o in cell.outputs if o.output_type == "error"]
    assert errors, f"the cell did not raise: {cell.outputs}"
    return errors[-1]


def test_a_failed_step_is_fixed_in_a_later_cell(kernel: Kernel, tmp_path: Path) -> None:
    kernel.run(SETUP.format(store=str(tmp_path / "store")))
    kernel.run(STEPS.format(divisor=0))           # fit has a bug
    failed = kernel.run('flow.run({"rows": 4})', raises=True)
    raised = error(failed)
    assert raised.ename == "ZeroDivisionError"
    shown = ANSI.sub("", "\n".join(raised.traceback))
    assert "stopped at step 'fit'" in shown and "run the flow again to resume" in shown
    assert "the state it received: .state_before('fit')" in shown
    assert stdout(failed) == "clean ran\nfit ran\n"

    # What the failed step received, and the table, one call each.
    assert value(kernel.run('flow.state_before("fit")')) == "{'rows': 4}"
    rows = kernel.run("[(r.name, r.status, r.error) for r in flow.status()]")
    assert value(rows) == ("[('clean', 'done', None),\n ('fit', 'failed', "
                           "'ZeroDivisionError: float division by zero')]")

    kernel.run(FIXED_FIT)                         # same flow object, a later cell
    assert value(kernel.run("flow.steps")) == "['clean', 'fit']"
    by_hand = kernel.run("""
    state = flow.state_before("fit")              # debug the fix by hand first
    fit(state, {"clean": flow.output("clean")})
    state
    """)
    assert value(by_hand) == "{'rows': 4, 'score': 1.5}"
    done = kernel.run("flow.run()")
    assert stdout(done) == "fit ran\n"            # clean is not run again
    assert value(done) == "{'rows': 4, 'score': 1.5}"
    assert "Warning" not in stderr(done)
    statuses = kernel.run("[r.status for r in flow.status()]")
    assert value(statuses) == "['done', 'done']"


def test_a_kernel_restart_between_the_failure_and_the_fix(kernel: Kernel, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    before = value(kernel.run(SETUP.format(store=store)))
    kernel.run(STEPS.format(divisor=0))
    assert error(kernel.run('flow.run({"rows": 4})', raises=True)).ename == "ZeroDivisionError"

    kernel.restart()                              # the user edits the cell, restarts, runs all
    after = value(kernel.run(SETUP.format(store=store)))
    assert after != before                        # a new kernel process
    kernel.run(STEPS.format(divisor='state["rows"]'))
    assert value(kernel.run('flow.state_before("fit")')) == "{'rows': 4}"
    done = kernel.run("flow.run()")
    assert stdout(done) == "fit ran\n"            # clean's array is read back from the store
    assert value(done) == "{'rows': 4, 'score': 1.5}"
    assert value(kernel.run('flow.output("clean").tolist()')) == "[0.0, 1.0, 2.0, 3.0]"


def test_a_changed_step_is_detected_after_a_restart(kernel: Kernel, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    kernel.run(SETUP.format(store=store))
    kernel.run(STEPS.format(divisor=0))
    assert error(kernel.run('flow.run({"rows": 4})', raises=True)).ename == "ZeroDivisionError"

    kernel.restart()                              # fit fixed, and clean edited too
    kernel.run(SETUP.format(store=store))
    kernel.run(STEPS.format(divisor='state["rows"]').replace(
        'state["rows"], dtype', 'state["rows"] + 1, dtype'))
    assert value(kernel.run("[r.changed for r in flow.status()]")) == "[True, False]"
    reused = kernel.run("flow.run()")
    assert stdout(reused) == "fit ran\n"         # clean's recorded result is reused...
    assert value(reused) == "{'rows': 4, 'score': 1.5}"
    warned = stderr(reused)                       # ...and the user is told, with the way out
    assert "StepChangedWarning" in warned and "step 'clean' changed" in warned
    assert "run(start_at='clean')" in warned
    rerun = kernel.run('flow.run(start_at="clean")')
    assert stdout(rerun) == "clean ran\nfit ran\n"
    assert value(rerun) == "{'rows': 4, 'score': 2.5}"


def test_interrupting_the_kernel_stops_a_step_and_the_rerun_resumes_there(
        kernel: Kernel, tmp_path: Path) -> None:
    kernel.run(SETUP.format(store=str(tmp_path / "store")))
    kernel.run("""
    import time

    @flow.step
    def quick(state, data):
        state["quick"] = True

    @flow.step
    def slow(state, data):
        print("slow started", flush=True)
        time.sleep(state.get("sleep", 0))
    """)
    timer = threading.Timer(3.0, run_sync(kernel.client.km.interrupt_kernel))  # the ■ button
    timer.start()
    started = time.monotonic()
    try:
        stopped = kernel.run('flow.run({"sleep": 600})', raises=True)
    finally:
        timer.cancel()
    assert time.monotonic() - started < 60         # the step stops at once, not after 600 s
    assert error(stopped).ename == "KeyboardInterrupt"
    assert "slow started" in stdout(stopped)
    rows = kernel.run("[(r.name, r.status) for r in flow.status()]")
    assert value(rows) == "[('quick', 'done'), ('slow', 'failed')]"
    assert value(kernel.run('flow.state_before("slow")')) == "{'sleep': 600, 'quick': True}"
