"""What a flow remembers between runs: one entry per step, and the state each step received.

The record is small and plain: it is committed with every step and read back whole on a
resume. Records are values; every change returns a new one, so a record that failed to
commit never leaks into the next commit.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal

from safepoint.errors import CorruptCheckpoint, StepMismatch

RECORD_VERSION = 1
Status = Literal["done", "failed", "pending"]
_TRACEBACK_LIMIT = 20_000




class StepChangedWarning(UserWarning):
    """The code of a completed step changed since it ran; its recorded result is reused."""


@dataclass(frozen=True)
class StepRecord:
    """The last outcome of one step."""

    name: str
    status: Status = "pending"
    code: str | None = None  # hash of the step's code when it last ran
    started: float | None = None  # wall-clock time it last started
    duration: float | None = None  # seconds
    error: str | None = None  # "ValueError: bad input"
    traceback: str | None = None
    output: int | None = None  # the commit holding the data it returned; None if it returned None

    def to_tree(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "code": self.code,
                "started": self.started, "duration": self.duration, "error": self.error,
                "traceback": self.traceback, "output": self.output}

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> StepRecord:
        status = tree["status"]
        if status not in ("done", "failed", "pending"):
            raise ValueError(f"unknown step status {status!r}")
        return cls(name=str(tree["name"]), status=status, code=tree.get("code"),
                   started=tree.get("started"), duration=tree.get("duration"),
                   error=tree.get("error"), traceback=tree.get("traceback"),
                   output=tree.get("output"))


@dataclass(frozen=True)
class FlowRecord:
    """Steps in order, and ``states[i]``: the state step ``i`` received.

    Steps ``0 .. frontier-1`` are done; the step at ``frontier`` is failed or pending, and
    the rest are pending. ``states`` holds ``frontier + 1`` entries once the flow has
    started (the last one is the final state when every step is done), none before.
    """

    steps: tuple[StepRecord, ...] = ()
    states: tuple[dict[str, Any], ...] = ()

    @property
    def frontier(self) -> int:
        """How many steps, from the first, are done."""
        count = 0
        for step in self.steps:
            if step.status != "done":
                break
            count += 1
        return count

    def outputs(self) -> set[int]:
        """The commits holding data returned by the steps that are done."""
        return {s.output for s in self.steps[: self.frontier] if s.output is not None}

    def restarted(self, start: int, names: Sequence[str], first_state: dict[str, Any]) -> FlowRecord:
        """Steps from ``start`` on become pending (a failure at ``start`` stays on show until
        the step runs again); ``first_state`` is the state step ``start`` will receive."""
        frontier = self.frontier
        steps = list(self.steps[:start])
        for index in range(start, len(names)):
            old = self.steps[index] if index < len(self.steps) else None
            keep = old is not None and index == start == frontier and old.name == names[index]
            steps.append(old if keep and old is not None else StepRecord(names[index]))
        return FlowRecord(tuple(steps), (*self.states[:start], first_state))

    def done(self, index: int, step: StepRecord, state_after: dict[str, Any]) -> FlowRecord:
        """Step ``index`` completed; ``state_after`` is what the next step receives."""
        steps = (*self.steps[:index], step, *self.steps[index + 1 :])
        return FlowRecord(steps, (*self.states[: index + 1], state_after))

    def failed(self, index: int, step: StepRecord) -> FlowRecord:
        """Step ``index`` raised; the state it received stays recorded as ``states[index]``."""
        return FlowRecord((*self.steps[:index], step, *self.steps[index + 1 :]), self.states)

    def table(self) -> list[dict[str, Any]]:
        """The rows ``safepoint show`` prints: step, status, duration, when, error."""
        return [{"step": s.name, "status": s.status,
                 "duration": None if s.duration is None else round(s.duration, 3),
                 "when": format_when(s.started), "error": s.error} for s in self.steps]

    def to_tree(self) -> dict[str, Any]:
        return {"version": RECORD_VERSION, "steps": [s.to_tree() for s in self.steps],
                "states": list(self.states)}

    @classmethod
    def from_tree(cls, tree: Any, where: str) -> FlowRecord:
        """Parse a stored record; damage raises :class:`CorruptCheckpoint` naming ``where``."""
        try:
            version = int(tree["version"])
            if version > RECORD_VERSION:
                raise CorruptCheckpoint(
                    f"{where}: flow record version {version} was written by a newer safepoint; "
                    "upgrade safepoint to resume this flow", path=where)
            steps = tuple(StepRecord.from_tree(s) for s in tree["steps"])
            states = tuple(tree["states"])
            if not all(isinstance(s, dict) for s in states):
                raise ValueError("a recorded state is not a dict")
        except CorruptCheckpoint:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpoint(f"{where}: malformed flow record ({exc!r})", path=where) from exc
        return cls(steps, states)


def format_when(started: float | None) -> str | None:
    """A wall-clock time as local ISO 8601 to the second, for tables."""
    return None if started is None else datetime.fromtimestamp(started).isoformat(timespec="seconds")


def failure(step: StepRecord, exc: BaseException, traceback_text: str) -> StepRecord:
    """``step`` marked failed with ``exc``: its output (if any) is gone."""
    text = traceback_text[-_TRACEBACK_LIMIT:]
    return replace(step, status="failed", error=f"{type(exc).__name__}: {exc}",
                   traceback=text, output=None)


def check_reused(flow: str, record: FlowRecord, names: Sequence[str], upto: int) -> None:
    """Refuse to reuse a recorded step whose place now holds another step (or nothing)."""
    for index in range(upto):
        recorded = record.steps[index].name
        current = names[index] if index < len(names) else None
        if recorded == current:
            continue
        now = f"is now {current!r}" if current is not None else f"no longer exists (the flow has {len(names)} steps)"
        where = f"step {index}"
        raise StepMismatch(
            f"flow {flow!r}: {where} completed as {recorded!r} but {now}; safepoint will not "
            f"reuse the result of {recorded!r} for another step. Rerun from there with "
            f"run(start_at={index}), or start over with flow.reset() (or `safepoint rm {flow}`)",
            name=flow, index=index, recorded=recorded, current=current or "")


def changed_steps(record: FlowRecord, codes: Sequence[str], upto: int) -> list[int]:
    """Indexes below ``upto`` whose recorded code differs from the code registered now."""
    return [i for i in range(upto) if record.steps[i].code != codes[i]]


@dataclass(frozen=True)
class StepStatus:
    """One row of :meth:`Flow.status`."""

    index: int
    name: str
    status: Status
    duration: float | None = None
    when: datetime | None = None
    error: str | None = None
    traceback: str | None = None
    changed: bool = False  # done, but the code registered now differs from the code that ran
    returned_data: bool = False  # the step's returned data is stored


def code_hash(fn: Callable[..., Any]) -> str:
    """A fingerprint of a function's code that ignores comments and formatting.

    The source's syntax tree when the source is available; else the source text; else
    the bytecode with its constants and names (functions built at run time).
    """
    fn = inspect.unwrap(fn)
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None) or getattr(type(fn).__call__, "__code__", None)
        data = _code_bytes(code) if code is not None else repr(fn).encode()
    else:
        try:
            data = ast.dump(ast.parse(source)).encode()
        except SyntaxError:  # e.g. a lambda cut out of a longer expression
            data = source.encode()
    return hashlib.sha256(data).hexdigest()[:16]


def _code_bytes(code: types.CodeType) -> bytes:
    parts = [code.co_code, repr(code.co_names).encode()]
    for const in code.co_consts:
        parts.append(_code_bytes(const) if isinstance(const, types.CodeType) else repr(const).encode())
    return b"\0".join(parts)
