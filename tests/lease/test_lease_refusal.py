"""One writer per name, for every kind of writer, in real processes on one host: a second
writer is refused at once, naming the holder; once the holder is SIGKILLed, a new writer
proceeds at once (the holder's OS lock tells that it died), resuming from its last commit."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from lease_support import (
    KINDS,
    REFUSED_EXIT,
    Spec,
    assert_consistent,
    assert_result_exact,
    event_of,
    events,
    finish,
    wait_until,
)

from safepoint.lease import holder, ticket_key
from safepoint.store import open_store

N = 4


def paused_holder(tmp_path: Path, kind: str, location: str, writers: Callable[[Spec], Any],
                  **options: Any) -> tuple[Spec, Any]:
    """A writer of ``kind`` that committed 2 of its N units and waits (holding the lease)."""
    spec = Spec(kind, location, "job", N, str(tmp_path / "events"), pause_at=2,
                go=str(tmp_path / "go"), output=str(tmp_path / "out.txt"), **options)
    process = writers(spec)
    wait_until(lambda: event_of(spec.events, process.pid, "paused"), "the holder to pause")
    return spec, process


@pytest.mark.parametrize("kind", KINDS)
def test_a_second_writer_is_refused_naming_the_holder(
        tmp_path: Path, location: str, writers: Callable[[Spec], Any], kind: str) -> None:
    before = time.time()
    spec, first = paused_holder(tmp_path, kind, location, writers)
    second = writers(Spec(kind, location, "job", N, str(tmp_path / "second.events"),
                          output=spec.output))
    assert finish(second) == REFUSED_EXIT  # wait=0: refused at once
    [refused] = events(tmp_path / "second.events")  # nothing started, executed or committed
    assert refused.event == "refused"
    message = json.loads(refused.value)
    assert f"{kind} pid {first.pid} on {socket.gethostname()}" in message
    assert "(last heartbeat just now)" in message or "s ago)" in message.split("last heartbeat")[1]
    assert "takeover=True" in message
    current = holder(open_store(location), "job")
    assert current is not None and current.state == "running" and current.info["holder"]["pid"] == first.pid
    assert current.heartbeat is not None and before <= current.heartbeat <= time.time()

    Path(spec.go).touch()  # the holder goes on, undisturbed
    assert finish(first) == 0
    assert [e.event for e in events(spec.events)].count("start") == 1
    assert_result_exact(kind, location, "job", N, spec.output)
    assert_consistent(location)


@pytest.mark.parametrize("kind", KINDS)
def test_a_killed_holder_is_replaced_at_once(
        tmp_path: Path, location: str, writers: Callable[[Spec], Any], kind: str) -> None:
    spec, first = paused_holder(tmp_path, kind, location, writers)  # a 30 s TTL
    store = open_store(location)
    os.kill(first.pid, signal.SIGKILL)
    assert finish(first) == -signal.SIGKILL
    dead = holder(store, "job")
    assert dead is not None and dead.state == "dead"  # its OS lock is free: known at once
    assert time.time() - (dead.heartbeat or 0) < spec.ttl  # though its heartbeat is fresh
    assert store.lock_free(ticket_key("job", dead.generation)) is True

    second = writers(Spec(kind, location, "job", N, spec.events, output=spec.output))  # wait=0
    assert finish(second) == 0  # not refused: it took over at once
    start = event_of(spec.events, second.pid, "start")
    assert start is not None and start.number == 2  # from the killed holder's last commit
    executed = [e.number for e in events(spec.events) if e.pid == second.pid and e.event == "exec"]
    assert executed == list(range(3, N + 1) if kind == "checkpointer" else range(2, N))
    assert_result_exact(kind, location, "job", N, spec.output)
    assert_consistent(location)
