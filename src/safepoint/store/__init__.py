"""Layer 1: where bytes live. ``open_store`` picks a backend from a location."""

from __future__ import annotations

import os
from pathlib import Path

from safepoint.store.base import KeyInfo, Store, check_key, check_name
from safepoint.store.fsspec_store import FsspecStore
from safepoint.store.local import LocalStore

DEFAULT_DIR = ".safepoint"
"""The default store: this directory under the working directory."""

Location = str | os.PathLike[str] | Store | None


def default_location() -> str:
    """``$SAFEPOINT_DIR`` if set, else ``./.safepoint``."""
    return os.environ.get("SAFEPOINT_DIR") or DEFAULT_DIR


def open_store(location: Location = None) -> Store:
    """The store at ``location``: a Store, a local path, or an fsspec URL (``s3://...``).

    ``None`` means ``$SAFEPOINT_DIR``, else ``./.safepoint``. ``file://`` URLs and plain
    paths get the local backend, which fsyncs files and directories.
    """
    if isinstance(location, Store):
        return location
    if location is None:
        location = default_location()
    text = os.fspath(location)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if "://" in text:
        return FsspecStore(text)
    return LocalStore(Path(text).expanduser())


__all__ = [
    "DEFAULT_DIR",
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
