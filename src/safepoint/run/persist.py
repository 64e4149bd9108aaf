"""Where a run's checkpoints live, and how one is committed.

Everything of a run is under ``<store>/<name>/``:

- ``run.journal`` (local stores): an append-only log of *records*; a record holds the
  position, the identity of the input, the committed lengths of outputs, and the state
  tree encoded as JSON. One commit is one append and one ``fdatasync``.
- ``<step>/manifest.json`` + blobs: a full checkpoint written by the
  :class:`~safepoint.checkpointer.Checkpointer` (``keep=1``), whose manifest carries the
  same record under ``"run"``. A run commits this way when its state holds large arrays
  (the format stores them as raw blobs, which a log is not for) or when the store cannot
  append (fsspec URLs: object stores).

Every commit has a sequence number; the newest intact one of the journal's last record and
the newest checkpoint step wins. A journal commit that supersedes checkpoint steps deletes
them afterwards.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from safepoint.checkpointer import (
    Checkpointer,
    CorruptCheckpointWarning,
    committed_steps,
    remove_name,
    remove_steps,
)
from safepoint.errors import CorruptCheckpoint, SafepointError, SaveFailed
from safepoint.format import describe_os_error, prepare, read_manifest
from safepoint.format.tree import decode_inline
from safepoint.store import LocalStore, Store
from safepoint.store.journal import Journal, read_journal

JOURNAL = "run.journal"
"""The journal's file name inside a run's folder."""
RECORD_FORMAT = "safepoint-run"
RECORD_VERSION = 1

_sync = getattr(os, "fdatasync", os.fsync)


@dataclass
class Record:
    """One committed checkpoint of a run, without its state."""

    seq: int
    attempt: int = 1
    complete: bool = False
    loop: int = 0
    """Index of the positioned iteration (0 for the first loop of the run)."""
    position: int = 0
    """Items completed in that loop."""
    total: int | None = None
    fraction: float | None = None
    source: dict[str, Any] | None = None
    """What the loop reads and where (for lines: path, byte offset, size, mtime, sample)."""
    outputs: dict[str, int] = field(default_factory=dict)
    """Committed length of each output file, by absolute path."""
    finished: bool = False
    """The loop at ``loop`` ran to its end (a resumed run skips it)."""
    time: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT, "version": RECORD_VERSION, "seq": self.seq,
            "attempt": self.attempt, "complete": self.complete, "loop": self.loop,
            "position": self.position, "total": self.total, "fraction": self.fraction,
            "source": self.source, "outputs": self.outputs, "finished": self.finished,
            "time": self.time,
        }

    @classmethod
    def from_json(cls, body: Any, where: str) -> Record:
        if not isinstance(body, dict) or body.get("format") != RECORD_FORMAT:
            raise CorruptCheckpoint(f"{where}: not a safepoint run record", path=where)
        if type(body.get("version")) is not int or body["version"] > RECORD_VERSION:
            raise CorruptCheckpoint(
                f"{where}: run record version {body.get('version')!r} is newer than this "
                "safepoint reads; upgrade safepoint", path=where)
        try:
            record = cls(
                seq=int(body["seq"]), attempt=int(body["attempt"]), complete=bool(body["complete"]),
                loop=int(body["loop"]), position=int(body["position"]), total=body["total"],
                fraction=body["fraction"], source=body["source"],
                outputs={str(k): int(v) for k, v in body["outputs"].items()},
                finished=bool(body["finished"]), time=float(body["time"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptCheckpoint(f"{where}: malformed run record ({exc!r})", path=where) from exc
        if record.seq < 0 or record.loop < 0 or record.position < 0:
            raise CorruptCheckpoint(f"{where}: run record with negative counters", path=where)
        return record


@dataclass
class Loaded:
    """The newest intact checkpoint of a run, read back."""

    record: Record
    state: dict[str, Any]
    node: Any | None
    """The state as encoded in the journal (None when it came from a full checkpoint)."""


@dataclass
class Commit:
    """A commit snapshotted at an item boundary, ready to be written (now or by a thread)."""

    record: Record
    node: Any | None = None
    """The encoded state, for a journal append."""
    state: Any | None = None
    """The state tree, for a full checkpoint (a private copy when written in the background)."""
    outputs: list[int] = field(default_factory=list)
    """Descriptors of output files to flush to disk before the state is committed."""


_INT64 = range(-(2**63), 2**63)


def _flat_node(state: Any) -> dict[str, Any] | None:
    """What :func:`~safepoint.format.prepare` encodes a flat dict of plain JSON values to
    (the values themselves: see ``safepoint.format.tree``), found without its encoder: the
    common state of a loop (counters, totals) is committed thousands of times a second.
    None for anything else."""
    if type(state) is not dict:
        return None
    for key, value in state.items():
        kind = type(value)
        if type(key) is not str or key == "$":
            return None
        if kind is int:
            if value not in _INT64:
                return None
        elif kind is float:
            if value != value or value in (math.inf, -math.inf):
                return None
        elif not (kind is str or kind is bool or value is None):
            return None
    return dict(state)


def _decode_payload(payload: bytes, where: str) -> tuple[Record, Any]:
    try:
        body = json.loads(payload)
    except ValueError as exc:
        raise CorruptCheckpoint(f"{where}: run record is not valid JSON ({exc})", path=where) from exc
    return Record.from_json(body, where), body.get("state")


class RunStore:
    """Commits and reads back the checkpoints of one run."""

    def __init__(
        self, store: Store, name: str, *, durable: bool, fence: Callable[[], None] | None = None
    ) -> None:
        self.store, self.name, self.durable, self.fence = store, name, durable, fence
        self.where = f"{store.url}/{name}"
        self.journal = (
            Journal(store, f"{name}/{JOURNAL}", durable=durable) if isinstance(store, LocalStore) else None
        )
        self._checkpointer: Checkpointer | None = None
        self._has_steps = False

    @property
    def checkpointer(self) -> Checkpointer:
        if self._checkpointer is None:
            self._checkpointer = Checkpointer(
                self.name, location=self.store, keep=1, durable=self.durable, fence=self.fence)
        return self._checkpointer

    # ----------------------------------------------------------------- reading

    def open(self) -> Loaded | None:
        """Open for committing; the newest intact checkpoint, or None for a new run."""
        candidates: list[tuple[int, Any]] = []
        if self.journal is not None:
            payload = self.journal.open().newest
            if payload is not None:
                record, node = _decode_payload(payload, f"{self.where}/{JOURNAL}")
                candidates.append((record.seq, (record, node)))
        steps = committed_steps(self.store, self.name)
        self._has_steps = bool(steps)
        candidates.extend((step, step) for step in steps)
        for _, candidate in sorted(candidates, key=lambda c: c[0], reverse=True):
            if isinstance(candidate, int):
                loaded = self._load_step(candidate)
                if loaded is not None:
                    return loaded
                continue
            record, node = candidate
            where = f"{self.where}/{JOURNAL}"
            state = decode_inline(node, where) if node is not None else {}
            return Loaded(record, state if isinstance(state, dict) else {}, node)
        return None

    def _load_step(self, step: int) -> Loaded | None:
        try:
            manifest = self.checkpointer.manifest(step)
            body = manifest.body.get("run")
            if body is None:
                raise SafepointError(
                    f"{self.where} holds checkpoints that are not a run's (step {step} has no "
                    "run record); use another name, or `safepoint rm "
                    f"{self.name}` to delete them")
            record = Record.from_json(body, manifest.key)
            state = self.checkpointer.restore(step).state
        except CorruptCheckpoint as exc:
            warnings.warn(f"skipping damaged checkpoint of run {self.name!r} step {step}: {exc}",
                          CorruptCheckpointWarning, stacklevel=3)
            return None
        return Loaded(record, state if isinstance(state, dict) else {}, None)

    # ----------------------------------------------------------------- writing

    def snapshot(self, record: Record, state: Any, *, private: bool) -> Commit:
        """Encode ``state`` now, so that later changes to it do not reach this commit.

        A state without large arrays is encoded to JSON for the journal. A state with them
        (or any state when the store cannot append) goes to a full checkpoint: with
        ``private`` (a background write) a deep copy is taken, since the caller goes on.
        """
        if self.journal is not None:
            node = _flat_node(state)
            if node is not None:
                return Commit(record, node=node)
            prepared = prepare(state)
            if not prepared.blobs:
                return Commit(record, node=prepared.node)
        return Commit(record, state=copy.deepcopy(state) if private else state)

    def write(self, commit: Commit) -> None:
        """Flush the outputs, then commit the state and position together."""
        try:
            if self.durable:
                for fd in commit.outputs:
                    _sync(fd)
            if commit.state is None and self.journal is not None:
                if self.fence is not None:
                    self.fence()
                body = commit.record.to_json()
                body["state"] = commit.node
                payload = json.dumps(body, separators=(",", ":")).encode()
                self.journal.append(payload)
                if self.journal.due:
                    self.journal.replace([payload])
                if self._has_steps:  # superseded by the journal: no longer needed
                    remove_steps(self.store, self.name)
                    self._has_steps = False
                return
        except OSError as exc:
            raise SaveFailed(
                f"could not commit run {self.name!r} to {self.where}: {describe_os_error(exc)}. "
                "The previous checkpoint is untouched.", name=self.name, errno=exc.errno) from exc
        record = commit.record
        self.checkpointer.save(
            record.seq, commit.state if commit.state is not None else {},
            extra={"kind": "run", "run": record.to_json(), "progress": record.fraction,
                   "attempt": record.attempt})
        self._has_steps = True

    def remove(self) -> None:
        """Delete every checkpoint of the run (after a commit marked it complete)."""
        self.close()
        remove_name(self.store, self.name)

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()


@dataclass(frozen=True)
class Peek:
    """The newest record of a run, read without decoding its state."""

    record: Record
    nbytes: int


def peek(store: Store, name: str) -> Peek | None:
    """The newest record of run ``name`` and the bytes it occupies; None if not a run."""
    found: list[Record] = []
    nbytes = 0
    if isinstance(store, LocalStore):
        scan, size = read_journal(store, f"{name}/{JOURNAL}")
        nbytes += size
        if scan is not None and scan.damage and not scan.records:
            raise CorruptCheckpoint(f"{store.url}/{name}/{JOURNAL}: {scan.damage[0]}",
                                    path=f"{store.url}/{name}/{JOURNAL}")
        if scan is not None and scan.newest is not None:
            found.append(_decode_payload(scan.newest, f"{store.url}/{name}/{JOURNAL}")[0])
    for step in reversed(committed_steps(store, name)):
        try:
            manifest = read_manifest(store, name, step)
        except CorruptCheckpoint:
            continue
        nbytes += manifest.nbytes
        body = manifest.body.get("run")
        if body is not None:
            found.append(Record.from_json(body, manifest.key))
            break
    if not found:
        return None
    return Peek(max(found, key=lambda r: r.seq), nbytes)


__all__ = ["JOURNAL", "Commit", "Loaded", "Peek", "Record", "RunStore", "peek"]
