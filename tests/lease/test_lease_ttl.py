"""Writers on other hosts: no OS lock or pid can tell that a holder died, only its
heartbeat. A new writer is refused while the dead holder's heartbeat is fresh, and
proceeds once the holder's TTL has passed (the holder claims another host name, with OS
locks off, as a writer on another machine would look)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from lease_support import (
    KINDS,
    Spec,
    assert_consistent,
    assert_result_exact,
    attempt_here,
    event_of,
    events,
    finish,
    ticket,
    wait_until,
)

from safepoint.errors import LeaseHeld
from safepoint.lease import holder, ticket_key
from safepoint.store import open_store

N, TTL = 4, 2.0


def holder_paused(tmp_path: Path, kind: str, location: str, writers: Callable[[Spec], Any],
                  **options: Any) -> tuple[Spec, Any]:
    spec = Spec(kind, location, "job", N, str(tmp_path / "events"), pause_at=2,
                go=str(tmp_path / "go"), output=str(tmp_path / "out.txt"), **options)
    process = writers(spec)
    wait_until(lambda: event_of(spec.events, process.pid, "paused"), "the holder to pause")
    return spec, process


@pytest.mark.parametrize("kind", KINDS)
def test_a_dead_holder_on_another_host_is_waited_out(
        tmp_path: Path, location: str, writers: Callable[[Spec], Any], kind: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFEPOINT_OS_LOCKS", "0")
    spec, first = holder_paused(tmp_path, kind, location, writers, os_locks=False,
                                host="elsewhere", ttl=TTL)
    store, key = open_store(location), ticket_key("job", 1)
    beat = store.stat(key).mtime
    wait_until(lambda: store.stat(key).mtime != beat, "a heartbeat")  # kill right after one
    os.kill(first.pid, signal.SIGKILL)
    assert finish(first) == -signal.SIGKILL

    mine = Spec(kind, location, "job", N, str(tmp_path / "refused.events"), os_locks=False,
                output=spec.output)
    with pytest.raises(LeaseHeld) as refused:  # its heartbeat is fresh: it may be alive
        attempt_here(mine)
    assert f"pid {first.pid} on elsewhere" in str(refused.value)
    assert refused.value.holder["pid"] == first.pid and refused.value.heartbeat is not None
    assert not events(mine.events)  # it did nothing
    current = holder(store, "job")
    assert current is not None and current.generation == 1

    later = Spec(kind, location, "job", N, spec.events, os_locks=False, output=spec.output,
                 wait=60.0, retry=True)
    second = writers(later)
    assert finish(second) == 0
    took_over = ticket(location, "job", 2)["holder"]["started"]
    assert took_over > refused.value.heartbeat + TTL  # only once the TTL had passed
    start = event_of(spec.events, second.pid, "start")
    assert start is not None and start.number == 2
    assert_result_exact(kind, location, "job", N, spec.output)
    assert_consistent(location)


def test_with_os_locks_off_the_pid_still_tells_on_one_host(
        tmp_path: Path, location: str, writers: Callable[[Spec], Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``SAFEPOINT_OS_LOCKS=0`` alone does not make a writer look remote: on the same host
    a holder whose pid is gone is dead at once, whatever its heartbeat."""
    monkeypatch.setenv("SAFEPOINT_OS_LOCKS", "0")
    spec, first = holder_paused(tmp_path, "run", location, writers, os_locks=False, ttl=30.0)
    os.kill(first.pid, signal.SIGKILL)
    assert finish(first) == -signal.SIGKILL  # reaped: the pid is gone
    store = open_store(location)
    assert store.lock_free(ticket_key("job", 1)) is None  # no OS lock to ask
    current = holder(store, "job")
    assert current is not None and current.state == "dead"
    second = writers(Spec("run", location, "job", N, spec.events, os_locks=False,
                          output=spec.output))
    assert finish(second) == 0  # wait=0, and not refused
    assert_result_exact("run", location, "job", N, spec.output)
    assert_consistent(location)
