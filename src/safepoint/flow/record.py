"""What a flow remembers between runs, read from its log: the outcome of each step (a
durable step record whose result is the state after the step, and whose ``tree`` is the
data it returned), and the initial state."""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from safepoint.errors import StepMismatch
from safepoint.run.record import Record

Status = Literal["done", "failed", "pending"]

class StepChangedWarning(UserWarning):
    """The code of a completed step changed since it ran; its recorded result is reused."""


@dataclass(frozen=True)
class FlowView:
    """A flow as its log records it: the outcome of each step it ran (by index), and the
    initial state it started from."""

    steps: dict[int, Record]
    """The newest outcome of each step, by index (done or failed); a missing index is pending."""
    initial: dict[str, Any] | None = None
    """The state the first step received (None before the flow first ran)."""
    names: tuple[str, ...] = ()
    """The step names registered when the flow last ran."""

    @property
    def frontier(self) -> int:
        """How many steps, from the first, are done."""
        count = 0
        while count in self.steps and self.steps[count].status == "done":
            count += 1
        return count

    def name(self, index: int) -> str | None:
        record = self.steps.get(index)
        if record is not None:
            return record.name
        return self.names[index] if index < len(self.names) else None


def step_index(record: Record) -> int | None:
    """The index of a flow step from its record's key (``#3`` -> 3)."""
    scope, _, ordinal = record.key.rpartition("#")
    return int(ordinal) if scope == "" and ordinal.isdigit() else None


def format_when(started: float | None) -> str | None:
    """A wall-clock time as local ISO 8601 to the second, for tables."""
    return None if started is None else datetime.fromtimestamp(started).isoformat(timespec="seconds")


def check_reused(flow: str, view: FlowView, names: Sequence[str], upto: int) -> None:
    """Refuse to reuse a recorded step whose place now holds another step (or nothing)."""
    for index in range(upto):
        recorded = view.steps[index].name
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


def changed_steps(view: FlowView, codes: Sequence[str], upto: int) -> list[int]:
    """Indexes below ``upto`` whose recorded code differs from the code registered now."""
    return [i for i in range(upto) if view.steps[i].extra.get("code") != codes[i]]


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
