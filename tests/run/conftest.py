"""Fixtures for the run tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from run_helpers import write_numbers


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A store directory for one test."""
    return tmp_path / "store"


@pytest.fixture
def numbers(tmp_path: Path) -> Callable[..., tuple[Path, list[int]]]:
    """A factory of number files: ``numbers(count, seed)`` -> (path, values)."""

    def make(count: int = 10_000, seed: int = 0, name: str = "numbers.txt") -> tuple[Path, list[int]]:
        path = tmp_path / name
        return path, write_numbers(path, count, seed)

    return make
