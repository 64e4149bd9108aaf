"""Two writers of one name started together, many times, for every kind of writer, with
SIGKILLs where the test decides: the holder after it reported a commit (and, in some
rounds, its successor too, with a third writer to finish). The loser of the race waits
for the lease and takes over at once when the holder dies.

What every round must leave: each writer resumed from the newest commit acknowledged
before it (or the one after it, committed by a writer killed before it could report it),
so nothing acknowledged was lost; no committed unit ran again; the result is exact; and
the store is consistent (a writer killed mid-save may leave files nothing refers to:
leftovers, never damage).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from lease_support import (
    KINDS,
    Spec,
    assert_consistent,
    assert_result_exact,
    events,
    expected_result,
    finish,
    iter_writers,
    wait_until,
)

N, ROUNDS = 6, 12


def first_commit(path: Path, pids: set[int], at_least: int) -> Any:
    """The first reported commit of at least ``at_least`` units by one of ``pids``, or the
    event telling that the work is done."""
    for event in events(path):
        if event.pid in pids and ((event.event == "commit" and event.number >= at_least)
                                  or event.event == "done"):
            return event
    return None


def check_history(kind: str, path: Path) -> None:
    """Every writer resumed where the acknowledged commits before it left the name."""
    log = events(path)
    assert not [e for e in log if e.event in ("error", "refused", "stale")], log
    acknowledged = 0
    for pid, start, mine in iter_writers(log):
        assert start in (acknowledged, acknowledged + 1), (pid, start, acknowledged, log)
        commits = [e.number for e in mine if e.event == "commit"]
        assert commits == list(range(start + 1, start + 1 + len(commits))), log
        executed = [e.number for e in mine if e.event == "exec"]
        first = start + 1 if kind == "checkpointer" else start  # units are steps 1.. or items 0..
        assert executed == list(range(first, first + len(executed))), log  # nothing committed ran again
        acknowledged = max([acknowledged, *commits])
    done = [json.loads(e.value) for e in log if e.event == "done"]
    assert done, log
    expected = {"step": N} if kind == "checkpointer" else expected_result(kind, N)
    assert all(value == expected for value in done), log


def one_round(tmp_path: Path, writers: Callable[[Spec], Any], kind: str, number: int) -> None:
    rng = random.Random(f"{kind}-{number}")
    location = str(tmp_path / f"store{number}")
    path = tmp_path / f"events{number}"
    gate = tmp_path / f"gate{number}"
    base = dict(kind=kind, location=location, name="job", n=N, events=str(path),
                output=str(tmp_path / f"out{number}.txt"), delay=0.005, wait=60.0, retry=True)
    pair = [writers(Spec(**base, gate=str(gate))) for _ in range(2)]  # type: ignore[arg-type]
    wait_until(lambda: len([e for e in events(path) if e.event == "ready"]) == 2, "both to be ready")
    gate.touch()  # go: both race for the lease
    live, killed = list(pair), []
    for kill in range(2 if rng.random() < 0.5 else 1):
        at = rng.randint(1, N - 1)
        reported = wait_until(lambda: first_commit(path, {p.pid for p in live}, at),  # noqa: B023
                              "a reported commit")
        if reported.event == "done":
            break
        time.sleep(rng.uniform(0, 0.01))  # anywhere in its next unit
        victim = next(p for p in live if p.pid == reported.pid)
        with contextlib.suppress(ProcessLookupError):  # it may have just finished
            os.kill(victim.pid, signal.SIGKILL)
        live.remove(victim)
        killed.append(victim)
        if kill == 1 or not live:
            live.append(writers(Spec(**base)))  # type: ignore[arg-type]
    for process in killed:
        assert finish(process) in (0, -signal.SIGKILL)  # it may have finished just before
    for process in live:
        assert finish(process) == 0
    check_history(kind, path)
    assert_result_exact(kind, location, "job", N, base["output"])  # type: ignore[arg-type]
    assert_consistent(location, crash_leftovers=True)


@pytest.mark.parametrize("kind", KINDS)
def test_two_writers_of_one_name_with_kills(tmp_path: Path, writers: Callable[[Spec], Any],
                                             kind: str) -> None:
    for number in range(ROUNDS):
        one_round(tmp_path, writers, kind, number)
