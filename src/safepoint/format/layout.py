"""Where things live inside a name's folder, and which entries safepoint itself writes.

::

    <store>/.safepoint-store                  the store marker
    <store>/<name>/latest.json                the newest step's manifest (a hard link to it,
                                              or a copy on object stores): the O(1) lookup
    <store>/<name>/<step>.json                one manifest per committed step (12+ digits)
    <store>/<name>/<step>/<save id>-<k>.bin   the step's data files: packs and large blobs
    <store>/<name>/run-<gen>.journal          a run's log, one per writer (local stores)
    <store>/<name>/log-<gen>/<seq>.rec|.snap  a run's log, one per writer (object stores)
    <store>/<name>/lease/<gen>[.released]     the writers' lease tickets
    <store>/<name>/ranks-<run>/<seq>-<rank>.json  a distributed job's exchange (StoreGroup)
    <store>/<name>/.<...>.tmp, .lock          temporary files and the folder's lock

``gc``, ``rm`` and retention delete only entries that match these names; anything else in a
store (a user's folder, a stray file) is left alone and reported.
"""

from __future__ import annotations

import re

LATEST = "latest.json"
LOCK = ".lock"
LEASE = "lease"

_STEP_MANIFEST = re.compile(r"(\d{12,20})\.json")
_STEP_FOLDER = re.compile(r"\d{12,20}")
_DATA_FILE = re.compile(r"[0-9a-f]{12}-\d{1,9}\.bin")
_TEMP = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")
_RANK_FOLDER = re.compile(r"ranks-[0-9a-f]{12}")
_RANK_FILE = re.compile(r"\d{8}-\d{1,6}\.json")
_JOURNAL = re.compile(r"run-(\d{8})\.journal")
_SEGMENT = re.compile(r"log-(\d{8})")


def step_text(step: int) -> str:
    """A step as it appears in names: zero-padded to 12 digits, so listings sort."""
    return f"{step:012d}"


def manifest_key(name: str, step: int) -> str:
    return f"{name}/{step:012d}.json"


def latest_key(name: str) -> str:
    return f"{name}/{LATEST}"


def data_folder(name: str, step: int) -> str:
    return f"{name}/{step:012d}"


def step_of_manifest(entry: str) -> int | None:
    """The step of a manifest file name (``000000000012.json`` -> 12), else None."""
    match = _STEP_MANIFEST.fullmatch(entry)
    return int(match.group(1)) if match else None


def step_of_folder(entry: str) -> int | None:
    """The step of a data folder name (``000000000012`` -> 12), else None."""
    return int(entry) if _STEP_FOLDER.fullmatch(entry) else None


def is_data_file(entry: str) -> bool:
    """Whether a file in a step's folder has the name of a data file safepoint writes."""
    return _DATA_FILE.fullmatch(entry) is not None


def rank_folder(run: str) -> str:
    """The folder where the ranks of launch ``run`` (12 hex digits) exchange their parts
    of a distributed save (``safepoint.StoreGroup``)."""
    return f"ranks-{run}"


def is_rank_folder(entry: str) -> bool:
    return _RANK_FOLDER.fullmatch(entry) is not None


def is_rank_file(entry: str) -> bool:
    """A file of a rank exchange folder (``<seq>-<rank>.json``)."""
    return _RANK_FILE.fullmatch(entry) is not None


def journal_name(generation: int) -> str:
    """The local log file of writer ``generation``."""
    return f"run-{generation:08d}.journal"


def segment_name(generation: int) -> str:
    """The object-store log folder of writer ``generation``."""
    return f"log-{generation:08d}"


def generation_of_segment(entry: str) -> int | None:
    """The writer generation of a log entry (a journal file or a log folder), else None."""
    match = _JOURNAL.fullmatch(entry) or _SEGMENT.fullmatch(entry)
    return int(match.group(1)) if match else None


def is_temp(entry: str) -> bool:
    """Whether an entry is one of safepoint's temporary files (``.x.<12 hex>.tmp``)."""
    return _TEMP.fullmatch(entry) is not None


__all__ = ["LATEST", "LEASE", "LOCK", "data_folder", "generation_of_segment", "is_data_file",
           "is_rank_file", "is_rank_folder", "is_temp", "journal_name", "latest_key", "manifest_key", "rank_folder", "segment_name",
           "step_of_folder", "step_of_manifest", "step_text"]
