"""Fixtures of the hostile-store suite: a CLI runner."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from safepoint.cli import app

Invoke = Callable[..., Result]


@pytest.fixture
def invoke(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Invoke:
    """Run ``safepoint ARGS...`` in-process (wide output, so lines are not folded)."""
    monkeypatch.setenv("SAFEPOINT_DIR", str(tmp_path / "default"))
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()

    def run(*args: object) -> Result:
        return runner.invoke(app, [str(a) for a in args])

    return run
