"""A hung holder (SIGSTOP) is taken over, for every kind of writer: with ``takeover=True``
while its lease still looks alive, or, for a flow (which has no ``takeover=``), once its
TTL has passed. Woken (SIGCONT), the old holder commits, completes and deletes nothing:
it stops with ``StaleAttempt``, and the store is byte for byte what the new holder left."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from lease_support import (
    KINDS,
    STALE_EXIT,
    Spec,
    assert_consistent,
    assert_result_exact,
    event_of,
    events,
    finish,
    store_files,
    ticket,
    wait_until,
)

from safepoint.lease import holder
from safepoint.store import open_store

N, FLOW_TTL = 5, 1.5


@pytest.mark.parametrize("kind", KINDS)
def test_a_paused_holder_taken_over_is_fenced_when_it_wakes(
        tmp_path: Path, location: str, writers: Callable[[Spec], Any], kind: str) -> None:
    ttl = FLOW_TTL if kind == "flow" else 30.0
    spec = Spec(kind, location, "job", N, str(tmp_path / "events"), pause_at=2,
                go=str(tmp_path / "go"), output=str(tmp_path / "out.txt"), ttl=ttl)
    old = writers(spec)
    wait_until(lambda: event_of(spec.events, old.pid, "paused"), "the holder to pause")
    store = open_store(location)
    os.kill(old.pid, signal.SIGSTOP)
    try:
        Path(spec.go).touch()  # it would go on at once, if it ran
        hung = holder(store, "job")
        assert hung is not None and hung.generation == 1
        if kind == "flow":  # no takeover=: wait until its heartbeat is older than its TTL
            new = writers(Spec(kind, location, "job", N, spec.events, output=spec.output,
                               retry=True))
        else:
            assert hung.state == "running"  # lock held, pid alive, heartbeat fresh
            new = writers(Spec(kind, location, "job", N, spec.events, output=spec.output,
                               takeover=True))
        assert finish(new) == 0
        if kind == "flow":
            assert hung.heartbeat is not None
            assert ticket(location, "job", 2)["holder"]["started"] > hung.heartbeat + ttl
        start = event_of(spec.events, new.pid, "start")
        assert start is not None and start.number == 2
        left = store_files(location)
        woken_at = len(events(spec.events))
    finally:
        os.kill(old.pid, signal.SIGCONT)

    assert finish(old) == STALE_EXIT
    after = events(spec.events)[woken_at:]
    assert {e.pid for e in after} == {old.pid}
    assert [e.event for e in after if e.event != "exec"] == ["stale"]  # no commit, no done
    assert len([e for e in after if e.event == "exec"]) <= 1  # the unit it was about to do
    attempt, current, message = after[-1].value.split(" ", 2)
    assert (int(attempt), int(current)) == (1, 2)
    assert "may no longer commit" in json.loads(message)
    assert store_files(location) == left  # it changed nothing the new holder left
    assert_result_exact(kind, location, "job", N, spec.output)
    if kind == "run":  # its output too: items 0 and 1 by the old writer, the rest by the new
        written = Path(spec.output).read_text().splitlines()
        assert written == [f"{i} {1 if i < 2 else 2}" for i in range(N)]
    assert_consistent(location)
