"""Helpers shared by the command-line tests (fixtures are in conftest.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
from typer.testing import Result

Invoke = Callable[..., Result]
"""``invoke("ls", path, "--json")`` runs ``safepoint ls PATH --json`` in-process."""


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
