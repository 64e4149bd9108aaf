"""The one error hierarchy of safepoint.

Every error derives from :class:`SafepointError`; where a builtin means the same thing it is
a base too (``CheckpointNotFound`` is a ``FileNotFoundError``), so ``except OSError`` code
keeps working. Errors carry typed fields, declared on each class, and survive pickling, so
they cross process and Dask boundaries intact.

Also here, the conventions every module follows to report to the user: the ``safepoint``
loggers (:func:`logger`), warnings attributed to the user's line (:func:`warn_caller`), and
tracebacks that show the user's frames rather than the engine's (:func:`user_frames`).
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, ParamSpec, TypeVar

from safepoint import knobs

PACKAGE_DIR = str(Path(__file__).resolve().parent)
"""Where safepoint's own code lives (frames from here are not the user's)."""

P = ParamSpec("P")
T = TypeVar("T")


def logger(area: str) -> logging.Logger:
    """The logger of one area of safepoint: ``safepoint.run``, ``safepoint.lease``, ...

    All are children of the ``safepoint`` logger, which has no handler of its own: an
    application that configured logging gets the records where it sends them; one that did
    not sees WARNING and above on stderr (Python's last-resort handler) and nothing else.
    """
    return logging.getLogger(f"safepoint.{area}")


def warn_caller(message: str, category: type[Warning], *, log: logging.Logger | None = None) -> None:
    """``warnings.warn`` attributed to the first frame outside the safepoint package.

    With ``log``, the message is also logged there at WARNING where the application
    configured logging (else Python prints the warning, and would print it twice).
    """
    level = 2
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
    if log is not None and log.hasHandlers():
        log.warning("safepoint: %s", message)


def _is_ours(tb: TracebackType) -> bool:
    return tb.tb_frame.f_code.co_filename.startswith(PACKAGE_DIR)


def trim_traceback(exc: BaseException) -> BaseException:
    """Drop from ``exc``'s traceback safepoint's frames that lie between user frames (an
    engine calling a user's step); frames after the last user frame stay: they say where
    safepoint itself raised. Returns ``exc``, its type, notes and chain untouched."""
    if not knobs.TRIM_TRACEBACKS:
        return exc
    entries: list[TracebackType] = []
    tb = exc.__traceback__
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    last_user = max((i for i, e in enumerate(entries) if not _is_ours(e)), default=-1)
    kept = [e for i, e in enumerate(entries) if i >= last_user or not _is_ours(e)]
    if len(kept) == len(entries):
        return exc
    rebuilt: TracebackType | None = None
    for entry in reversed(kept):
        rebuilt = TracebackType(rebuilt, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return exc.with_traceback(rebuilt)


def user_frames(fn: Callable[P, T]) -> Callable[P, T]:
    """Decorate an entry point that calls user code (a flow's run, a task's call): an
    error leaves it with the engine's frames trimmed (:func:`trim_traceback`), so that the
    traceback goes from the user's call, through this one frame, to the user's code."""
    @functools.wraps(fn)
    def entry(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            trim_traceback(exc)
            raise exc  # safepoint's frames hidden: SAFEPOINT_FULL_TRACEBACKS=1 shows them

    return entry


def async_user_frames(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """:func:`user_frames` for a coroutine function."""
    @functools.wraps(fn)
    async def entry(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except BaseException as exc:
            trim_traceback(exc)
            raise exc  # safepoint's frames hidden: SAFEPOINT_FULL_TRACEBACKS=1 shows them

    return entry


class SafepointError(Exception):
    """Base of every error raised by safepoint.

    The keyword fields given to the constructor become attributes; pickling rebuilds the
    error with every field, not only the message.
    """

    message: str

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        for key, value in fields.items():
            setattr(self, key, value)
        self._fields = tuple(fields)

    def __reduce__(self) -> tuple[Any, ...]:
        # Read the fields back from the attributes: code may update one after raising
        # (e.g. the step of a CorruptCheckpoint), and the copy must carry the new value.
        fields = {key: getattr(self, key) for key in self._fields}
        return (_rebuild, (type(self), self.message, fields))

    def __str__(self) -> str:
        return self.message

    def fields(self) -> dict[str, Any]:
        """The error's typed fields, by name."""
        return {key: getattr(self, key) for key in self._fields}


def _rebuild(cls: type[SafepointError], message: str, fields: dict[str, Any]) -> SafepointError:
    error = cls.__new__(cls)
    SafepointError.__init__(error, message, **fields)
    return error


class InvalidName(SafepointError, ValueError):
    """A checkpoint name or step would escape the store root or is malformed."""

    name: str

    def __init__(self, message: str, *, name: str = "") -> None:
        super().__init__(message, name=name)


class NotAStore(SafepointError, FileNotFoundError):
    """A location that destructive commands refuse: it does not exist, or it is a folder
    safepoint did not create (it carries no store marker)."""

    location: str

    def __init__(self, message: str, *, location: str = "") -> None:
        super().__init__(message, location=location)


class CheckpointNotFound(SafepointError, FileNotFoundError):
    """No committed checkpoint matches the request."""

    name: str
    step: int | None

    def __init__(self, message: str, *, name: str = "", step: int | None = None) -> None:
        super().__init__(message, name=name, step=step)


class CorruptCheckpoint(SafepointError):
    """Stored data failed its integrity check: a checksum, a size, the manifest's syntax or
    structure, or an entry that is not a regular file (a link, a FIFO, a folder)."""

    path: str
    step: int | None
    expected: str | None
    actual: str | None

    def __init__(
        self,
        message: str,
        *,
        path: str = "",
        step: int | None = None,
        expected: str | None = None,
        actual: str | None = None,
    ) -> None:
        super().__init__(message, path=path, step=step, expected=expected, actual=actual)


class UnsafeCheckpoint(SafepointError):
    """Loading would unpickle (execute) data, and ``allow_pickle=True`` was not given."""

    path: str
    leaves: list[str]

    def __init__(self, message: str, *, path: str = "", leaves: list[str] | None = None) -> None:
        super().__init__(message, path=path, leaves=leaves or [])


class UnsupportedType(SafepointError, TypeError):
    """A value in a state tree has a type the format cannot store without pickle (or the
    tree is too deep, or contains itself)."""

    tree_path: str
    type_name: str

    def __init__(self, message: str, *, tree_path: str = "", type_name: str = "") -> None:
        super().__init__(message, tree_path=tree_path, type_name=type_name)

    def within(self, root: str, context: str = "", *, replaces: str = "state") -> UnsupportedType:
        """The same error restated for a tree the user knows by another name: ``root``
        replaces the leading ``replaces`` of the path (``state`` by ``result`` or
        ``data['fit']``), and ``context`` (what was being stored, and why) comes first."""
        path = self.tree_path
        where = root + path[len(replaces):] if path.startswith(replaces) else path
        message = where + self.message[len(path):] if path and self.message.startswith(path) \
            else self.message
        return UnsupportedType(f"{context}: {message}" if context else message,
                               tree_path=where, type_name=self.type_name)


class StepExists(SafepointError, FileExistsError):
    """A save would replace an existing step, or go back before the latest one."""

    name: str
    step: int | None

    def __init__(self, message: str, *, name: str = "", step: int | None = None) -> None:
        super().__init__(message, name=name, step=step)


class SaveFailed(SafepointError, OSError):
    """A save could not complete; the previous checkpoints are untouched.

    ``errno`` is the error number of the underlying ``OSError`` (``errno.ENOSPC`` when the
    disk is full), or None.
    """

    name: str
    step: int | None

    def __init__(
        self, message: str, *, name: str = "", step: int | None = None, errno: int | None = None
    ) -> None:
        super().__init__(message, name=name, step=step, errno=errno)


class WriteConflict(SafepointError):
    """A conditional write found its key changed by another writer since it was read."""

    key: str

    def __init__(self, message: str, *, key: str = "") -> None:
        super().__init__(message, key=key)


class LeaseHeld(SafepointError):
    """Another writer holds the name: a second writer is refused instead of racing it.

    ``holder`` describes it (host, pid, kind, started) and ``heartbeat`` is when it last
    showed it is alive (seconds since the epoch).
    """

    name: str
    holder: dict[str, Any]
    heartbeat: float | None

    def __init__(
        self, message: str, *, name: str = "", holder: dict[str, Any] | None = None,
        heartbeat: float | None = None,
    ) -> None:
        super().__init__(message, name=name, holder=holder or {}, heartbeat=heartbeat)


class StaleAttempt(SafepointError):
    """A newer writer (attempt) has taken this name over; this one may no longer commit,
    complete or delete anything."""

    name: str
    attempt: int
    current: int

    def __init__(self, message: str, *, name: str = "", attempt: int = 0, current: int = 0) -> None:
        super().__init__(message, name=name, attempt=attempt, current=current)


class KindMismatch(SafepointError, ValueError):
    """The name holds records of another kind (a run, a task, a flow, plain checkpoints)."""

    name: str
    found: str
    wanted: str

    def __init__(self, message: str, *, name: str = "", found: str = "", wanted: str = "") -> None:
        super().__init__(message, name=name, found=found, wanted=wanted)


class StateMismatch(SafepointError, ValueError):
    """Saved state does not fit the live object or tree it is being restored into."""

    tree_path: str

    def __init__(self, message: str, *, tree_path: str = "") -> None:
        super().__init__(message, tree_path=tree_path)


class InputChanged(SafepointError):
    """The input a run was reading has changed since its checkpoint."""

    path: str

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message, path=path)


class StepMismatch(SafepointError, ValueError):
    """A step recorded at an index under one name now sits there under another (or is gone):
    reusing its result would be silently wrong."""

    name: str
    index: int
    recorded: str
    current: str

    def __init__(
        self, message: str, *, name: str = "", index: int = 0, recorded: str = "", current: str = ""
    ) -> None:
        super().__init__(message, name=name, index=index, recorded=recorded, current=current)


class SubstepCompleted(SafepointError, RuntimeError):
    """A ``with ctx.substep(name)`` block was entered again after it completed."""

    name: str
    substep: str

    def __init__(self, message: str, *, name: str = "", substep: str = "") -> None:
        super().__init__(message, name=name, substep=substep)


__all__ = [
    "CheckpointNotFound",
    "CorruptCheckpoint",
    "InputChanged",
    "InvalidName",
    "KindMismatch",
    "LeaseHeld",
    "NotAStore",
    "SafepointError",
    "SaveFailed",
    "StaleAttempt",
    "StateMismatch",
    "StepExists",
    "StepMismatch",
    "SubstepCompleted",
    "UnsafeCheckpoint",
    "UnsupportedType",
    "WriteConflict",
]
