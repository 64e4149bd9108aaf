"""How the ranks of a distributed job talk to each other for a checkpoint.

A :class:`Group` is a few ranks that call the same operations in the same order (SPMD).
A distributed save needs one operation from it: :meth:`Group.all_gather`, every rank's
small JSON value given to every rank (the ranks' parts of a save, the commit's outcome, the
step a restore agrees on, a preemption vote). Two implementations:

- ``safepoint.TorchGroup`` (``safepoint.integrations.torch_distributed``): a
  ``torch.distributed`` process group (gloo on CPU, NCCL jobs too: it opens a gloo group of
  its own, so that a save in the background never interleaves with the training's
  collectives).
- :class:`StoreGroup`: no communication library at all (numpy or jax ranks, Dask, plain
  processes): the ranks exchange small files in the store itself, under
  ``<name>/ranks-<run>/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from typing import Any, Protocol, runtime_checkable

import crc32c as _crc32c

from safepoint import knobs
from safepoint.errors import SafepointError
from safepoint.format.layout import rank_folder
from safepoint.store import Store

__all__ = ["Group", "GroupTimeout", "StoreGroup"]


class GroupTimeout(SafepointError):
    """A rank did not take part in a collective step in time (it died, or hangs);
    ``missing``: the ranks that did not."""

    def __init__(self, message: str, *, missing: list[int] | None = None) -> None:
        super().__init__(message)
        self.missing = list(missing or [])


@runtime_checkable
class Group(Protocol):
    """The ranks of one job, as a distributed checkpoint sees them."""

    rank: int
    size: int

    def bind(self, store: Store, name: str) -> None:
        """Called once by the Checkpointer that uses the group (its store and name)."""

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's JSON-able ``value``, in rank order; a collective call."""

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (the others pass None), on every rank; a collective call that
        waits for rank 0 only."""

    def close(self) -> None:
        """Let go of what the group holds."""


class StoreGroup:
    """A group whose ranks exchange small files in the checkpoint's store: no process group,
    no sockets, only what every rank can already reach.

    ``run_id`` must be the same on every rank of a launch and new for every launch (a
    launcher's job id and restart count, a uuid made by the driver): the files of a group
    are named by it, so a relaunch never reads a dead launch's files. ``timeout``: seconds a
    rank waits for the others at each step before :class:`GroupTimeout`; ``poll``: seconds
    between looks (each one a read of the missing ranks' files).
    """

    def __init__(self, rank: int, world_size: int, run_id: str, *, timeout: float = 600.0,
                 poll: float = 0.005) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, not {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), not {rank!r}")
        if not isinstance(run_id, str) or not run_id:
            raise ValueError("run_id must be a non-empty string shared by every rank of this "
                             "launch and new for each launch (e.g. a job id and restart count)")
        self.rank, self.size, self.run_id = rank, world_size, run_id
        self.timeout, self.poll = float(timeout), float(poll)
        self._folder: str | None = None
        self._store: Store | None = None
        self._seq = 0
        self._mine: list[int] = []  # exchange steps whose file this rank wrote, not yet removed

    def bind(self, store: Store, name: str) -> None:
        run = hashlib.sha256(self.run_id.encode()).hexdigest()[:12]
        folder = f"{name}/{rank_folder(run)}"
        if self._store is not None and (self._store.url, self._folder) != (store.url, folder):
            raise SafepointError(f"{self!r} already serves {self._store.url}/{self._folder}; "
                                 "give each distributed Checkpointer a StoreGroup of its own "
                                 "(a run id each)")
        self._store, self._folder = store, folder

    def _key(self, seq: int, rank: int) -> str:
        return f"{self._folder}/{seq:08d}-{rank}.json"

    def all_gather(self, value: Any) -> list[Any]:
        if self._store is None:
            raise SafepointError("a StoreGroup is used through a Checkpointer(group=...)")
        seq = self._put(value)
        found = self._wait(seq, range(self.size))
        # every rank has written this step, so every rank has read all earlier ones
        for old in [s for s in self._mine if s < seq]:
            with contextlib.suppress(OSError):
                self._store.delete(self._key(old, self.rank))
            self._mine.remove(old)
        return [found[r] for r in range(self.size)]

    def broadcast(self, value: Any) -> Any:
        if self._store is None:
            raise SafepointError("a StoreGroup is used through a Checkpointer(group=...)")
        if self.rank == 0:
            self._put(value)
            return value
        seq = self._seq
        self._seq += 1
        return self._wait(seq, [0])[0]

    def _put(self, value: Any) -> int:
        """Write this rank's value of the next exchange step; returns the step."""
        assert self._store is not None
        seq = self._seq
        self._seq += 1
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
        crc = _crc32c.crc32c(text.encode()) & 0xFFFFFFFF
        self._store.commit(self._key(seq, self.rank), f"{crc:08x}{text}".encode(), durable=False)
        self._mine.append(seq)
        return seq

    def _wait(self, seq: int, ranks: Any) -> dict[int, Any]:
        """The values of ``ranks`` at exchange step ``seq``, once all are there."""
        store = self._store
        assert store is not None
        found: dict[int, Any] = {}
        deadline = time.monotonic() + self.timeout
        while True:
            for rank in ranks:
                if rank not in found:
                    got = self._read(seq, rank)
                    if got is not _MISSING:
                        found[rank] = got
            if len(found) == len(ranks):
                return found
            if time.monotonic() > deadline:
                missing = sorted(set(ranks) - set(found))
                raise GroupTimeout(
                    f"ranks {missing} of {self.size} did not reach step {seq} of the group's "
                    f"exchange in {store.url}/{self._folder} within {self.timeout:g} s (dead or "
                    "hung)", missing=missing)
            time.sleep(self.poll)

    def _read(self, seq: int, rank: int) -> Any:
        assert self._store is not None
        try:
            data = self._store.read(self._key(seq, rank), limit=knobs.MAX_SMALL_READ)
        except FileNotFoundError:
            return _MISSING
        head, text = data[:8], data[8:]
        if head != f"{_crc32c.crc32c(text) & 0xFFFFFFFF:08x}".encode():
            raise SafepointError(f"{self._store.url}/{self._key(seq, rank)}: a rank's exchange "
                                 "file is damaged (checksum mismatch)")
        return json.loads(text)

    def close(self) -> None:
        """Nothing to let go: this rank's newest exchange files may still be read by a slower
        rank (each is removed at the next completed step, and ``gc`` removes a launch's last
        ones an hour later)."""

    def __repr__(self) -> str:
        return f"StoreGroup(rank={self.rank}, world_size={self.size}, run_id={self.run_id!r})"


_MISSING = object()
