"""``safepoint watch``: one frame (--once) at 80 columns and as JSON, rates and ETAs, and the
live view in a real terminal (tmux) while a real job writes to the store."""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_support import NARROW, Invoke, fits, one_line_error, parse_json

import safepoint
from safepoint.cli.catalog import NameSummary
from safepoint.cli.watch import Tracker, eta_text, rate_text

# A run of ITEMS items that commits after each, pausing PAUSE seconds per item.
JOB = textwrap.dedent("""
    import sys, time
    from safepoint.policy import every
    from safepoint.run import resume

    store, items, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    with resume("crunch", location=store, policy=every(items=1)) as run:
        run.state.setdefault("total", 0)
        for i in run.range(items):
            run.state["total"] += i
            time.sleep(pause)
""")
SRC = str(Path(safepoint.__file__).resolve().parents[1])


def _environment() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": SRC if not path else f"{SRC}{os.pathsep}{path}"}


@pytest.fixture
def job(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A real job in another process, writing to ``tmp_path/store`` (killed afterwards)."""
    store = tmp_path / "store"
    script = tmp_path / "job.py"
    script.write_text(JOB)
    process = subprocess.Popen([sys.executable, str(script), str(store), "2000", "0.05"],
                               env={**_environment(), "SAFEPOINT_LEASE_TTL": "2"})
    try:
        yield process, store
    finally:
        process.kill()
        process.wait()


def _wait_for_store(store: Path, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(store.glob("crunch/run-*")):
        assert process.poll() is None, "the job died"
        assert time.monotonic() < deadline, "the job wrote nothing"
        time.sleep(0.05)


def test_watch_once_fits_80_columns_and_says_who_writes(invoke: Invoke, store_dir: Path) -> None:
    result = invoke("watch", store_dir, "--once", env=NARROW)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert fits(out), out
    assert " ".join(out.split()).startswith(f"safepoint watch {store_dir}")  # may wrap
    assert "3 names: 1 idle" in out
    lines: dict[str, str] = {}
    for line in out.splitlines():  # the first row of a name: the progress table's
        lines.setdefault(line.split()[0] if line.strip() else "", line)
    assert "step 30" in lines["train"] and "50%" in lines["prep"] and "idle" in lines["prep"]
    assert "ValueError: bad row 2" in out and f"pid {os.getpid()} on" in out
    assert "Ctrl+C" not in out  # --once: one frame, nothing to quit


def test_watch_once_json(invoke: Invoke, store_dir: Path) -> None:
    data = parse_json(invoke("watch", "-l", store_dir, "--once", "--json"))
    assert data["location"] == str(store_dir) and data["time"] > 0
    by_name = {e["name"]: e for e in data["names"]}
    assert list(by_name) == ["prep", "solo", "train"]
    prep = by_name["prep"]
    assert (prep["status"], prep["progress"], prep["position"], prep["total"]) == (
        "idle", 0.5, 1, 2)
    assert prep["error"] == "ValueError: bad row 2" and prep["attempt"] == 2
    assert (prep["rate"], prep["eta"], prep["rate_unit"]) == (None, None, "items")
    assert by_name["train"]["latest_step"] == 30 and by_name["train"]["rate_unit"] == "steps"
    assert 0 <= by_name["train"]["age"] < 600


def test_watch_a_location_that_does_not_exist(invoke: Invoke, tmp_path: Path) -> None:
    one_line_error(invoke("watch", tmp_path / "typo", "--once"), "does not exist", status=2)


def _summary(position: int, updated: float, progress: float | None) -> NameSummary:
    return NameSummary(name="r", kind="run", steps=0, latest_step=None, progress=progress,
                       attempt=1, complete=False, updated=updated, nbytes=0, damaged=0,
                       status="running", position=position, total=1000)


def test_rate_and_eta_come_from_what_changed() -> None:
    tracker = Tracker()
    assert tracker.speed(_summary(100, 1000.0, 0.1), now=1000.0).rate is None  # one sample
    speed = tracker.speed(_summary(300, 1010.0, 0.3), now=1012.0)
    assert speed.rate == pytest.approx(20.0)  # 200 items in 10 s
    assert speed.eta == pytest.approx(0.7 / 0.02 - 2)  # from the last commit, 2 s ago
    assert tracker.speed(_summary(50, 1020.0, 0.05), now=1020.0).rate is None  # went back
    assert (rate_text(speed), eta_text(speed.eta)) == ("20/s", "33 s")


@pytest.mark.parametrize(("rate", "text"), [
    (None, "-"), (0.5, "30/min"), (2.5, "2.5/s"), (1500.0, "1.5k/s"), (50_000.0, "50k/s"),
    (1 / 7200, "0.5/h")])
def test_rate_text(rate: float | None, text: str) -> None:
    from safepoint.cli.watch import Speed
    assert rate_text(Speed(rate=rate)) == text


# --------------------------------------------------------------- a real terminal


class Terminal:
    """A tmux session of 80x24 on a private server, read with ``capture-pane``."""

    def __init__(self, tmp_path: Path, command: list[str]) -> None:
        conf = tmp_path / "tmux.conf"
        conf.write_text("set -g remain-on-exit on\n")  # a crash stays on screen to read
        self.folder = tempfile.mkdtemp(prefix="sp-tmux-")  # short: a socket path is limited
        self.tmux = ["tmux", "-S", os.path.join(self.folder, "socket"), "-f", str(conf)]
        line = shlex.join(["env", f"PYTHONPATH={_environment()['PYTHONPATH']}", *command])
        try:
            subprocess.run([*self.tmux, "new-session", "-d", "-s", "watch", "-x", "80", "-y",
                            "24", line], check=True, timeout=30)
        except BaseException:
            self.close()
            raise

    def screen(self) -> str:
        return subprocess.run([*self.tmux, "capture-pane", "-p", "-t", "watch"], check=True,
                              capture_output=True, text=True, timeout=30).stdout

    def keys(self, *keys: str) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", "watch", *keys], check=True, timeout=30)

    def dead(self) -> bool:
        """Whether the command in the pane has exited."""
        shown = subprocess.run([*self.tmux, "display-message", "-p", "-t", "watch",
                                "#{pane_dead}"], capture_output=True, text=True, timeout=30)
        return shown.stdout.strip() == "1"

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True, timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)


def _progress(screen: str, name: str) -> int | None:
    """The percentage a person reads on the row of ``name`` when it is running, else None."""
    for line in screen.splitlines():
        cells = line.split()
        if cells[:1] == [name] and "running" in cells:
            found = re.search(r"(\d+)%", line)
            return int(found.group(1)) if found else None
    return None


def _poll(terminal: Terminal, ready: object, what: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        screen = terminal.screen()
        if ready(screen):  # type: ignore[operator]
            return screen
        if time.monotonic() > deadline:
            pytest.fail(f"{what} never appeared; the screen:\n{screen}")
        time.sleep(0.2)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_watch_in_a_real_terminal_follows_a_running_job(
        tmp_path: Path, job: tuple[subprocess.Popen[bytes], Path]) -> None:
    process, store = job
    _wait_for_store(store, process)
    terminal = Terminal(tmp_path, [sys.executable, "-m", "safepoint", "watch", str(store),
                                   "--interval", "0.3"])
    try:
        first = _poll(terminal, lambda s: _progress(s, "crunch") is not None,
                      "the running job with its progress")
        before = _progress(first, "crunch")
        assert "safepoint watch" in first and "every 0.3 s (Ctrl+C quits)" in first
        assert re.search(r"name\s+kind\s+status\s+progress\s+rate\s+eta\s+saved", first), first
        assert f"pid {process.pid} on" in first  # who writes it
        later = _poll(terminal, lambda s: (_progress(s, "crunch") or 0) > (before or 0),
                      "a later progress")
        row = next(line for line in later.splitlines() if line.startswith("crunch"))
        assert re.search(r"\d+(\.\d)?/s", row), row  # two refreshes apart: a rate
        assert all(len(line) <= 80 for line in later.splitlines())

        process.send_signal(signal.SIGSTOP)  # hung: its lease (TTL 2 s) stops being renewed
        _poll(terminal, lambda s: any(line.split()[:1] == ["crunch"] and "stale" in line
                                      for line in s.splitlines()), "the job turning stale")
        terminal.keys("C-c")  # Ctrl+C: watch ends, its last frame stays on the screen
        deadline = time.monotonic() + 30
        while not terminal.dead():
            assert time.monotonic() < deadline, terminal.screen()
            time.sleep(0.1)
        last = terminal.screen()
        assert "Traceback" not in last and "KeyboardInterrupt" not in last, last
        assert any(line.startswith("crunch") and "stale" in line for line in last.splitlines())
    finally:
        process.send_signal(signal.SIGCONT)
        terminal.close()


def test_a_failed_refresh_keeps_the_last_frame_and_says_so(store_dir: Path) -> None:
    from rich.console import Console

    from safepoint.cli.catalog import summarize_store
    from safepoint.cli.watch import Speed, frame
    from safepoint.store import LocalStore

    store = LocalStore(store_dir)
    summaries = summarize_store(store)
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(frame(store, summaries, {s.name: Speed() for s in summaries}, time.time(),
                        80, 2.0, problem="cannot reach s3://b/x: EndpointConnectionError"))
    text = console.export_text()
    assert "cannot refresh: cannot reach s3://b/x: EndpointConnectionError" in text
    assert "train" in text and fits(text)
