"""Drivers for a flow's run, written once as a generator of calls into user code.

The run yields a :class:`Call` for each loader, step and saver; a driver performs it and
sends the result back, or throws the exception back in so that the run can record the
failure before it propagates. :func:`drive` makes plain calls; :func:`adrive` also awaits
what a call returns when it is awaitable, so ``async def`` steps work under ``arun``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Call:
    """One call into user code, performed by the driver."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]


def drive(run: Generator[Call, Any, T]) -> T:
    """Perform each call ``run`` yields; return what ``run`` returns."""
    try:
        call = next(run)
        while True:
            try:
                result = call.fn(*call.args)
                if inspect.isawaitable(result):
                    if inspect.iscoroutine(result):
                        result.close()
                    raise TypeError(f"{call.fn!r} returned an awaitable; run flows with async "
                                    "steps with `await flow.arun(...)`")
            except BaseException as exc:  # handed to the run, which records it and re-raises
                call = run.throw(exc)
            else:
                call = run.send(result)
    except StopIteration as stop:
        return stop.value


async def adrive(run: Generator[Call, Any, T]) -> T:
    """:func:`drive`, awaiting what a call returns when it is awaitable."""
    try:
        call = next(run)
        while True:
            try:
                result = call.fn(*call.args)
                if inspect.isawaitable(result):
                    result = await result
            except BaseException as exc:  # handed to the run, which records it and re-raises
                call = run.throw(exc)
            else:
                call = run.send(result)
    except StopIteration as stop:
        return stop.value
