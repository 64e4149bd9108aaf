"""``safepoint run``: restarts a crashing command, with real processes and real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cli_support import Invoke

from safepoint.supervisor import Supervisor, describe_exit, exit_status

SAFEPOINT = str(Path(sys.executable).with_name("safepoint"))

# Saves its progress with a Checkpointer and SIGKILLs itself after items 3 and 6; the
# attempts it saw are appended to attempts.txt.
SELF_KILLING = """
import os, signal, sys
from pathlib import Path
from safepoint import Checkpointer

here = Path(sys.argv[1])
with open(here / "attempts.txt", "a") as f:
    f.write(os.environ["SAFEPOINT_ATTEMPT"] + "\\n")
ckpt = Checkpointer("count", location=here / "store")
start = ckpt.restore().state["done"] if ckpt.latest_step() is not None else 0
total = start
for item in range(start, 10):
    total = item + 1
    ckpt.save(item, {"done": total})
    if item in (3, 6) and not (here / f"killed-{item}").exists():
        (here / f"killed-{item}").touch()
        os.kill(os.getpid(), signal.SIGKILL)
(here / "result.txt").write_text(str(total))
"""


def script(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(source))
    return path


def attempts(tmp_path: Path) -> list[int]:
    return [int(line) for line in (tmp_path / "attempts.txt").read_text().split()]


def test_run_resumes_a_job_that_kills_itself_twice(invoke: Invoke, tmp_path: Path) -> None:
    job = script(tmp_path, SELF_KILLING)
    result = invoke("run", "--backoff", "0", "--", sys.executable, job, tmp_path)
    assert result.exit_code == 0, result.output
    assert attempts(tmp_path) == [1, 2, 3]
    assert (tmp_path / "result.txt").read_text() == "10"
    notices = [line for line in result.stderr.splitlines() if "restarting" in line]
    assert len(notices) == 2 and all("was killed by SIGKILL" in n for n in notices)


def test_run_gives_up_after_max_restarts_with_the_last_status(invoke: Invoke, tmp_path: Path) -> None:
    job = script(tmp_path, """
        import os, sys
        from pathlib import Path
        with open(Path(sys.argv[1]) / "attempts.txt", "a") as f:
            f.write(os.environ["SAFEPOINT_ATTEMPT"] + "\\n")
        sys.exit(10 + int(os.environ["SAFEPOINT_ATTEMPT"]))
    """)
    result = invoke("run", "--max-restarts", "2", "--backoff", "0", "--", sys.executable, job,
                    tmp_path)
    assert result.exit_code == 13
    assert attempts(tmp_path) == [1, 2, 3]
    assert "gave up after 2 restarts (exit status 13)" in result.stderr


def test_run_reports_a_signal_death_as_128_plus_the_signal(invoke: Invoke, tmp_path: Path) -> None:
    job = script(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    result = invoke("run", "-n", "0", sys.executable, job)
    assert result.exit_code == 128 + signal.SIGKILL


def test_run_passes_the_exit_code_through_and_options_to_the_command(
    invoke: Invoke, tmp_path: Path
) -> None:
    out = tmp_path / "args.txt"
    job = script(tmp_path, f"""
        import sys
        open({str(out)!r}, "w").write(" ".join(sys.argv[1:]))
    """)
    result = invoke("run", sys.executable, job, "--max-restarts", "-x")
    assert result.exit_code == 0, result.output
    assert out.read_text() == "--max-restarts -x"
    result = invoke("run", "--", sys.executable, "-c", "raise SystemExit(0)")
    assert (result.exit_code, result.stderr) == (0, "")


def test_run_of_a_missing_command(invoke: Invoke, tmp_path: Path) -> None:
    result = invoke("run", "--", str(tmp_path / "no-such-program"))
    assert result.exit_code == 127
    assert "command not found" in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_forwards_a_signal_and_does_not_restart(tmp_path: Path, sig: signal.Signals) -> None:
    job = script(tmp_path, """
        import os, signal, sys, time
        from pathlib import Path
        here = Path(sys.argv[1])
        with open(here / "attempts.txt", "a") as f:
            f.write(os.environ["SAFEPOINT_ATTEMPT"] + "\\n")
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        (here / "ready").touch()
        time.sleep(60)
    """)
    # A session of its own: no terminal, so SIGINT reaches the child only by forwarding.
    supervisor = subprocess.Popen([SAFEPOINT, "run", "--backoff", "0", "--", sys.executable, job,
                                   str(tmp_path)], start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline and supervisor.poll() is None, "the job did not start"
        time.sleep(0.02)
    supervisor.send_signal(sig)
    _, stderr = supervisor.communicate(timeout=30)
    assert supervisor.returncode == 128 + sig, stderr
    assert attempts(tmp_path) == [1]
    assert b"restarting" not in stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_a_killed_supervisor_takes_its_command_with_it(tmp_path: Path) -> None:
    """SIGKILL of `safepoint run` ends the job too: no orphan keeps writing the name while a
    new supervisor would start a second writer."""
    job = script(tmp_path, """
        import os, sys, time
        from pathlib import Path
        here = Path(sys.argv[1])
        (here / "child.pid").write_text(str(os.getpid()))
        time.sleep(60)
    """)
    supervisor = subprocess.Popen([SAFEPOINT, "run", "--", sys.executable, job, str(tmp_path)],
                                  start_new_session=True, stderr=subprocess.DEVNULL)
    pid_file, deadline = tmp_path / "child.pid", time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and supervisor.poll() is None, "the job did not start"
        time.sleep(0.02)
    child = int(pid_file.read_text())
    supervisor.kill()
    supervisor.wait()
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return  # gone (reaped by init once it died of SIGTERM)
        with open(f"/proc/{child}/stat") as f:
            if f.read().split(") ")[-1].startswith("Z"):
                return  # a zombie: dead, not yet reaped
        time.sleep(0.02)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the job outlived its killed supervisor")


def test_backoff_doubles_up_to_the_cap(tmp_path: Path) -> None:
    slept: list[float] = []
    notices: list[str] = []
    supervisor = Supervisor([sys.executable, "-c", "raise SystemExit(3)"], max_restarts=5,
                            backoff=1.5, max_backoff=10, sleep=slept.append, notify=notices.append)
    assert supervisor.run() == 3
    assert slept == [1.5, 3.0, 6.0, 10, 10]
    assert len(notices) == 6 and "attempt 6 of 6" in notices[4] and "gave up" in notices[5]


def test_each_attempt_sees_its_number(tmp_path: Path) -> None:
    log = tmp_path / "env.txt"
    code = (f"import os; open({str(log)!r}, 'a').write(os.environ['SAFEPOINT_ATTEMPT'] + ' ');"
            "raise SystemExit(0 if os.environ['SAFEPOINT_ATTEMPT'] == '4' else 1)")
    supervisor = Supervisor([sys.executable, "-c", code], max_restarts=5, sleep=lambda s: None,
                            notify=lambda line: None, env={**os.environ, "SAFEPOINT_ATTEMPT": "9"})
    assert supervisor.run() == 0
    assert log.read_text().split() == ["1", "2", "3", "4"]


def test_exit_status_helpers() -> None:
    assert (exit_status(0), exit_status(3), exit_status(-9)) == (0, 3, 137)
    assert describe_exit(-15) == "was killed by SIGTERM"
    assert describe_exit(2) == "exited with status 2"
    with pytest.raises(ValueError, match="give a command"):
        Supervisor([])
