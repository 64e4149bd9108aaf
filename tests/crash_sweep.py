"""The harness of the crash-point sweeps (``tests/*/test_*crash_points.py``).

A sweep runs one computation in child processes (from the tests' fork server:
child_processes.py). The computation marks the points where a
crash may land (*sites*, named like ``"mid 3"``) through a :class:`Probe`; a child given a
plan kills itself with SIGKILL when it reaches the planned site, so the test decides where
every crash lands, and the death skips all cleanup (no ``finally``, no ``atexit``, no
flush). A *reference* child runs the computation without a crash and, at every site, reads
back from the store what a resume would start from there (:func:`durable`).
:func:`crash_everywhere` then kills a fresh child at each of those sites (in a folder and a
store of its own), records what the kill left, and resumes it to the end; the test compares
each outcome with the reference's.

Children append what they do (calls of user code, the result) to files, one fsync'd line
at a time, so that a line written before a kill survives it. Each child runs with a fresh
:class:`FakeClock`, so that time policies commit at the same items every time.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import child_processes
from safepoint.checkpointer import Checkpointer
from safepoint.format.tree import decode_inline
from safepoint.policy import Policy, Tick
from safepoint.run.log import read_log
from safepoint.store import LocalStore, open_store
from safepoint.store.journal import Journal

KILLED = -signal.SIGKILL
"""The exit code of a child that died at its planned site."""


def append_line(path: Path, line: str) -> None:
    """Append ``line`` to ``path`` durably (it survives the SIGKILL that may follow)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


class FakeClock:
    """A clock that moves only when the computation says so: time policies become
    deterministic (every item "takes" a fixed number of seconds)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def every_third(tick: Tick) -> bool:
    """A user-written plain function policy: due once three boundaries have passed."""
    return tick.items >= 3


class EveryThird(Policy):
    """A user-written Policy subclass equivalent to ``every(items=3)``; its horizon lets the
    loop ask it only where it could say yes."""

    def __call__(self, tick: Tick) -> bool:
        return tick.items >= 3

    def horizon(self, since: int, position: int, total: int | None, fraction_at_last: float) -> int | None:
        return 3 - since

    @property
    def uses_clock(self) -> bool:
        return False

    @property
    def uses_fraction(self) -> bool:
        return False


def durable(store: Path, name: str) -> dict[str, Any] | None:
    """What a resume of ``name`` would start from, read from the store as a reader: the
    newest state record's loop frames (``[loop, position, finished]``), whether it is the
    completion record, the state tree it holds, and the keys of the step outcomes recorded
    as done. None when nothing is committed yet."""
    opened = open_store(store)
    replay = read_log(opened, name)
    steps = sorted(key for key, record in replay.steps().items() if record.status == "done")
    record = replay.state
    if record is None:
        return None if not steps else {"frames": None, "complete": False, "tree": None, "steps": steps}
    tree: Any = None
    if record.tree is not None:
        if "node" in record.tree:
            tree = decode_inline(record.tree["node"])
        else:
            tree = Checkpointer(name, location=opened).restore(record.tree["checkpoint"]).state
    return {"frames": [[f.loop, f.position, f.finished] for f in record.frames],
            "complete": record.complete, "tree": _plain(tree), "steps": steps}


def _plain(value: Any) -> Any:
    """``value`` with its arrays as lists (what a site records is JSON)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    tolist = getattr(value, "tolist", None)
    return {"array": tolist()} if callable(tolist) else value


class Probe:
    """A child's side of a sweep: it names the sites it passes, logs calls of user code,
    and dies at the planned site. In a reference child (``snapshot`` given) every site also
    records what is durable there."""

    def __init__(self, folder: Path, plan: str | None, attempt: int,
                 snapshot: Callable[[], Any] | None = None) -> None:
        self.folder, self.plan, self.attempt, self.snapshot = folder, plan, attempt, snapshot

    def site(self, name: str) -> None:
        if self.snapshot is not None:
            append_line(self.folder / "sites.jsonl", json.dumps([name, self.snapshot()]))
        if name == self.plan:
            os.kill(os.getpid(), signal.SIGKILL)

    def call(self, what: str) -> None:
        append_line(self.folder / "calls.txt", f"{self.attempt} {what}")

    def finish(self, result: Any) -> None:
        append_line(self.folder / "result.json", json.dumps(result, sort_keys=True))


STORE_CHANGES = (
    (LocalStore, ("write_blob", "commit", "publish", "create", "commit_if", "delete")),
    (Journal, ("append",)),
)
"""The methods by which safepoint changes a local store (a journal appends through its
own file descriptor)."""


def probe_store_changes(probe: Probe) -> None:
    """In a child: pass a site before and after every change the main thread makes to a
    local store (``"op 7 after commit sweep/000000000003.json"``), so that a sweep can also
    crash inside safepoint's commit protocols: between a checkpoint's data and its
    manifest, a checkpoint and the record that refers to it, a record and the deletions
    that follow it. The lease's heartbeat thread is left alone (its timing is the OS's)."""
    count = 0

    def hooked(method: Callable[..., Any], what: str) -> Callable[..., Any]:
        @functools.wraps(method)
        def change(self: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal count
            if threading.current_thread() is not threading.main_thread():
                return method(self, *args, **kwargs)
            count += 1
            key = args[0] if isinstance(self, LocalStore) else self.key
            name = f"op {count} {{}} {what} {re.sub(r'[0-9a-f]{12}-', '*-', key)}"  # no random part
            probe.site(name.format("before"))
            result = method(self, *args, **kwargs)
            probe.site(name.format("after"))
            return result

        return change

    for cls, names in STORE_CHANGES:
        for name in names:
            setattr(cls, name, hooked(getattr(cls, name), name))


Child = Callable[[Path, "str | None", int, bool], None]
"""``child(folder, plan, attempt, reference)``: one run of the computation (its store is
``folder / "store"``)."""


def start(child: Child, folder: Path, plan: str | None, attempt: int,
          reference: bool = False) -> Any:
    """Start a child running ``child(folder, plan, attempt, reference)``."""
    return child_processes.start(child, folder, plan, attempt, reference)


def fork(child: Child, folder: Path, plan: str | None, attempt: int, reference: bool = False,
         timeout: float = 60.0) -> int | None:
    """Run ``child`` in a child process; returns its exit code."""
    return run_all([(child, folder, plan, attempt, reference)], timeout=timeout)[0]


def run_all(jobs: list[tuple[Child, Path, str | None, int, bool]], *, parallel: int = 4,
            timeout: float = 60.0) -> list[int | None]:
    """Run each job in a child process of its own, ``parallel`` at a time; their exit codes.

    The children are independent (each has its own folder and store) and the parent has
    no part in them (it only starts children and waits), so running them side by side changes nothing
    but the time the sweep takes."""
    codes: list[int | None] = [None] * len(jobs)
    running: dict[Any, tuple[int, Any, float]] = {}
    pending = list(enumerate(jobs))
    while pending or running:
        while pending and len(running) < parallel:
            index, job = pending.pop(0)
            process = start(*job)
            running[process.sentinel] = (index, process, time.monotonic() + timeout)
        ready = wait(list(running), timeout=1.0)
        for sentinel in ready:
            index, process, _ = running.pop(sentinel)
            process.join()
            codes[index] = process.exitcode
        for index, process, deadline in list(running.values()):
            if time.monotonic() > deadline:
                process.kill()
                process.join()
                raise AssertionError(f"the child planned to die at {jobs[index][2]!r} hung")
    return codes


@dataclass
class Outcome:
    """What a sequence of children left in a folder."""

    folder: Path
    sites: list[tuple[str, Any]] = field(default_factory=list)
    """The reference child's sites, in order, each with what was durable there."""
    result: Any = None
    """The result of the last run that finished."""
    calls: dict[int, list[str]] = field(default_factory=dict)
    """The calls of user code, by attempt."""


def outcome(folder: Path) -> Outcome:
    found = Outcome(folder)
    found.sites = [tuple(json.loads(line)) for line in read_lines(folder / "sites.jsonl")]  # type: ignore[misc]
    results = read_lines(folder / "result.json")
    found.result = json.loads(results[-1]) if results else None
    for line in read_lines(folder / "calls.txt"):
        attempt, _, what = line.partition(" ")
        found.calls.setdefault(int(attempt), []).append(what)
    return found


def play(child: Child, folder: Path, crashes: list[str], *, reference: bool = False) -> Outcome:
    """Run ``child`` once per planned crash (each must die there), then once to the end
    (recording its sites when ``reference``); returns what they left."""
    folder.mkdir(parents=True, exist_ok=True)
    for attempt, plan in enumerate(crashes, start=1):
        code = fork(child, folder, plan, attempt)
        assert code == KILLED, f"attempt {attempt} planned to die at {plan!r} exited with {code}"
    attempt = len(crashes) + 1
    code = fork(child, folder, None, attempt, reference)
    assert code == 0, f"attempt {attempt} (after crashes at {crashes}) failed with exit code {code}"
    return outcome(folder)


@dataclass
class Crash:
    """One crash point of a sweep, and what followed."""

    site: str
    expected: Any
    """What the reference had made durable at the site."""
    folder: Path
    killed: Any = None
    """What was durable right after the kill (``snapshot(folder)``)."""
    outcome: Outcome | None = None
    """What the crashed attempts and the resume left."""


def crash_everywhere(child: Child, root: Path, sites: list[tuple[str, Any]],
                     snapshot: Callable[[Path], Any], *, before: tuple[str, ...] = (),
                     setup: Callable[[Path], None] | None = None) -> list[Crash]:
    """For every ``(site, expected)``: in a folder of its own, crash ``child`` at each site
    of ``before`` in turn, then at ``site``; take ``snapshot(folder)``; resume to the end."""
    crashes = []
    for site, expected in sites:
        folder = root / f"crash-{len(crashes):03d}-{site.replace(' ', '-')}"
        folder.mkdir(parents=True)
        if setup is not None:
            setup(folder)
        crashes.append(Crash(site, expected, folder))
    for attempt, _ in enumerate(before, start=1):
        stage = run_all([(child, c.folder, before[attempt - 1], attempt, False) for c in crashes])
        assert stage == [KILLED] * len(crashes), f"attempt {attempt} did not die at {before}"
    attempt = len(before) + 1
    codes = run_all([(child, c.folder, c.site, attempt, False) for c in crashes])
    for crash, code in zip(crashes, codes, strict=True):
        assert code == KILLED, f"the child planned to die at {crash.site!r} exited with {code}"
        crash.killed = snapshot(crash.folder)
    codes = run_all([(child, c.folder, None, attempt + 1, False) for c in crashes])
    for crash, code in zip(crashes, codes, strict=True):
        assert code == 0, f"the resume after a crash at {crash.site!r} exited with {code}"
        crash.outcome = outcome(crash.folder)
    return crashes


def distinct(values: list[Any]) -> list[Any]:
    """``values`` without consecutive repeats."""
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


def sweep(crashes: list[Crash], check: Callable[[Crash], None]) -> None:
    """Run ``check(crash)`` for every crash point; fail once, listing every point that
    failed (a sweep reports its whole pattern, not only the first failure)."""
    failures = []
    for crash in crashes:
        try:
            check(crash)
        except AssertionError as exc:
            failures.append(f"crash at {crash.site!r}: {exc}")
    assert not failures, f"{len(failures)} of {len(crashes)} crash points failed:\n" + "\n".join(failures)
