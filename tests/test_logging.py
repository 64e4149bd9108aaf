"""The ``safepoint`` loggers: commits at DEBUG; resumes, fallbacks, takeovers and restarts
at INFO or WARNING; no output of the library's own except through them (the CLI and the
progress bars aside), and a warning that is also logged is never shown twice."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import safepoint
from safepoint import Checkpointer, CorruptCheckpointWarning, errors, manual
from safepoint.errors import PACKAGE_DIR
from safepoint.supervisor import Supervisor

SRC = Path(PACKAGE_DIR)


def records(caplog: pytest.LogCaptureFixture, logger: str, level: int = logging.DEBUG) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == logger and r.levelno >= level]


def test_every_logger_is_a_child_of_the_package_logger() -> None:
    package = logging.getLogger("safepoint")
    assert errors.logger("run").parent is package and errors.logger("lease").parent is package
    assert logging.getLogger("safepoint").handlers == []  # the application decides


def test_a_run_logs_its_commits_at_debug_and_its_resume_at_info(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="safepoint")
    with pytest.raises(KeyboardInterrupt), safepoint.resume("sum", location=tmp_path,
                                                           policy=manual()) as run:
        for i in run.range(10):
            if i == 4:
                run.checkpoint()
                raise KeyboardInterrupt
    commits = records(caplog, "safepoint.run")
    assert "safepoint: run 'sum' committed at item 5 (attempt 1)" in commits
    assert all(r.levelno == logging.DEBUG for r in caplog.records if "committed" in r.getMessage())
    caplog.clear()
    with safepoint.resume("sum", location=tmp_path) as run:
        assert list(run.range(10)) == [5, 6, 7, 8, 9]
    assert records(caplog, "safepoint.run", logging.INFO) == [
        "safepoint: run 'sum' resumed at item 5 (attempt 2)"]


def test_a_checkpointer_logs_commits_restores_and_a_fallback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="safepoint")
    ckpt = Checkpointer("train", location=tmp_path)
    for step in (1, 2):
        ckpt.save(step, {"w": np.full(100_000, step, dtype=np.float32)})
    assert [m for m in records(caplog, "safepoint.checkpointer") if "committed" in m] == [
        f"safepoint: 'train' committed step {s} in {ckpt.store.url}" for s in (1, 2)]
    caplog.clear()
    assert ckpt.restore().step == 2
    assert records(caplog, "safepoint.checkpointer", logging.INFO) == [
        f"safepoint: 'train' restored step 2 from {ckpt.store.url}"]

    blob = next(p for p in (tmp_path / "train" / f"{2:012d}").iterdir() if p.suffix == ".bin")
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    caplog.clear()
    with pytest.warns(CorruptCheckpointWarning, match="skipping damaged checkpoint 'train' step 2"):
        assert ckpt.restore().step == 1
    found = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "safepoint.checkpointer"]
    assert [level for level, _ in found] == [logging.WARNING, logging.INFO]
    assert found[0][1].startswith("safepoint: skipping damaged checkpoint 'train' step 2: ")
    assert found[1][1] == (f"safepoint: 'train' restored step 1 from {ckpt.store.url} "
                           "(a fallback: the newer steps are damaged)")


def _crash_holding_the_lease(location: Path) -> None:
    """A writer that dies (os._exit) inside its run: its lease is never released."""
    code = textwrap.dedent("""
        import os, sys
        import safepoint
        with safepoint.resume("job", location=sys.argv[1], policy=safepoint.manual()) as run:
            for i in run.range(10):
                if i == 3:
                    run.checkpoint()
                    os._exit(9)
    """)
    env = {**os.environ, "PYTHONPATH": str(SRC.parent)}
    done = subprocess.run([sys.executable, "-c", code, str(location)], env=env, timeout=60)
    assert done.returncode == 9


def test_a_takeover_is_logged_info_from_a_dead_writer_and_warning_from_a_live_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="safepoint")
    _crash_holding_the_lease(tmp_path)
    with pytest.raises(safepoint.StaleAttempt), \
            safepoint.resume("job", location=tmp_path) as run:
        assert next(iter(run.range(10))) == 4
        taken = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "safepoint.lease"]
        assert len(taken) == 1 and taken[0][0] == logging.INFO
        assert re.fullmatch(r"safepoint: 'job': took over from .*pid \d+.* \(dead\); it is "
                            r"fenced from now on", taken[0][1]), taken
        assert "safepoint: run 'job' resumed at item 4 (attempt 2)" in records(caplog, "safepoint.run")
        caplog.clear()
        with safepoint.resume("job", location=tmp_path, takeover=True):
            taken = [(r.levelno, r.getMessage()) for r in caplog.records
                     if r.name == "safepoint.lease"]
            assert [level for level, _ in taken] == [logging.WARNING]
            assert "(running); it is fenced from now on" in taken[0][1]


def test_the_supervisor_logs_each_restart(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="safepoint")
    command = [sys.executable, "-c", "import os, sys; sys.exit(0 if os.environ['SAFEPOINT_ATTEMPT'] == '3' else 3)"]
    assert Supervisor(command, max_restarts=3, backoff=0, sleep=lambda s: None).run() == 0
    found = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "safepoint.supervisor"]
    assert [level for level, _ in found] == [logging.WARNING, logging.WARNING]
    assert "exited with status 3 (attempt 1); restarting in 0 s (attempt 2 of 4)" in found[0][1]
    assert "(attempt 2); restarting in 0 s (attempt 3 of 4)" in found[1][1]

    caplog.clear()
    lines: list[str] = []
    failing = [sys.executable, "-c", "raise SystemExit(5)"]
    assert Supervisor(failing, max_restarts=0, notify=lines.append).run() == 5
    assert lines == ["safepoint run: `" + " ".join(failing[:2]) + " 'raise SystemExit(5)'` "
                     "exited with status 5; gave up after 0 restarts (exit status 5)"]
    assert [(r.levelno, r.getMessage()) for r in caplog.records
            if r.name == "safepoint.supervisor"] == [(logging.ERROR, lines[0])]


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC.parent)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_a_warning_is_printed_once_without_logging_and_also_logged_with_it(tmp_path: Path) -> None:
    code = """
        import logging, sys, numpy as np
        from safepoint import Checkpointer
        if sys.argv[2] == "configured":
            logging.basicConfig(format="LOG %(name)s %(levelname)s %(message)s")
        ckpt = Checkpointer("c", location=sys.argv[1])
        if sys.argv[2] == "save":
            for step in (1, 2):
                ckpt.save(step, {"w": np.full(100_000, step, dtype=np.float32)})
        else:
            print("restored", ckpt.restore().step)
    """
    assert _python(code, str(tmp_path), "save").returncode == 0
    blob = next(p for p in (tmp_path / "c" / f"{2:012d}").iterdir() if p.suffix == ".bin")
    blob.write_bytes(b"\0" * blob.stat().st_size)

    plain = _python(code, str(tmp_path), "plain")
    assert plain.stdout == "restored 1\n"
    assert plain.stderr.count("skipping damaged checkpoint 'c' step 2") == 1, plain.stderr
    assert "CorruptCheckpointWarning" in plain.stderr and "LOG" not in plain.stderr

    configured = _python(code, str(tmp_path), "configured")
    assert configured.stdout == "restored 1\n"
    assert configured.stderr.count("skipping damaged checkpoint 'c' step 2") == 2, configured.stderr
    assert "LOG safepoint.checkpointer WARNING safepoint: skipping damaged" in configured.stderr
    assert "CorruptCheckpointWarning" in configured.stderr


def test_a_sigterm_note_goes_through_the_logger(tmp_path: Path) -> None:
    code = """
        import os, signal, sys, safepoint
        with safepoint.resume("job", location=sys.argv[1], policy=safepoint.manual()) as run:
            for i in run.range(10):
                if i == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
    """
    done = _python(code, str(tmp_path))
    assert done.returncode == 143
    assert done.stderr == ("safepoint: run 'job' was interrupted and checkpointed; its last "
                           "checkpoint is at item 3 of loop 0. Run it again to resume from "
                           "there, or `safepoint rm job` to start over\n"), done.stderr


_OUTPUT = re.compile(r"\bprint\(|sys\.(stderr|stdout)\.write|\bwarnings\.warn\(")
_ALLOWED = {
    "errors.py",  # warn_caller: the one warnings.warn
    "run/demo.py",  # `safepoint demo`: the CLI's own output
}


def test_no_module_outside_the_cli_prints() -> None:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC).as_posix()
        if relative.startswith("cli/") or relative in _ALLOWED:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _OUTPUT.search(line.split("#", 1)[0]):
                found.append(f"{relative}:{number}: {line.strip()}")
    assert found == []


def test_warn_caller_logs_only_where_logging_is_configured(caplog: pytest.LogCaptureFixture) -> None:
    log = errors.logger("test")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        errors.warn_caller("something to see", UserWarning, log=log)
    assert [str(w.message) for w in caught] == ["something to see"]
    assert caught[0].filename == __file__  # the user's line, not safepoint's
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("safepoint.test", logging.WARNING, "safepoint: something to see")]


def test_a_flow_and_a_task_log_where_they_resume(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="safepoint")
    flow, fail = safepoint.Flow("prep", location=tmp_path), [True]

    @flow.step
    def load(state, data):
        state["rows"] = 3

    @flow.step
    def fit(state, data):
        if fail[0]:
            raise RuntimeError("diverged")

    with pytest.raises(RuntimeError):
        flow.run()
    assert "safepoint: flow 'prep' recorded sub-step 'fit' (failed)" in records(caplog, "safepoint.flow")
    caplog.clear()
    fail[0] = False
    flow.run()
    assert records(caplog, "safepoint.flow", logging.INFO) == [
        "safepoint: flow 'prep' resumed (attempt 2)",
        "safepoint: flow 'prep' resumes at step 'fit' (1 of 2 completed before)"]

    @safepoint.task(keep_completed=True)
    def job(ctx: safepoint.TaskContext) -> int:
        return ctx.step("one", lambda: 1)

    assert safepoint.run_task(job, job_id="j", location=tmp_path) == 1
    caplog.clear()
    assert safepoint.run_task(job, job_id="j", location=tmp_path) == 1
    assert "safepoint: job 'j' completed before (attempt 1); its recorded result is returned and " \
           "nothing runs" in records(caplog, "safepoint.task", logging.INFO)
