"""The examples and the demo run end to end, as a user would run them."""

from __future__ import annotations

import inspect
import io
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from run_helpers import write_numbers

import safepoint
from safepoint.run.demo import RUN_NAME, run_demo, user_code, worker

ROOT = Path(__file__).resolve().parents[2]
needs_export = pytest.mark.skipif(
    not hasattr(safepoint, "resume"), reason="safepoint.resume is not exported by safepoint/__init__.py yet")


def example(name: str, tmp_path: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    environment = {**os.environ, "SAFEPOINT_DIR": str(tmp_path / "store"), "PYTHONUNBUFFERED": "1", **env}
    return subprocess.Popen([sys.executable, str(ROOT / "examples" / name), *args], cwd=tmp_path,
                            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@needs_export
def test_counter_interrupted_by_ctrl_c_resumes_at_the_next_item(tmp_path: Path) -> None:
    first = example("counter.py", tmp_path, COUNTER_DELAY="0.05")
    printed = []
    for line in first.stdout:
        printed.append(line)
        if line.startswith("item  7"):
            first.send_signal(signal.SIGINT)
            break
    rest, errors = first.communicate(timeout=30)
    printed += rest.splitlines(keepends=True)
    assert first.returncode == -signal.SIGINT, errors
    assert "KeyboardInterrupt" in errors and "Run it again to resume" in errors
    second = example("counter.py", tmp_path, COUNTER_DELAY="0.01")
    output, errors = second.communicate(timeout=60)
    assert second.returncode == 0, errors
    before = [int(line.split()[1]) for line in printed if line.startswith("item")]
    after = [int(line.split()[1]) for line in output.splitlines() if line.startswith("item")]
    assert before + after == list(range(50))  # every item exactly once across the two runs
    assert output.startswith(f"resuming at item {len(before)} (attempt 2)")
    assert output.splitlines()[-1] == f"done: total {sum(range(50))}"


@needs_export
def test_sum_numbers_gives_the_exact_sum_after_a_kill(tmp_path: Path) -> None:
    values = write_numbers(tmp_path / "numbers.txt", 300_000, seed=5)
    first = example("sum_numbers.py", tmp_path, "numbers.txt")
    try:
        first.wait(timeout=0.5)
    except subprocess.TimeoutExpired:
        first.kill()  # SIGKILL, wherever it is
    first.communicate()
    second = example("sum_numbers.py", tmp_path, "numbers.txt")
    output, errors = second.communicate(timeout=120)
    assert second.returncode == 0, errors
    assert output.strip() == str(sum(values))


def test_the_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = io.StringIO()
    status = run_demo(tmp_path / "demo", count=40_000, seed=3, seconds=2.0,
                      console=Console(file=out, width=120))
    text = out.getvalue()
    assert status == 0, text
    assert "killed with SIGKILL" in text and "exact" in text and "WRONG" not in text
    assert "lines not reprocessed" in text and "checkpoint overhead" in text
    assert (tmp_path / "demo" / "numbers.txt").exists()
    code = user_code()  # the user code it runs, printed as it is in the worker's source
    assert 'with runs.resume("demo-sum", location=store) as run:' in code
    assert "(demo)" not in code and "resumed_at" not in code
    assert all(line.strip() in inspect.getsource(worker) for line in code.splitlines()[2:])
    assert all(line.strip() in text for line in code.splitlines() if line.strip())
    assert RUN_NAME == "demo-sum"
    assert re.search(r"checkpoint overhead\s+│?\s*[+-]\d+\.\d% \(median of 5 rounds, from "
                     r"[+-]\d+\.\d% to [+-]\d+\.\d%\)", text), text
    assert "next: examples/ holds runnable scripts" in " ".join(text.split())
    for path in ("examples/counter.py", "examples/train.py", "docs/runs.md", "docs/cli.md"):
        assert (ROOT / path).exists(), path  # what it points to is there


def test_make_demo_installs_only_what_the_demo_needs() -> None:
    makefile = (ROOT / "Makefile").read_text()
    demo = re.search(r"^demo: (.*)$", makefile, re.MULTILINE)
    assert demo is not None and demo.group(1).split() == ["$(STAMP)"]
    plain = re.search(r"^\$\(STAMP\):.*\n\t(.*)$", makefile, re.MULTILINE)
    assert plain is not None and plain.group(1).strip() == "$(BIN)/pip install -q -e ."
    test = re.search(r"^test: (.*)$", makefile, re.MULTILINE)
    assert test is not None and test.group(1).split() == ["$(TEST_STAMP)"]
    assert "-e '.[test]'" in makefile


def test_the_demo_command_is_registered(tmp_path: Path, monkeypatch: Any) -> None:
    from typer.testing import CliRunner

    import safepoint.cli.demo
    from safepoint.cli import app

    called: dict[str, Any] = {}

    def fake_demo(directory: Path | None, **options: Any) -> int:
        called.update(options, directory=directory)
        return 0

    monkeypatch.setattr(safepoint.cli.demo, "run_demo", fake_demo)
    result = CliRunner().invoke(app, ["demo", "--count", "5000", "--seed", "7", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert called == {"count": 5000, "seed": 7, "seconds": 4.0, "directory": tmp_path}
