"""What the commands share: the ``--location`` and ``--json`` options, opening a store, and
the translation of every failure into one line and an exit status.

Exit statuses: 0 success, 1 a failure (damage, a missing name, no credentials, no
network), 2 a location or an argument that cannot be used (it does not exist, an unknown
protocol).
"""

from __future__ import annotations

import os
import re
import warnings
from contextvars import ContextVar
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from typer.core import TyperGroup

from safepoint.checkpointer import list_names
from safepoint.cli.output import err, print_error
from safepoint.errors import SafepointError
from safepoint.store import LocalStore, Store, default_location, open_store

USAGE = 2
"""The exit status of a location or argument that cannot be used (as click's own)."""

LOCATION_HELP = "Store: a directory or fsspec URL [default: $SAFEPOINT_DIR or ./.safepoint]"

LocationOption = Annotated[
    Optional[str],  # noqa: UP045 - typer reads this annotation at run time
    typer.Option("--location", "-l", help=LOCATION_HELP, show_default=False),
]
LocationArgument = Annotated[
    Optional[str],  # noqa: UP045
    typer.Argument(help=LOCATION_HELP, show_default=False, metavar="[LOCATION]"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def complete_names(ctx: typer.Context, incomplete: str) -> list[str]:
    """Shell completion of a NAME: the names in the store given so far (or the default)."""
    try:
        params = ctx.params
        store = open_store(params.get("location") or params.get("location_argument") or None)
        return [name for name in list_names(store) if name.startswith(incomplete)]
    except Exception:  # completing must never fail loudly
        return []

_opened: ContextVar[str | None] = ContextVar("safepoint_cli_location", default=None)


class Failed(Exception):
    """A failure already described in one line: print it, exit with ``status``."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def pick_location(argument: str | None, option: str | None) -> str | None:
    """The store of a command that takes it both as an argument and as ``-l``."""
    if argument is not None and option is not None and argument != option:
        raise Failed(f"two locations given ({argument!r} and -l {option!r}); give one", USAGE)
    return argument if argument is not None else option


def open_location(location: str | None) -> Store:
    """The store at ``location`` (None: the default), which must exist: a location that
    does not is a usage error (status 2), not an empty store."""
    text = location or default_location()
    _opened.set(text)
    try:
        store = open_store(text)
    except (ValueError, ImportError) as exc:  # fsspec: unknown protocol, backend not installed
        raise Failed(f"cannot open the store {text!r}: {exc}", USAGE) from exc
    _opened.set(store.url)
    if not store.exists(""):
        how = ("" if location else " (the default store: $SAFEPOINT_DIR, else ./.safepoint; "
               "pass another with -l)")
        raise Failed(f"no store at {store.url}: it does not exist{how}; check the location",
                     USAGE)
    if (store.root.is_file() if isinstance(store, LocalStore) else store.stat("").kind == "file"):
        raise Failed(f"{store.url} is a file, not a store; pass the folder checkpoints are "
                     "saved in", USAGE)
    return store


# ----------------------------------------------------------------- failures

_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                "NoAuthTokenError", "DefaultCredentialsError", "RefreshError",
                "ClientAuthenticationError", "UnauthorizedSSOTokenError", "TokenRetrievalError"}
_NETWORK = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
            "ConnectionClosedError", "ClientConnectorError", "ClientConnectionError",
            "ServerDisconnectedError", "ServerTimeoutError", "ConnectionError", "TimeoutError",
            "gaierror", "ProxyConnectionError", "SSLError", "HTTPClientError"}
_CLICK = {"Exit", "Abort", "ClickException", "TyperException"}
_CREDENTIAL_HINTS = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or run "
          "`aws configure`",
    "gs": "run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS",
    "az": "set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME and a key",
}
_CREDENTIAL_HINTS.update({"s3a": _CREDENTIAL_HINTS["s3"], "gcs": _CREDENTIAL_HINTS["gs"],
                          "abfs": _CREDENTIAL_HINTS["az"], "abfss": _CREDENTIAL_HINTS["az"]})


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _what(exc: BaseException) -> str:
    text = _one_line(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def describe_failure(exc: BaseException) -> tuple[str, int]:
    """One line saying what went wrong and what to do, and the exit status."""
    if isinstance(exc, Failed):
        return str(exc), exc.status
    where = _opened.get() or "the store"
    scheme = where.split("://", 1)[0] if "://" in where else "file"
    for cause in _chain(exc):
        names = _names(cause)
        if names & _CREDENTIALS:
            hint = _CREDENTIAL_HINTS.get(scheme, f"configure the credentials of the fsspec "
                                                 f"backend for {scheme}://")
            return f"cannot read {where}: no usable credentials ({_what(cause)}); {hint}", 1
        if names & _NETWORK:
            endpoint = " and the endpoint (AWS_ENDPOINT_URL)" if scheme in ("s3", "s3a") else ""
            return (f"cannot reach {where}: {_what(cause)}; check the network{endpoint}, "
                    "then try again"), 1
    if isinstance(exc, SafepointError):
        return _one_line(str(exc)), 1
    if isinstance(exc, PermissionError):
        return (f"permission denied on {where}: {_one_line(str(exc))}; check that you may "
                "read (and, to remove, write) it"), 1
    if isinstance(exc, OSError):
        return f"cannot read {where}: {_what(exc)}", 1
    return (f"unexpected {_what(exc)} (SAFEPOINT_DEBUG=1 shows the traceback; please "
            "report it)"), 1


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """A warning (a damaged record skipped, say) as one yellow line on stderr."""
    err().print(f"[yellow]warning: {escape(_one_line(str(message)))}[/]", soft_wrap=True)


class SafeGroup(TyperGroup):
    """The ``safepoint`` group: no command ever ends in a traceback (SAFEPOINT_DEBUG=1 shows
    it for a bug report)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return super().invoke(ctx)
        except Exception as exc:
            # Exit, Abort and usage errors are click's (vendored by newer typer): its own.
            if _names(exc) & _CLICK or os.environ.get("SAFEPOINT_DEBUG"):
                raise
            message, status = describe_failure(exc)
            print_error(message)
            raise typer.Exit(status) from None


__all__ = [
    "USAGE",
    "Failed",
    "JsonOption",
    "LocationArgument",
    "LocationOption",
    "SafeGroup",
    "complete_names",
    "describe_failure",
    "open_location",
    "pick_location",
]
