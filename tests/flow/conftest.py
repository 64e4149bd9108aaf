"""Helpers for flow tests: scripts run in fresh processes, and a store that counts reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from safepoint.store import LocalStore


class ScriptRunner:
    """Writes a flow script into a folder and runs it in fresh Python processes."""

    def __init__(self, folder: Path, source: str) -> None:
        self.folder = folder
        self.script = folder / "pipeline.py"
        self.script.write_text(textwrap.dedent(source))
        self.calls_file = folder / "calls.txt"

    def start(self, *args: Any, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """Start the script; ``args`` are passed as JSON on its command line."""
        self.calls_file.write_text("")
        return subprocess.Popen(
            [sys.executable, str(self.script), *(json.dumps(a) for a in args)],
            cwd=self.folder, env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, *args: Any, env: dict[str, str] | None = None, ok: bool = True) -> subprocess.CompletedProcess[str]:
        process = self.start(*args, env=env)
        out, err = process.communicate(timeout=120)
        done = subprocess.CompletedProcess(process.args, process.returncode, out, err)
        if ok and done.returncode != 0:
            raise AssertionError(f"script failed ({done.returncode}):\n{err}")
        return done

    def calls(self) -> list[str]:
        return self.calls_file.read_text().splitlines()


@pytest.fixture
def script(tmp_path: Path):
    return lambda source: ScriptRunner(tmp_path, source)


class CountingStore(LocalStore):
    """A local store that counts how often each key is read."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: Counter[str] = Counter()

    def read(self, key: str, *, limit: int | None = None) -> bytes:
        self.reads[key] += 1
        return super().read(key, limit=limit)

    def read_range(self, key: str, offset: int, out: memoryview) -> int:
        self.reads[key] += 1
        return super().read_range(key, offset, out)

    def map(self, key: str) -> Any:
        self.reads[key] += 1
        return super().map(key)

    def blob_reads(self) -> int:
        return sum(n for key, n in self.reads.items() if key.endswith(".bin"))


@pytest.fixture
def counting_store(tmp_path: Path) -> CountingStore:
    return CountingStore(tmp_path / "store")
