"""examples/flow_pipeline.py runs, fails where told, and resumes at the failed step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flow_pipeline.py"


def run_example(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SAFEPOINT_DIR": str(tmp_path / "store")}
    return subprocess.run([sys.executable, str(EXAMPLE), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def ran(output: str) -> list[str]:
    return [line.split()[1] for line in output.splitlines() if line.startswith("running ")]


def test_example_resumes_at_the_failed_step(tmp_path):
    crashed = run_example(tmp_path, "--crash", "fit")
    assert crashed.returncode == 1, crashed.stderr
    assert ran(crashed.stdout) == ["generate", "standardize", "fit"]
    assert "fit          failed   RuntimeError: simulated crash in fit" in crashed.stdout

    resumed = run_example(tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert ran(resumed.stdout) == ["fit", "evaluate"]
    rmse = float(resumed.stdout.split("rmse ")[1])
    assert 0.09 < rmse < 0.11  # the noise level the data was generated with

    again = run_example(tmp_path)  # a completed flow starts over
    assert ran(again.stdout) == ["generate", "standardize", "fit", "evaluate"]
    assert float(again.stdout.split("rmse ")[1]) == rmse
