"""The one record envelope of runs, tasks and flows.

Every commit of an execution is a *record*: strict JSON, typed by ``kind``, versioned,
numbered by ``seq`` and stamped with the writer's ``attempt``::

    {"format": "safepoint-record", "version": 2, "kind": "state", "seq": 12, "attempt": 2, ...}

- ``state``: where the execution stands and what it holds: the loop frames it is in, its
  state tree (inline, or a reference to a checkpoint step for large arrays), output
  lengths, progress, completed blocks; with ``complete`` it is the completion record and
  carries the ``result``.
- ``step``: the outcome of one durable step (key, name, status, result or error).
- ``reset``: the steps of a scope from an ordinal on are discarded (a flow rerun from one
  of its steps).

A tree is stored ``{"node": ...}`` (inline nodes of the state-tree format) or
``{"checkpoint": n}`` (step ``n`` of the name's Checkpointer holds it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from safepoint.errors import CorruptCheckpoint

FORMAT = "safepoint-record"
VERSION = 2
Kind = Literal["state", "step", "reset"]
Status = Literal["done", "failed"]


@dataclass
class Frame:
    """One loop the execution is in (outermost first).

    In a scope (the top level, or one item of an enclosing loop), loops are numbered in
    order: ``loop`` is the ordinal of this one. Loops of the same scope with a lower ordinal
    are finished. ``position`` is the number of items completed (for an enclosing frame:
    the index of the item in progress); ``finished``: the loop ran to its end.
    """

    loop: int = 0
    position: int = 0
    total: int | None = None
    fraction: float | None = None
    source: dict[str, Any] | None = None
    finished: bool = False

    def scope(self) -> str:
        """The scope key of the item in progress of this loop (for what is inside it)."""
        return f"{self.loop}:{self.position}"


@dataclass
class Record:
    """One commit of an execution."""

    kind: Kind
    seq: int = 0
    attempt: int = 1
    time: float = 0.0
    # state records
    frames: list[Frame] = field(default_factory=list)
    tree: dict[str, Any] | None = None
    outputs: dict[str, int] = field(default_factory=dict)
    progress: float | None = None
    message: str | None = None
    blocks: list[str] = field(default_factory=list)
    current: str | None = None
    complete: bool = False
    result: dict[str, Any] | None = None
    # step records (key: "<scope>#<ordinal>"), and reset records (key: "<scope>#<from>")
    key: str = ""
    name: str = ""
    status: Status = "done"
    error: str | None = None
    traceback: str | None = None
    started: float | None = None
    duration: float | None = None
    # what the layer above keeps (a task's function and input hash, a flow's step codes)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def position(self) -> int:
        """Items completed in the innermost loop (0 outside any loop)."""
        return self.frames[-1].position if self.frames else 0

    @property
    def source(self) -> dict[str, Any] | None:
        """What the innermost loop recorded reads, and where (for lines: path, offset...)."""
        return self.frames[-1].source if self.frames else None

    @property
    def finished(self) -> bool:
        """The innermost loop recorded ran to its end."""
        return bool(self.frames) and self.frames[-1].finished

    @property
    def fraction(self) -> float | None:
        """Progress: the recorded one, else that of the outermost loop."""
        if self.progress is not None:
            return self.progress
        return self.frames[0].fraction if self.frames else None

    def refs(self) -> list[int]:
        """Checkpoint steps this record refers to."""
        return [t["checkpoint"] for t in (self.tree, self.result)
                if t is not None and "checkpoint" in t]

    def to_json(self) -> bytes:
        """The record as it is written. A record does not change once committed, so its
        encoding is kept (a compaction rewrites many records; each is encoded once)."""
        cached = self.__dict__.get("_encoded")
        if cached is not None and cached[0] == self.seq:
            return cached[1]
        body: dict[str, Any] = {"format": FORMAT, "version": VERSION}
        for item in fields(self):
            body[item.name] = getattr(self, item.name)
        body["frames"] = [vars(frame) for frame in self.frames]
        encoded = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        self.__dict__["_encoded"] = (self.seq, encoded)
        return encoded

    @classmethod
    def from_json(cls, payload: bytes, where: str) -> Record:
        try:
            body = json.loads(payload)
        except (ValueError, RecursionError) as exc:
            raise CorruptCheckpoint(f"{where}: a record is not valid JSON ({exc})", path=where) from exc
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise CorruptCheckpoint(f"{where}: not a safepoint record", path=where)
        if body.get("version") != VERSION:
            raise CorruptCheckpoint(
                f"{where}: record version {body.get('version')!r} is not one this safepoint "
                "reads; it was written by another version", path=where)
        try:
            body.pop("format")
            body.pop("version")
            frames = [Frame(**f) for f in body.pop("frames", [])]
            record = cls(frames=frames, **body)
        except (TypeError, ValueError, AttributeError) as exc:
            raise CorruptCheckpoint(f"{where}: malformed record ({exc})", path=where) from exc
        problem = _problem(record)
        if problem:
            raise CorruptCheckpoint(f"{where}: malformed record: {problem}", path=where)
        return record


def _problem(record: Record) -> str | None:
    if record.kind not in ("state", "step", "reset"):
        return f"unknown kind {record.kind!r}"
    if type(record.seq) is not int or record.seq < 0 or type(record.attempt) is not int:
        return "bad sequence or attempt number"
    for frame in record.frames:
        if not (type(frame.loop) is int and frame.loop >= 0 and type(frame.position) is int
                and frame.position >= 0):
            return "bad loop frame"
    for tree in (record.tree, record.result):
        if tree is not None and not (isinstance(tree, dict) and (
                "node" in tree or type(tree.get("checkpoint")) is int)):
            return "bad tree reference"
    if record.kind != "state" and not isinstance(record.key, str):
        return "bad step key"
    if not isinstance(record.outputs, dict) or not all(
            isinstance(k, str) and type(v) is int and v >= 0 for k, v in record.outputs.items()):
        return "bad output lengths"
    return None


def reachable(scope: str, frames: list[Frame]) -> bool:
    """Whether a resume from ``frames`` may still run code of ``scope`` (a step's scope
    key): the top level, the items in progress on the way in, and every item not counted
    done yet, those after the position included (a crashed attempt may have completed
    steps there). Only the items before the position, and finished loops, are past."""
    for depth, part in enumerate(scope.split("/") if scope else ()):
        if depth >= len(frames):
            return True
        frame = frames[depth]
        loop, _, item = part.partition(":")
        if int(loop) != frame.loop:
            return int(loop) > frame.loop  # an earlier loop of this scope is finished
        if frame.finished:
            return False
        if depth == len(frames) - 1:  # the innermost loop: ``position`` items are done
            return int(item) >= frame.position
        if int(item) != frame.position:  # an enclosing loop: ``position`` is in progress
            return int(item) > frame.position
    return True


__all__ = ["FORMAT", "VERSION", "Frame", "Record", "reachable"]
