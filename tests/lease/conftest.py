"""Fixtures of the lease tests: a store folder, and writer processes that are cleaned up
whatever happens."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("lease_support")

from lease_support import Spec, start, stop_all  # noqa: E402

if sys.platform == "win32":  # pragma: no cover
    pytest.skip("SIGKILL, SIGSTOP and fork servers", allow_module_level=True)


@pytest.fixture
def location(tmp_path: Path) -> str:
    """A local store folder for one test."""
    return str(tmp_path / "store")


@pytest.fixture
def writers() -> Iterator[Callable[[Spec], Any]]:
    """``writers(spec)`` starts a writer process; whatever is left of them is killed at the end."""
    started: list[Any] = []

    def launch(spec: Spec) -> Any:
        process = start(spec)
        started.append(process)
        return process

    yield launch
    stop_all(started)
