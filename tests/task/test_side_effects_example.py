"""The side-effect example of docs/concurrency.md charges each order exactly once, when its
first attempt is killed (SIGKILL) right after a charge and before that step is recorded,
and when a paused attempt is taken over and later wakes up in the middle of a charge."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "concurrency.md"
SRC = str(Path(__file__).resolve().parents[2] / "src")

# Runs the example as __main__ with a profile hook on `charge` (in the main thread, where
# the task runs): it logs every call, and on the call or return for order A-2 it does what
# HOOK says to the process itself: SIGKILL after the charge, or SIGSTOP before it.
DRIVER = """
import os, runpy, signal, sys

HOOK = os.environ.get("HOOK", "")

def hook(frame, event, arg):
    if frame.f_code.co_name != "charge" or event not in ("call", "return"):
        return
    order = frame.f_locals.get("order")
    if event == "call":
        with open("calls.txt", "a") as f:
            f.write(f"{os.getpid()} {order}\\n")
    if order == "A-2" and (event, HOOK) in (("return", "kill"), ("call", "stop")):
        os.kill(os.getpid(), signal.SIGKILL if HOOK == "kill" else signal.SIGSTOP)

sys.setprofile(hook)
runpy.run_path(sys.argv[1], run_name="__main__")
"""


def example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    (code,) = [b for b in blocks if "def bill(" in b]
    return code


def start(tmp_path: Path, hook: str = "", ttl: str = "30") -> subprocess.Popen[str]:
    env = {**os.environ, "SAFEPOINT_DIR": str(tmp_path / "store"), "HOOK": hook,
           "SAFEPOINT_LEASE_TTL": ttl,
           "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "driver.py", "billing.py"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def setup(tmp_path: Path) -> None:
    (tmp_path / "billing.py").write_text(example())
    (tmp_path / "driver.py").write_text(DRIVER)


def charges(tmp_path: Path) -> list[tuple[str, str, int]]:
    with sqlite3.connect(tmp_path / "payments.db") as db:
        return sorted(db.execute("SELECT key, order_id, cents FROM charges").fetchall())


def calls(tmp_path: Path) -> list[str]:
    return [line.split()[1] for line in (tmp_path / "calls.txt").read_text().splitlines()]


EXPECTED = [("billing-june/charge/A-1", "A-1", 1200), ("billing-june/charge/A-2", "A-2", 550),
            ("billing-june/charge/A-3", "A-3", 990)]


def test_killed_after_the_charge_before_its_record_charges_once(tmp_path: Path) -> None:
    from safepoint.run.log import read_log
    from safepoint.store import open_store

    setup(tmp_path)
    first = start(tmp_path, hook="kill")
    _, err = first.communicate(timeout=120)
    assert first.returncode == -signal.SIGKILL, err
    assert charges(tmp_path) == EXPECTED[:2]  # A-2 was charged...
    recorded = [r.name for r in read_log(open_store(tmp_path / "store"), "billing-june").records
                if r.kind == "step"]
    assert recorded == ["charge"]  # ...but only A-1's step was recorded

    second = start(tmp_path)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert out.strip() == "charged 3 orders"
    assert calls(tmp_path) == ["A-1", "A-2", "A-2", "A-3"]  # A-2 ran twice...
    assert charges(tmp_path) == EXPECTED  # ...and was charged once


def _wait_stopped(process: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status = os.waitpid(process.pid, os.WNOHANG | os.WUNTRACED)
        if pid and os.WIFSTOPPED(status):
            return
        assert not pid, f"the first attempt ended instead of stopping (status {status})"
        time.sleep(0.02)
    raise AssertionError("the first attempt did not stop")


def test_a_paused_attempt_taken_over_charges_once_and_stops(tmp_path: Path) -> None:
    setup(tmp_path)
    first = start(tmp_path, hook="stop", ttl="1")  # SIGSTOP inside charge("A-2"), before it
    try:
        _wait_stopped(first)
        second = start(tmp_path, ttl="1")  # waits until the paused holder's lease expires
        out, err = second.communicate(timeout=120)
        assert second.returncode == 0, err
        assert out.strip() == "charged 3 orders"
        assert "took over" in err
        assert charges(tmp_path) == EXPECTED
    finally:
        os.kill(first.pid, signal.SIGCONT)  # the stale attempt wakes up inside charge("A-2")
    _, err = first.communicate(timeout=120)
    assert first.returncode == 1 and "StaleAttempt" in err, err
    assert calls(tmp_path) == ["A-1", "A-2", "A-2", "A-3"]
    assert charges(tmp_path) == EXPECTED  # its charge was a no-op: the same key
