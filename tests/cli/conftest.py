"""Fixtures for the command-line tests: a CLI runner and stores built with the Checkpointer."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_support import Invoke, weights
from typer.testing import CliRunner, Result

from safepoint import Checkpointer
from safepoint.cli import app
from safepoint.flow import Flow


@pytest.fixture
def invoke(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Invoke:
    """Run ``safepoint ARGS...`` in-process; the default store is ``tmp_path/default``.

    Wide output (``COLUMNS=200``) so that table cells are never folded in assertions.
    """
    monkeypatch.setenv("SAFEPOINT_DIR", str(tmp_path / "default"))
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()

    def run(*args: str, env: dict[str, str] | None = None) -> Result:
        return runner.invoke(app, [str(a) for a in args], env=env)

    return run


def _failing_flow(root: Path) -> None:
    """A real flow whose first step completes and whose second fails, run twice."""
    flow = Flow("prep", location=root)
    flow.step(name="load")(lambda state, data: state.update(rows=3))

    @flow.step
    def clean(state: dict, data: object) -> None:
        raise ValueError("bad row 2")

    for _ in range(2):
        with pytest.raises(ValueError):
            flow.run()


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """A store with ``train`` (steps 10, 20, 30), a flow ``prep`` (its first step done, its
    second failed, attempt 2) and a one-step ``solo``."""
    root = tmp_path / "store"
    train = Checkpointer("train", location=root)
    for step in (10, 20, 30):
        train.save(step, weights(step), metadata={"loss": 1.0 / step})
    train.close()
    _failing_flow(root)
    Checkpointer("solo", location=root).save(7, {"x": 1})
    return root
