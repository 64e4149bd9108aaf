"""Layer 1: where bytes live. ``open_store`` picks a backend from a location."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from safepoint.store.base import ABSENT, MARKER, Entry, KeyInfo, Store, check_key, check_name
from safepoint.store.fsspec_store import FsspecStore
from safepoint.store.local import LocalStore

DEFAULT_DIR = ".safepoint"
"""The default store: this directory under the working directory."""

Location = str | os.PathLike[str] | Store | None


def default_location() -> str:
    """``$SAFEPOINT_DIR`` if set, else ``./.safepoint``."""
    return os.environ.get("SAFEPOINT_DIR") or DEFAULT_DIR


def open_store(location: Location = None, *, storage_options: dict[str, Any] | None = None) -> Store:
    """The store at ``location``: a Store, a local path, or an fsspec URL (``s3://...``).

    ``None`` means ``$SAFEPOINT_DIR``, else ``./.safepoint``. ``file://`` URLs and plain
    paths get the local backend, which fsyncs files and directories. ``storage_options``
    configure the filesystem of a URL (credentials, ``client_kwargs={"endpoint_url": ...}``).
    """
    if isinstance(location, Store):
        if storage_options:
            raise ValueError("storage_options apply to a URL, not to a Store instance")
        return location
    if location is None:
        location = default_location()
    text = os.fspath(location)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if "://" in text:
        return FsspecStore(text, **(storage_options or {}))
    if storage_options:
        raise ValueError(
            f"storage_options apply to fsspec URLs (s3://, gs://, memory://...), not to the "
            f"local directory {text!r}")
    return LocalStore(Path(text).expanduser())


__all__ = [
    "ABSENT",
    "DEFAULT_DIR",
    "MARKER",
    "Entry",
    "FsspecStore",
    "KeyInfo",
    "LocalStore",
    "Location",
    "Store",
    "check_key",
    "check_name",
    "default_location",
    "open_store",
]
