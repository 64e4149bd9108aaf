"""How the command is started: ``--version``, ``python -m safepoint``, shell completion."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cli_support import Invoke

import safepoint

SRC = str(Path(safepoint.__file__).resolve().parents[1])


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "safepoint", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": SRC, **env})


def test_version(invoke: Invoke) -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout == f"safepoint {safepoint.__version__}\n"


def test_python_dash_m_safepoint(store_dir: Path) -> None:
    done = _run("ls", str(store_dir), "--json")
    assert done.returncode == 0, done.stderr
    assert '"name": "train"' in done.stdout
    assert _run("--version").stdout.startswith("safepoint ")
    usage = _run()
    assert "Usage: safepoint" in usage.stdout + usage.stderr


def test_shell_completion_script_and_completing_a_name(invoke: Invoke, store_dir: Path) -> None:
    # the script `--show-completion` prints for bash (asked for by name: detecting the
    # user's shell from the parent processes fails where tests run without one)
    script = _run(_SAFEPOINT_COMPLETE="source_bash")
    assert script.returncode == 0 and "_SAFEPOINT_COMPLETE=complete_bash" in script.stdout, script
    assert "--install-completion" in invoke("--help").stdout
    commands = _run(_SAFEPOINT_COMPLETE="complete_bash", COMP_WORDS="safepoint wa",
                    COMP_CWORD="1")
    assert commands.stdout.split() == ["watch"], commands.stderr
    names = _run(_SAFEPOINT_COMPLETE="complete_bash", COMP_WORDS="safepoint show -l "
                 f"{store_dir} t", COMP_CWORD="4")
    assert names.stdout.split() == ["train"], names.stderr
