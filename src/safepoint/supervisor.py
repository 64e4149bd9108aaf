"""Run a command and restart it when it dies, so that a job resumes from its checkpoints.

The supervisor is what ``safepoint run`` uses. Each attempt sees ``SAFEPOINT_ATTEMPT``
(1, 2, ...) in its environment. A crash (a non-zero exit, or death by a signal such as the
out-of-memory killer's SIGKILL) is followed by a restart after a backoff that doubles up to
a cap, until ``max_restarts`` restarts have been made. SIGINT and SIGTERM sent to the
supervisor are passed on to the command, and then nothing is restarted: the user (or the
scheduler) asked the job to stop. On Linux, a supervisor that dies (even by SIGKILL) takes
its command with it: the command gets SIGTERM (a parent-death signal), so that no orphan
goes on writing while a new supervisor starts a second writer.

Each crash and restart is logged on the ``safepoint.supervisor`` logger (WARNING; a stop
asked for by a signal at INFO); ``notify`` is how a front end (the CLI) shows them too.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType

from safepoint.errors import logger

log = logger("supervisor")

ATTEMPT_ENV = "SAFEPOINT_ATTEMPT"
"""The environment variable that tells a command which attempt it is (1 for the first)."""

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_status(returncode: int) -> int:
    """A shell-style exit status: the exit code, or 128 + the signal number of a signal death."""
    return 128 - returncode if returncode < 0 else returncode


def describe_exit(returncode: int) -> str:
    """``-9`` -> ``"was killed by SIGKILL"``, ``3`` -> ``"exited with status 3"``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when this process dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _terminal_delivers_to_child() -> bool:
    """Whether we run in the foreground of a terminal, whose Ctrl+C (SIGINT) reaches the
    whole foreground process group: the child then got the signal already."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


@dataclass
class Supervisor:
    """Runs ``command`` until it succeeds, is stopped by a signal we forwarded, or has been
    restarted ``max_restarts`` times. :meth:`run` returns its shell-style exit status.

    ``sleep`` is injectable (tests pass a recording fake instead of waiting); the default
    sleep ends early when SIGINT or SIGTERM arrives. Crashes and restarts are logged;
    ``notify``, when given, gets each of those lines too (the CLI prints them), and they
    are then logged only where the application configured logging, so never shown twice.
    """

    command: Sequence[str]
    max_restarts: int = 3
    backoff: float = 1.0
    max_backoff: float = 60.0
    env: Mapping[str, str] | None = None
    notify: Callable[[str], None] | None = None
    sleep: Callable[[float], None] | None = None
    stop_signal: int | None = field(default=None, init=False)
    _child: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _pending: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.command:
            raise ValueError("give a command to run, e.g. `safepoint run -- python train.py`")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, not {self.max_restarts}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoff and max_backoff must be >= 0 seconds")

    def delay(self, restart: int) -> float:
        """Seconds to wait before restart number ``restart`` (1, 2, ...)."""
        return min(self.backoff * 2 ** (restart - 1), self.max_backoff)

    def run(self) -> int:
        """Run the command (and its restarts); the last attempt's shell-style exit status.

        Raises ``FileNotFoundError`` / ``PermissionError`` if the command cannot be started.
        """
        previous = {sig: signal.signal(sig, self._on_signal) for sig in FORWARDED_SIGNALS}
        try:
            return self._attempts()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _attempts(self) -> int:
        label = shlex.join(self.command)
        attempt = 1
        while True:
            returncode = self._run_once(attempt)
            status = exit_status(returncode)
            if returncode == 0 or self.stop_signal is not None:
                return status
            if attempt > self.max_restarts:
                self._report(f"safepoint run: `{label}` {describe_exit(returncode)}; gave up after "
                             f"{self.max_restarts} restart{'' if self.max_restarts == 1 else 's'} "
                             f"(exit status {status})", logging.ERROR)
                return status
            wait = self.delay(attempt)
            self._report(f"safepoint run: `{label}` {describe_exit(returncode)} (attempt {attempt}); "
                         f"restarting in {wait:g} s (attempt {attempt + 1} of "
                         f"{self.max_restarts + 1})")
            (self.sleep or self._sleep_unless_stopped)(wait)
            if self.stop_signal is not None:  # stopped while waiting: do not start again
                self._report(f"safepoint run: stopped by {signal.Signals(self.stop_signal).name}; "
                             "not restarting", logging.INFO)
                return status
            attempt += 1

    def _report(self, line: str, level: int = logging.WARNING) -> None:
        if self.notify is not None:
            self.notify(line)
        if self.notify is None or log.hasHandlers():
            log.log(level, "%s", line)

    def _run_once(self, attempt: int) -> int:
        env = dict(os.environ if self.env is None else self.env)
        env[ATTEMPT_ENV] = str(attempt)
        self._child = child = subprocess.Popen(list(self.command), env=env,
                                               preexec_fn=_die_with_parent())
        try:
            pending, self._pending = self._pending, None
            if pending is not None:  # it came before the child was known: pass it on
                self._forward(child, pending)
            return child.wait()
        finally:
            self._child = None

    def _sleep_unless_stopped(self, seconds: float) -> None:
        # Short naps rather than one long sleep: a signal ends the wait within 0.1 s. (An
        # Event set from the handler could deadlock: handlers run between bytecodes, maybe
        # while this thread holds the Event's lock.)
        deadline = time.monotonic() + seconds
        while self.stop_signal is None and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_signal = signum
        if self._child is None:
            self._pending = signum
        else:
            self._forward(self._child, signum)

    def _forward(self, child: subprocess.Popen[bytes], signum: int) -> None:
        if child.poll() is not None:
            return
        if signum == signal.SIGINT and _terminal_delivers_to_child():
            return  # Ctrl+C: the terminal sent it to the child too; twice could mean "force"
        child.send_signal(signum)
