"""examples/task_local.py runs, fails where told, and resumes after its last checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "task_local.py"


def run_example(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SAFEPOINT_DIR": str(tmp_path / "store")}
    return subprocess.run([sys.executable, str(EXAMPLE), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def ran(output: str) -> list[str]:
    return [line.removeprefix("running ") for line in output.splitlines() if line.startswith("running ")]


def test_example_resumes_after_its_last_checkpoint(tmp_path: Path) -> None:
    crashed = run_example(tmp_path, "--crash-at", "6")
    assert crashed.returncode == 1, crashed.stderr
    assert ran(crashed.stdout) == ["generate"] + [f"chunk {i}" for i in range(6)]
    assert "failed: simulated crash at chunk 6" in crashed.stdout

    resumed = run_example(tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed: attempt 2" in resumed.stdout
    assert ran(resumed.stdout) == [f"chunk {i}" for i in range(6, 10)] + ["report"]
    summary = resumed.stdout.splitlines()[-1]
    count, mean, std = (float(summary.split()[i]) for i in (1, 3, 5))
    assert count == 1_000_000 and abs(mean - 3.0) < 0.01 and abs(std - 2.0) < 0.01

    again = run_example(tmp_path)  # a completed job is idempotent: its recorded result
    assert ran(again.stdout) == [] and again.stdout.splitlines()[-1] == summary
