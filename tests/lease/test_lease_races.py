"""Two races of the lease itself, each made to happen at its worst instant: a newcomer that
looks at a ticket the instant it appears, and a lease released by the garbage collector in
the thread that serves the store's requests."""

from __future__ import annotations

import gc
import os
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lease_support import assert_consistent, wait_until

from safepoint.checkpointer import Checkpointer
from safepoint.lease import Holder, Lease, holder
from safepoint.store import Entry, LocalStore


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


class OneThreadStore(LocalStore):
    """A local store whose listings are served by one thread, as a test's in-process S3
    server serves requests: a listing asked for on that thread waits for itself."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.requests: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...], queue.Queue[Any]]] = queue.Queue()
        threading.Thread(target=self._serve, name="store-server", daemon=True).start()

    def _serve(self) -> None:
        while True:
            fn, args, reply = self.requests.get()
            try:
                reply.put((True, fn(*args)))
            except BaseException as exc:  # handed to the caller
                reply.put((False, exc))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        reply: queue.Queue[Any] = queue.Queue()
        self.requests.put((fn, args, reply))
        ok, value = reply.get(timeout=10)  # queue.Empty: the server waits for itself
        if not ok:
            raise value
        return value

    def scan(self, prefix: str = "") -> list[Entry]:
        return self.call(super().scan, prefix)  # type: ignore[no-any-return]


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_a_dropped_checkpointer_is_released_off_the_collecting_thread(
        tmp_path: Path, no_automatic_gc: None) -> None:
    store = OneThreadStore(tmp_path / "store")
    ckpt = Checkpointer("job", location=store)
    ckpt.save(1, {"a": 1})
    ckpt.cycle = ckpt  # type: ignore[attr-defined]  # only the garbage collector frees it
    del ckpt
    store.call(gc.collect)  # collected, and its lease finalized, on the serving thread
    plain = LocalStore(tmp_path / "store")
    wait_until(lambda: (current := holder(plain, "job")) is not None and current.state == "released",
               "the lease to be released", timeout=10)
    assert Checkpointer("job", location=plain).restore().state == {"a": 1}
    assert_consistent(plain)
