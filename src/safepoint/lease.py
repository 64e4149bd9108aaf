"""One writer per name: an ownership lease, renewed by heartbeat, that fences its holder.

Every writer of a name (a Checkpointer's first save, a run, a task attempt, a flow) takes
the name's lease; readers need none. The lease is a *ticket* per holder::

    <name>/lease/00000007            {"generation": 7, "token", "holder": {host, pid, ...}, "ttl"}
    <name>/lease/00000006.released   a holder that let go

1. **Taking it.** The newest ticket's holder is asked whether it is alive: on the same host
   an OS file lock that the holder keeps on its ticket (and its pid) tell at once whether
   it died; otherwise its heartbeat (the ticket's modification time, renewed every
   ``ttl / 3``) must be younger than ``ttl``. A live holder refuses the newcomer with
   :class:`~safepoint.errors.LeaseHeld` naming it (unless ``takeover=True``); a dead,
   expired or released one is taken over: the newcomer creates the next ticket with an
   exclusive create (of two newcomers exactly one wins) and deletes the older tickets.
2. **Fencing.** A holder whose ticket is gone, or that sees a newer ticket, is stale: its
   heartbeat notices within ``ttl / 3`` and :meth:`Lease.check` raises
   :class:`~safepoint.errors.StaleAttempt`, which every commit, completion and deletion
   calls first. Writers also keep their records per generation (a run's journal, a task's
   log), so that a stale holder woken between that check and its write writes into a dead
   segment nobody reads; the newest-step record of a Checkpointer on S3 is written with
   ``If-Match``. What remains is documented in docs/concurrency.md.
3. **Letting go.** :meth:`Lease.release` marks the ticket released (a newcomer takes over at
   once, no waiting).

The generation number is the writer's *attempt*: 1 for the first writer of a name, one more
for each writer after it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any, Literal

from safepoint import knobs
from safepoint.errors import CorruptCheckpoint, LeaseHeld, StaleAttempt, logger
from safepoint.store import Store

log = logger("lease")

FOLDER = "lease"
_TICKET = re.compile(r"(\d{8})(\.released)?")
_MAX_RACES = 1000
HOST = socket.gethostname()


def _boot_id() -> str | None:
    """This machine's current boot (Linux): two machines that share a host name, or one
    machine rebooted, never look like the same host."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


BOOT = _boot_id()
Liveness = Literal["running", "stale", "released", "dead"]


def ticket_key(name: str, generation: int) -> str:
    return f"{name}/{FOLDER}/{generation:08d}"


@dataclass(frozen=True)
class Holder:
    """The newest ticket of a name, as a newcomer (or ``safepoint ls``) sees it."""

    generation: int
    info: dict[str, Any]
    """The ticket's contents: ``holder`` (host, pid, kind, started), ``ttl``."""
    heartbeat: float | None
    """When the holder last showed it is alive (seconds since the epoch)."""
    state: Liveness
    """``running`` (alive), ``stale`` (heartbeat expired), ``dead`` (its process is gone),
    ``released`` (let go)."""

    @property
    def who(self) -> str:
        holder = self.info.get("holder") or {}
        kind = holder.get("kind") or "writer"
        return f"{kind} pid {holder.get('pid', '?')} on {holder.get('host', '?')}"


def tickets(store: Store, name: str) -> dict[int, bool]:
    """Generation -> released, for every ticket of ``name``."""
    found: dict[int, bool] = {}
    for entry in store.list(f"{name}/{FOLDER}"):
        match = _TICKET.fullmatch(entry)
        if match:
            generation = int(match.group(1))
            found[generation] = found.get(generation, False) or bool(match.group(2))
    return found


def _read_ticket(store: Store, name: str, generation: int, *, released: bool = False) -> dict[str, Any]:
    key = ticket_key(name, generation) + (".released" if released else "")
    try:
        data = json.loads(store.read(key, limit=knobs.MAX_SMALL_READ))
    except (FileNotFoundError, ValueError, CorruptCheckpoint):
        return {}
    return data if isinstance(data, dict) else {}


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_host(who: dict[str, Any]) -> bool:
    """Whether the holder ran on this machine, in this boot: then its OS lock (unless
    ``SAFEPOINT_OS_LOCKS=0``) and its pid tell at once whether it died."""
    return who.get("host") == HOST and who.get("boot") == BOOT


def holder(store: Store, name: str, *, now: float | None = None) -> Holder | None:
    """The newest ticket of ``name`` and whether its holder is alive; None if it has none."""
    found = tickets(store, name)
    if not found:
        return None
    generation = max(found)
    if found[generation]:
        info = _read_ticket(store, name, generation, released=True)
        return Holder(generation, info, info.get("released_at"), "released")
    key = ticket_key(name, generation)
    info = _read_ticket(store, name, generation)
    try:
        beat = store.stat(key).mtime
    except (FileNotFoundError, CorruptCheckpoint):
        return Holder(generation, info, None, "dead")
    heartbeat = info.get("heartbeat")
    if isinstance(heartbeat, (int, float)) and (beat is None or heartbeat > beat):
        beat = float(heartbeat)
    ttl = float(info.get("ttl") or knobs.LEASE_TTL)
    now = time.time() if now is None else now
    who = info.get("holder") or {}
    if _same_host(who) and (store.lock_free(key) is True or not _pid_alive(who.get("pid"))):
        return Holder(generation, info, beat, "dead")  # on this host: known at once
    fresh = beat is not None and now - beat <= ttl  # alive but hung (paused) counts as stale
    return Holder(generation, info, beat, "running" if fresh else "stale")


class Lease:
    """The lease on one name, held by this process (see the module's documentation)."""

    def __init__(self, store: Store, name: str, generation: int, token: str, ttl: float) -> None:
        self.store, self.name, self.generation, self.token, self.ttl = store, name, generation, token, ttl
        self.fenced: StaleAttempt | None = None
        """Set (by the heartbeat or a check) once this holder was taken over."""
        self.previous: Holder | None = None
        """The holder this lease took over from, if any."""
        self._lock: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._version: str | None = None
        self._looked = -float("inf")  # when stale() last looked at the store (monotonic)
        self.released = False

    @property
    def key(self) -> str:
        return ticket_key(self.name, self.generation)

    @classmethod
    def acquire(
        cls, store: Store, name: str, *, kind: str, takeover: bool = False,
        ttl: float | None = None, wait: float = 0.0, durable: bool = True,
    ) -> Lease:
        """Take the lease of ``name`` (see the module's documentation).

        ``wait``: seconds to wait for a live holder to let go before refusing;
        ``takeover=True``: take it from a live holder too (it is fenced).
        """
        ttl = knobs.LEASE_TTL if ttl is None else float(ttl)
        deadline = time.monotonic() + wait
        for _ in range(_MAX_RACES):
            current = holder(store, name)
            if current is not None and current.state == "running" and not takeover:
                if time.monotonic() < deadline:
                    time.sleep(min(knobs.LEASE_POLL, max(deadline - time.monotonic(), 0.0)))
                    continue
                raise LeaseHeld(
                    f"{name!r} in {store.url} is being written by {current.who} (last "
                    f"heartbeat {_ago(current.heartbeat)}); one writer per name. Wait for it "
                    "to finish, stop it, or take over explicitly (takeover=True fences it)",
                    name=name, holder=dict(current.info.get("holder") or {}),
                    heartbeat=current.heartbeat)
            generation = (current.generation if current is not None else 0) + 1
            token = uuid.uuid4().hex
            body = {"format": "safepoint-lease", "version": 1, "generation": generation,
                    "token": token, "ttl": ttl, "heartbeat": time.time(),
                    "holder": {"host": HOST, "boot": BOOT, "pid": os.getpid(), "kind": kind,
                               "started": time.time(), "program": os.path.basename(sys.argv[0] or "")}}
            created, lock = store.create_locked(ticket_key(name, generation),
                                                json.dumps(body).encode(), durable=durable)
            if not created:
                continue  # another newcomer won this generation: look again
            lease = cls(store, name, generation, token, ttl)
            lease.previous = current
            lease._start(lock)
            if current is not None and current.state != "released":
                # a dead holder is the usual resume after a crash; a live or hung one is news
                level = logging.INFO if current.state == "dead" else logging.WARNING
                log.log(level, "safepoint: %r: took over from %s (%s); it is fenced from now on",
                        name, current.who, current.state)
            return lease
        raise LeaseHeld(f"could not take the lease of {name!r} in {store.url}: lost "
                        f"{_MAX_RACES} races in a row to other writers", name=name)

    def _start(self, lock: Any) -> None:
        self._lock = lock  # held since the ticket exists: a racing newcomer never sees it free
        for generation in tickets(self.store, self.name):  # older holders are fenced now
            if generation < self.generation:
                with contextlib.suppress(OSError):
                    self.store.delete(ticket_key(self.name, generation))
                    self.store.delete(ticket_key(self.name, generation) + ".released")
        self._thread = threading.Thread(target=_beat, args=(weakref.ref(self), self._stop, self.ttl),
                                        name=f"safepoint-lease-{self.name}", daemon=True)
        self._thread.start()

    def stale(self) -> StaleAttempt | None:
        """Look now: the error to raise if a newer holder took over, else None."""
        if self.fenced is not None:
            return self.fenced
        self._looked = time.monotonic()
        found = tickets(self.store, self.name)  # one listing tells both
        newer = [g for g in found if g > self.generation]
        own = found.get(self.generation) is False and not self.released
        if newer or not own:
            current = max(newer, default=0)
            what = (f"was taken over by attempt {current}" if newer else
                    "lost its ticket (the name was removed or taken over)")
            self.fenced = StaleAttempt(
                f"{self.name!r}: writer attempt {self.generation} {what}; this writer may no "
                "longer commit, complete or delete, and stops here (the newer one goes on)",
                name=self.name, attempt=self.generation, current=current)
        return self.fenced

    def check(self, *, fresh: bool = False) -> None:
        """Raise :class:`StaleAttempt` unless this holder still holds the lease.

        A commit calls it before every write. It lists the tickets again when the last look
        (its own or the heartbeat's) is older than a heartbeat interval, so a holder woken
        from a pause looks at once; in between, where metadata is cheap (a local disk), it
        checks that its own ticket is still there (a takeover deletes it), else it trusts
        the heartbeat: on an object store, one request per interval rather than per commit.
        ``fresh=True`` always lists (before completing or deleting)."""
        recent = self.fenced is None and not fresh and time.monotonic() - self._looked < self.ttl / 3
        if recent and (not self.store.cheap_metadata or self.store.exists(self.key)):
            return
        error = self.stale()
        if error is not None:
            raise error

    def beat(self) -> None:
        """Renew the heartbeat (the background thread does it every ``ttl / 3``)."""
        if self.stale() is not None:
            return
        if not self.store.touch(self.key):
            self.stale()

    def release(self) -> None:
        """Let go of the lease: a newcomer takes over at once."""
        if self.released:
            return
        self._stop.set()
        try:
            if self.fenced is None and self.stale() is None:
                info = _read_ticket(self.store, self.name, self.generation)
                info["released_at"] = time.time()
                self.store.create(self.key + ".released", json.dumps(info).encode(), durable=False)
                self.store.delete(self.key)
        except Exception as exc:  # also at exit, with the store gone: a newcomer then waits out the TTL
            log.debug("safepoint: %r: could not mark the lease released: %s", self.name, exc)
        self.released = True
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def forget(self) -> None:
        """The name was removed, its lease with it: stop the heartbeat and let go of the OS
        lock without writing anything."""
        self._stop.set()
        self.released = True
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __repr__(self) -> str:
        return f"<Lease {self.name!r} attempt {self.generation}>"


def release_when_dropped(lease: Lease) -> None:
    """Release ``lease`` from a finalizer (an owner that was dropped without closing it).

    The garbage collector runs finalizers in whatever thread it interrupts, a store
    client's I/O thread or the very thread serving the store's requests among them, where
    store I/O waits for itself forever; off the main thread, the release therefore gets a
    thread of its own (the heartbeat stops at once)."""
    if threading.current_thread() is threading.main_thread():
        lease.release()
        return
    lease._stop.set()
    try:
        threading.Thread(target=lease.release, name=f"safepoint-release-{lease.name}",
                         daemon=True).start()
    except RuntimeError:  # the interpreter is shutting down: a newcomer waits out the TTL
        pass


def _beat(ref: weakref.ref[Lease], stop: threading.Event, ttl: float) -> None:
    while not stop.wait(ttl / 3):
        lease = ref()
        if lease is None or lease.released:
            return
        try:
            lease.beat()
        except Exception as exc:  # a store that is briefly unreachable: try again next time
            log.debug("safepoint: heartbeat of %r failed: %s", lease.name, exc)
        if lease.fenced is not None:
            log.warning("safepoint: %s", lease.fenced)
            return
        del lease


def _ago(when: float | None) -> str:
    if when is None:
        return "unknown"
    seconds = max(time.time() - when, 0.0)
    return f"{seconds:.0f} s ago" if seconds >= 1 else "just now"


__all__ = ["FOLDER", "HOST", "Holder", "Lease", "holder", "release_when_dropped", "ticket_key",
           "tickets"]
