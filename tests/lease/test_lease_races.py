"""Races of the lease itself, each made to happen at its worst instant: a newcomer that
looks at a ticket the instant it appears."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from lease_support import assert_consistent

from safepoint.lease import Holder, Lease, holder
from safepoint.store import LocalStore


def test_a_ticket_is_locked_from_the_instant_it_appears(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the exclusive create of a ticket and its OS lock, a newcomer on the same
    host would find the lock free and take the new holder for dead."""
    store = LocalStore(tmp_path / "store")
    link = os.link
    seen: list[Holder | None] = []

    def linked(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        link(src, dst, *args, **kwargs)
        if dst == "00000001" and not seen:  # the ticket is visible from now on
            seen.append(holder(store, "job"))  # what a newcomer sees at this instant

    monkeypatch.setattr(os, "link", linked)
    lease = Lease.acquire(store, "job", kind="test")
    monkeypatch.undo()
    assert seen and seen[0] is not None and seen[0].state == "running"
    assert lease.stale() is None
    lease.release()
    assert_consistent(store)
