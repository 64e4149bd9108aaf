"""Helpers shared by the command-line tests (fixtures are in conftest.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import Result

from safepoint.policy import every
from safepoint.run import resume

Invoke = Callable[..., Result]
"""``invoke("ls", path, "--json")`` runs ``safepoint ls PATH --json`` in-process."""


NARROW = {"COLUMNS": "80"}
"""The environment of an 80-column terminal, for ``invoke(..., env=NARROW)``."""


def fits(text: str, width: int = 80) -> bool:
    """Whether every line of ``text`` fits ``width`` columns."""
    return all(len(line) <= width for line in text.splitlines())


def one_line_error(result: Result, *fragments: str, status: int = 1) -> None:
    """``result`` failed with ``status`` and one ``error:`` line on stderr holding each of
    ``fragments``, without a traceback."""
    assert result.exit_code == status, result.output
    stderr = result.stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in stderr, stderr


def parse_json(result: Result) -> Any:
    """The JSON a ``--json`` command printed (and nothing else on stdout)."""
    return json.loads(result.stdout)


def weights(step: int) -> dict[str, Any]:
    """A state whose every value follows from ``step``, with two blob-backed arrays."""
    return {
        "w": np.arange(20_000, dtype=np.float32) * step,
        "b": np.full((64, 64), step, dtype=np.int16),
        "step": step,
        "note": f"step {step}",
    }


class Crash(Exception):
    """Raised inside a run to stop it the way a crash would."""


def interrupted_run(store: Path, name: str, stop_at: int, *, arrays: bool = False) -> None:
    """A run of 10 items that commits after each and crashes at item ``stop_at``."""
    with pytest.raises(Crash), resume(name, location=store, policy=every(items=1)) as run:
        if arrays:
            run.state.setdefault("w", np.zeros(10_000))
        for item in run.range(10):
            if item == stop_at:
                raise Crash
