"""Where an execution's records live, and how they are written and read back.

Each writer (each lease generation) writes its own *segment*; its first write copies into
it the records still alive, so a segment stands alone, and then the older segments are
deleted. A stale writer woken after a takeover therefore writes into a segment nobody
reads any more: its late commits can never mix with the new writer's.

- Local stores: ``<name>/run-<generation>.journal``, an append-only checksummed journal
  (one append and one ``fdatasync`` per commit, see ``safepoint.store.journal``).
- Object stores: ``<name>/log-<generation>/<seq>.rec``, one object per record, created
  exclusively, and ``<seq>.snap`` objects holding the live records at a compaction.

Large trees (a state holding large arrays, a big step result) go to the name's
Checkpointer as steps numbered by the record's ``seq``; the record refers to them, and a
step no live record refers to any more is deleted.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from safepoint import knobs
from safepoint.checkpointer import Checkpointer, remove_name, remove_steps
from safepoint.errors import CheckpointNotFound, CorruptCheckpoint, SaveFailed
from safepoint.format import (
    describe_os_error,
    generation_of_segment,
    journal_name,
    prepare,
    segment_name,
)
from safepoint.format.manifest import checksum
from safepoint.format.tree import decode_inline
from safepoint.lease import Lease
from safepoint.run.record import Record
from safepoint.store import LocalStore, Store
from safepoint.store.journal import Journal, read_journal

_OBJECT = re.compile(r"(\d{12,20})\.(rec|snap)")
_STEPS_PER_WRITER = 10**9
"""Checkpoint steps of writer generation g are numbered g × 10⁹ + seq: a stale writer woken
after a takeover can never write (or roll back) a step the newer writer uses."""
_PREFIX, _SUFFIX = b'{"crc32c":"', b"}\n"


def segments(store: Store, name: str) -> list[tuple[int, str]]:
    """(generation, entry) of every log segment of ``name``, oldest first."""
    found = []
    for entry in store.list(name):
        generation = generation_of_segment(entry)
        if generation is not None:
            found.append((generation, entry))
    return sorted(found)


def _wrap(payload: bytes, tag: bytes = b"record") -> bytes:
    return _PREFIX + checksum(payload).encode() + b'","' + tag + b'":' + payload + _SUFFIX


def _unwrap(data: bytes, where: str, tag: bytes = b"record") -> bytes:
    head = len(_PREFIX) + 8 + len(b'","') + len(tag) + 2
    if not (data.startswith(_PREFIX) and data.endswith(_SUFFIX)
            and data[len(_PREFIX) + 8 : head] == b'","' + tag + b'":'):
        raise CorruptCheckpoint(f"{where}: not a complete record (truncated or damaged)", path=where)
    payload = data[head : -len(_SUFFIX)]
    expected = data[len(_PREFIX) : len(_PREFIX) + 8].decode("ascii", "replace")
    if checksum(payload) != expected:
        raise CorruptCheckpoint(f"{where}: record checksum mismatch", path=where,
                                expected=expected, actual=checksum(payload))
    return payload


@dataclass
class Replay:
    """What an execution's log holds, as a resume sees it."""

    records: list[Record] = field(default_factory=list)
    """Every intact record of the newest segment, in order."""
    generation: int = 0
    """The generation that wrote the newest segment (0: there is none)."""
    damage: list[str] = field(default_factory=list)

    @property
    def state(self) -> Record | None:
        """The newest state record (the execution's checkpoint)."""
        return next((r for r in reversed(self.records) if r.kind == "state"), None)

    @property
    def seq(self) -> int:
        return max((r.seq for r in self.records), default=0)

    def live(self) -> list[Record]:
        """The records that still count: every step outcome and the newest state (older
        state records are superseded; what they referred to may be gone)."""
        state = self.state
        return [*self.steps().values(), *([state] if state is not None else [])]

    def steps(self) -> dict[str, Record]:
        """Durable step outcomes by key, after resets (a later record wins)."""
        found: dict[str, Record] = {}
        for record in self.records:
            if record.kind == "step":
                found[record.key] = record
            elif record.kind == "reset":
                scope, _, start = record.key.rpartition("#")
                for key in [k for k in found if _in_scope(k, scope, int(start))]:
                    del found[key]
        return found


def _in_scope(key: str, scope: str, start: int) -> bool:
    """Whether step ``key`` lies in ``scope`` at an ordinal of ``start`` or more, or inside
    such a step's loops."""
    at, _, ordinal = key.rpartition("#")
    return at == scope and int(ordinal) >= start


def read_log(store: Store, name: str) -> Replay:
    """Read the newest segment of ``name``'s log (a reader: nothing is changed)."""
    found = segments(store, name)
    if not found:
        return Replay()
    generation, entry = found[-1]
    replay = Replay(generation=generation)
    where = f"{store.url}/{name}/{entry}"
    if entry.endswith(".journal"):
        scan, _ = read_journal(store, f"{name}/{entry}")  # type: ignore[arg-type]
        if scan is None:
            return replay
        replay.damage += scan.damage
        payloads = [p for _, p in scan.records]
    else:
        payloads = _read_objects(store, f"{name}/{entry}", replay.damage)
    for payload in payloads:
        try:
            replay.records.append(Record.from_json(payload, where))
        except CorruptCheckpoint as exc:
            replay.damage.append(str(exc))
    if not replay.records and replay.damage:
        raise CorruptCheckpoint(f"{where}: no intact record ({replay.damage[0]}); the run cannot "
                                f"resume from it. `safepoint rm {name}` to start over", path=where)
    return replay


def _read_objects(store: Store, prefix: str, damage: list[str]) -> list[bytes]:
    entries = sorted(((int(m.group(1)), m.group(2), e) for e in store.list(prefix)
                      if (m := _OBJECT.fullmatch(e))), key=lambda t: (t[0], t[1] == "rec"))
    snaps = [i for i, (_, kind, _) in enumerate(entries) if kind == "snap"]
    payloads: list[bytes] = []
    start = 0
    for index in reversed(snaps):  # the newest readable snapshot starts the segment
        _, _, entry = entries[index]
        try:
            data = store.read(f"{prefix}/{entry}", limit=knobs.MAX_JOURNAL_BYTES)
            items = json.loads(_unwrap(data, f"{store.url}/{prefix}/{entry}", b"records"))
            payloads = [json.dumps(item, separators=(",", ":")).encode() for item in items]
            start = index + 1
            break
        except (CorruptCheckpoint, ValueError, FileNotFoundError) as exc:
            damage.append(str(exc))
    for _, kind, entry in entries[start:]:
        if kind != "rec":
            continue
        where = f"{store.url}/{prefix}/{entry}"
        try:
            payloads.append(_unwrap(store.read(f"{prefix}/{entry}", limit=knobs.MAX_RECORD_BYTES), where))
        except (CorruptCheckpoint, FileNotFoundError) as exc:
            damage.append(str(exc))
    return payloads


class RunLog:
    """The writer of one execution's log (it holds the name's lease)."""

    def __init__(self, store: Store, name: str, lease: Lease, *, durable: bool,
                 allow_pickle: bool = False) -> None:
        self.store, self.name, self.lease, self.durable = store, name, lease, durable
        self.where = f"{store.url}/{name}"
        self.generation = lease.generation
        self.seq = 0
        self.local = isinstance(store, LocalStore)
        self._journal: Journal | None = None
        self._started = False  # this generation's segment exists
        self._refs: dict[int, int] = {}  # checkpoint step -> live records referring to it
        self._state: Record | None = None  # the newest state record, replayed or appended
        self.checkpointer = Checkpointer(name, location=store, durable=durable,
                                         allow_pickle=allow_pickle, lease=lease)
        self.since_compaction = 0
        self.kept = 0
        """Records the last compaction kept alive."""

    # ------------------------------------------------------------------ reading

    def open(self) -> Replay:
        replay = read_log(self.store, self.name)
        self.seq = replay.seq
        self._state = replay.state
        for record in replay.live():
            for ref in record.refs():
                self._refs[ref] = self._refs.get(ref, 0) + 1
        return replay

    def load(self, tree: dict[str, Any] | None, *, allow_pickle: bool = False) -> Any:
        """The value a record's tree reference stands for."""
        if tree is None:
            return None
        if "node" in tree:
            return decode_inline(tree["node"], self.where)
        try:
            return self.checkpointer.restore(tree["checkpoint"], allow_pickle=allow_pickle).state
        except CheckpointNotFound as exc:
            raise CorruptCheckpoint(
                f"{self.where}: a record refers to checkpoint step {tree['checkpoint']}, which "
                "is missing", path=self.where) from exc

    # ------------------------------------------------------------------ writing

    def tree(self, value: Any, *, allow_pickle: bool = False, inline_limit: int | None = None,
             prepared: Any = None) -> dict[str, Any]:
        """Store ``value`` for a record: inline when it holds no large array (and its
        encoding is under ``inline_limit`` bytes), else as a checkpoint step."""
        prepared = prepared if prepared is not None else prepare(value, allow_pickle=allow_pickle)
        if not prepared.blobs and not prepared.pickled:
            node = prepared.node
            if inline_limit is None or len(json.dumps(node)) <= inline_limit:
                return {"node": node}
        self.seq += 1
        step = self.generation * _STEPS_PER_WRITER + self.seq  # never one an older writer uses
        self.checkpointer.save(step, value, overwrite=True)
        return {"checkpoint": step}

    @property
    def started(self) -> bool:
        """Whether this writer's segment exists (an append then needs no live records)."""
        return self._started

    def append(self, record: Record, live: Iterable[Record] | None = None, *,
               sync: bool = True) -> None:
        """Commit ``record`` (numbered here); ``live``: the records still alive, written
        first into this generation's segment when it does not exist yet (required then).
        ``sync=False``: durable at the next :meth:`sync` or synced append (local journals;
        an object is durable when written)."""
        self.lease.check()
        self.seq += 1
        record.seq = self.seq
        for ref in record.refs():
            self._refs[ref] = self._refs.get(ref, 0) + 1
        try:
            if not self._started:
                first = [*(live or ())]
                if record.kind != "state" and self._state is not None and self._state not in first:
                    first.append(self._state)  # a segment stands alone: it holds the state
                self._start([*first, record])
            elif self.local:
                assert self._journal is not None
                self._journal.append(record.to_json(), sync=sync)
            else:
                key = f"{self.name}/{segment_name(self.generation)}/{record.seq:012d}.rec"
                if not self.store.create(key, _wrap(record.to_json()), durable=self.durable):
                    self.lease.check(fresh=True)
                    raise CorruptCheckpoint(f"{self.where}: record {record.seq} exists already",
                                            path=key)
        except OSError as exc:
            raise SaveFailed(
                f"could not commit {self.name!r} to {self.where}: {describe_os_error(exc)}. "
                "The previous checkpoint is untouched.", name=self.name, errno=exc.errno) from exc
        if record.kind == "state":
            self._state = record
        self.since_compaction += 1

    def _start(self, records: list[Record]) -> None:
        """Write this generation's segment with ``records``, then drop the older segments
        and the checkpoint steps no live record refers to (left by a writer killed between
        saving one and committing the record that refers to it)."""
        older = [e for g, e in segments(self.store, self.name) if g < self.generation]
        self._write_segment(records)
        self._started = True
        for entry in older:
            with contextlib.suppress(OSError):
                self.store.delete(f"{self.name}/{entry}")
        referenced = {ref for r in records for ref in r.refs()} | set(self._refs)
        with contextlib.suppress(OSError, CorruptCheckpoint):  # housekeeping: gc does the rest
            self.checkpointer._keep_only(referenced)

    def _write_segment(self, records: list[Record]) -> None:
        payloads = [r.to_json() for r in records]
        if self.local:
            if self._journal is None:
                self._journal = Journal(self.store, f"{self.name}/{journal_name(self.generation)}",  # type: ignore[arg-type]
                                        durable=self.durable)
            self._journal.seq = 0
            self._journal.replace(payloads)
            return
        prefix = f"{self.name}/{segment_name(self.generation)}"
        body = b"[" + b",".join(payloads) + b"]"
        self.store.commit(f"{prefix}/{records[-1].seq:012d}.snap", _wrap(body, b"records"),
                          durable=self.durable)
        superseded = []  # what the snapshot holds now
        for entry in self.store.list(prefix):
            match = _OBJECT.fullmatch(entry)
            if match and (int(match.group(1)) < records[-1].seq or (match.group(2) == "rec"
                          and int(match.group(1)) == records[-1].seq)):
                superseded.append(f"{prefix}/{entry}")
        with contextlib.suppress(OSError):
            self.store.delete_objects(superseded)

    def sync(self) -> None:
        """Make every record appended so far durable."""
        if self._journal is not None:
            try:
                self._journal.sync()
            except OSError as exc:
                raise SaveFailed(f"could not commit {self.name!r} to {self.where}: "
                                 f"{describe_os_error(exc)}", name=self.name,
                                 errno=exc.errno) from exc

    @property
    def due(self) -> bool:
        """Whether the segment should be compacted."""
        if self._journal is not None:
            return self._journal.due
        # as for journals: at least as many new records as the last compaction kept
        return self.since_compaction >= max(knobs.LOG_COMPACT_RECORDS, self.kept)

    def compact(self, live: list[Record]) -> None:
        """Replace the segment by the live records (the newest state and the steps that
        may still be replayed), and drop the checkpoints nothing refers to any more."""
        self.lease.check(fresh=True)  # it deletes
        self._write_segment(live)
        self.since_compaction, self.kept = 0, len(live)
        keep = {ref for r in live for ref in r.refs()}
        self.drop_unreferenced(keep)

    def release(self, record: Record) -> None:
        """``record`` is superseded: its checkpoints may go once nothing else refers to them."""
        for ref in record.refs():
            left = self._refs.get(ref, 0) - 1
            if left > 0:
                self._refs[ref] = left
                continue
            self._refs.pop(ref, None)
            with contextlib.suppress(OSError, CheckpointNotFound):
                self.checkpointer.delete(ref)

    def tidy(self, replay: Replay) -> None:
        """Remove the checkpoints no live record of ``replay`` refers to, and crash
        leftovers (an execution that opens without writing: a completed one)."""
        referenced = {ref for record in replay.live() for ref in record.refs()}
        with contextlib.suppress(OSError, CorruptCheckpoint):  # housekeeping: gc does the rest
            self.checkpointer._keep_only(referenced)

    def drop_unreferenced(self, keep: set[int]) -> None:
        for ref in [r for r in self._refs if r not in keep]:
            self._refs.pop(ref, None)
            with contextlib.suppress(OSError, CheckpointNotFound):
                self.checkpointer.delete(ref)

    def reset(self) -> None:
        """Forget every record and checkpoint (a finished execution starting over); the
        lease stays."""
        self.close()
        for _, entry in segments(self.store, self.name):
            self.store.delete(f"{self.name}/{entry}")
        remove_steps(self.store, self.name)
        self._refs.clear()
        self._started = False
        self.seq = 0
        self._state = None

    def remove(self) -> None:
        """Delete everything of the name (a finished run), its lease included."""
        self.close()
        remove_name(self.store, self.name)

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None


__all__ = ["Replay", "RunLog", "read_log", "segments"]
