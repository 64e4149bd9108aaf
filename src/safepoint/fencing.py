"""Attempt fencing: once a job is taken over, its older attempt can no longer commit.

Each attempt of a job takes the next attempt number by creating a marker in the store::

    <job>/attempts/00000001     {"token": "<random>", "host": ..., "pid": ..., "started": ...}
    <job>/attempts/00000002

The number is the highest existing one plus one, taken with an exclusive create, so two
attempts starting at once get different numbers (the loser of a race lists again and takes
the next). Before every commit, :meth:`Attempt.check` lists the markers: when a higher
number exists, or its own marker is gone or holds another token (the job completed and was
removed, or was deleted and started afresh), it raises :class:`StaleAttempt` and the commit
does not happen.

The check and the commit are two operations, not one atomic compare-and-swap (no store
backend offers one portably). An attempt that passes the check and is then paused (a
SIGSTOPped worker, a long GC pause) may still land that one commit after a newer attempt
has started: a residual window of one commit per stale attempt. Tasks make that commit
harmless by numbering their checkpoints ``attempt * 10**9 + n``: a newer attempt's
checkpoints always sort after an older attempt's, so a late commit of a stale attempt never
becomes the checkpoint a newer attempt's progress is restored from.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass

from safepoint.errors import SafepointError, StaleAttempt
from safepoint.store import Store

ATTEMPTS = "attempts"
"""The folder, under the job's name, that holds one marker per attempt."""

_DIGITS = 8
_MAX_RACES = 1000


def attempt_key(job: str, number: int) -> str:
    """The key of attempt ``number``'s marker."""
    return f"{job}/{ATTEMPTS}/{number:0{_DIGITS}d}"


def list_attempts(store: Store, job: str) -> list[int]:
    """The attempt numbers of ``job`` in the store, ascending (temporary files ignored)."""
    names = store.list(f"{job}/{ATTEMPTS}")
    return sorted(int(n) for n in names if len(n) == _DIGITS and n.isascii() and n.isdigit())


@dataclass(frozen=True)
class Attempt:
    """One attempt of a job, holding the marker it created in the store."""

    store: Store
    job: str
    number: int
    token: str

    @classmethod
    def begin(cls, store: Store, job: str, *, at_least: int = 1, durable: bool = True) -> Attempt:
        """Take the next attempt number of ``job`` (and at least ``at_least``); every older
        attempt is fenced from now on."""
        token = uuid.uuid4().hex
        marker = json.dumps({"token": token, "host": socket.gethostname(), "pid": os.getpid(),
                             "started": time.time()}).encode()
        for _ in range(_MAX_RACES):
            number = max(max(list_attempts(store, job), default=0) + 1, at_least)
            if store.create(attempt_key(job, number), marker, durable=durable):
                return cls(store, job, number, token)
        raise SafepointError(
            f"could not take an attempt number for job {job!r} in {store.url}: "
            f"lost {_MAX_RACES} races in a row to other attempts starting at the same time")

    def newest(self) -> int:
        """The highest attempt number of this job in the store now (0 when none)."""
        return max(list_attempts(self.store, self.job), default=0)

    def check(self) -> None:
        """Raise :class:`StaleAttempt` unless this attempt is still the job's newest.

        Used as the Checkpointer's ``fence``: it runs right before each manifest commit.
        """
        newest = self.newest()
        if newest > self.number:
            raise StaleAttempt(
                f"job {self.job!r}: attempt {self.number} was taken over by attempt {newest}; "
                "this attempt may no longer commit and stops here (the newer attempt goes on)",
                name=self.job, attempt=self.number, current=newest)
        if self._marker_token() != self.token:
            raise StaleAttempt(
                f"job {self.job!r}: the marker of attempt {self.number} is gone from "
                f"{self.store.url} (the job completed or was deleted, possibly restarted); "
                "this attempt may no longer commit and stops here",
                name=self.job, attempt=self.number, current=newest)

    def is_current(self) -> bool:
        """True while no newer attempt has started and this attempt's marker is intact."""
        try:
            self.check()
        except StaleAttempt:
            return False
        return True

    def _marker_token(self) -> str | None:
        try:
            data = json.loads(self.store.read(attempt_key(self.job, self.number)))
        except FileNotFoundError:
            return None
        except ValueError:  # a damaged marker fences too: it proves nothing about us
            return None
        return data.get("token") if isinstance(data, dict) else None


__all__ = ["ATTEMPTS", "Attempt", "attempt_key", "list_attempts"]
