"""A flow's commits in the store, through the core Checkpointer.

Each commit is one checkpoint step of the flow's name (a counter that only goes up), whose
state tree is ``{"record": <FlowRecord>, "output": <data a step returned, or None>}``. The
newest commit holds the current record; a commit made when a step completed also holds the
data that step returned, and stays as long as the newest record points at it. Everything
else is removed after each commit, so the store holds one copy of each live output plus
one small record.

Parts of a commit are read separately: resuming reads only the newest record, and a step's
output is read when a later step first asks for it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

from safepoint.checkpointer import Checkpointer, CorruptCheckpointWarning
from safepoint.errors import CheckpointNotFound, CorruptCheckpoint, SafepointError
from safepoint.flow.record import FlowRecord
from safepoint.flow.warn import warn_caller
from safepoint.format import load_tree

KIND = "flow"
Event = Literal["start", "done", "failed"]


class FlowLog:
    """Commits of one flow: write a record (with an output), read records and outputs back."""

    def __init__(self, checkpointer: Checkpointer) -> None:
        self.checkpointer = checkpointer

    @property
    def name(self) -> str:
        return self.checkpointer.name

    def next_commit(self) -> int:
        latest = self.checkpointer.latest_step()
        return 0 if latest is None else latest + 1

    def commit(
        self, number: int, record: FlowRecord, *, event: Event, step: str, total: int,
        output: Any = None,
    ) -> None:
        """Commit ``record`` (and ``output``) as ``number``, then drop what it no longer needs."""
        done = record.frontier
        extra = {"kind": KIND, "progress": done / total if total else 1.0, "table": record.table()}
        self.checkpointer.save(
            number, {"record": record.to_tree(), "output": output},
            metadata={"event": event, "step": step, "done": done, "total": total}, extra=extra)
        keep = record.outputs() | {number}
        for old in self.checkpointer.steps():
            if old not in keep:
                # The commit stands either way; what is left now goes at the next commit.
                with contextlib.suppress(OSError):
                    self.checkpointer.delete(old)

    def latest(self) -> tuple[int, FlowRecord] | None:
        """The newest intact commit and its record; a damaged one is skipped with a warning."""
        for number in reversed(self.checkpointer.steps()):
            try:
                tree = self._read_part(number, "record")
                return number, FlowRecord.from_tree(tree, f"{self._where(number)}")
            except CorruptCheckpoint as exc:
                warn_caller(f"skipping damaged flow commit {self.name!r} step {number}: {exc}",
                            CorruptCheckpointWarning)
        return None

    def output(self, number: int, step: str) -> Any:
        """The data that ``step`` returned, stored in commit ``number``."""
        try:
            return self._read_part(number, "output")
        except (CorruptCheckpoint, CheckpointNotFound) as exc:
            raise type(exc)(
                f"the data returned by step {step!r} of flow {self.name!r} cannot be read: {exc}; "
                f"rerun that step with run(start_at={step!r})", **_fields(exc)) from exc

    def _where(self, number: int) -> str:
        return f"{self.checkpointer.store.url}/{self.name}/{number:012d}"

    def _read_part(self, number: int, part: str) -> Any:
        """Decode one top-level part of a commit's tree, reading only the blobs it uses."""
        manifest = self.checkpointer.manifest(number)
        kind = manifest.body.get("kind")
        tree = manifest.body.get("tree")
        if kind != KIND or not isinstance(tree, dict) or part not in tree:
            raise NotAFlow(
                f"{self.name!r} in {self.checkpointer.store.url} holds checkpoints that are not "
                f"a flow's (kind {kind!r}); give the flow another name, or remove them with "
                f"`safepoint rm {self.name}`", name=self.name)
        return load_tree(self.checkpointer.store, manifest, node=tree[part],
                         allow_pickle=self.checkpointer.allow_pickle).tree


class NotAFlow(SafepointError, ValueError):
    """The flow's name holds checkpoints written by something else."""

    def __init__(self, message: str, *, name: str = "") -> None:
        super().__init__(message, name=name)


def _fields(exc: SafepointError) -> dict[str, Any]:
    return {key: getattr(exc, key) for key in exc._fields}
