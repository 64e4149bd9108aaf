"""Helpers of the distributed tests (tests/multirank/): the state every rank saves as a
function of the step, bit-exact comparisons, and the store's shape after ``gc``.

Every value a rank saves is a function of (step, rank, world size), so that the test can
rebuild what any committed step must hold and compare it bit for bit.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np

import safepoint
from safepoint import Checkpointer, PerRank, Shard
from safepoint.format import read_manifest, step_of_folder, step_of_manifest
from safepoint.store import LocalStore

NAME = "job"
ROWS, COLS = 1024, 1280  # a rank's block of "w": float32, 5 MiB (two checksummed ranges)
B_ROWS = 65536  # a rank's block of "b": int64, 0.5 MiB
TINY = 4  # a rank's block of "tiny": inline in the manifest
_RANK_FILE = re.compile(r"\d{8}-\d{1,6}\.json")
_TEMP = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")


def w_block(step: int, rank: int) -> np.ndarray:
    """Rows ``rank * ROWS`` .. of the global float32 array "w" of ``step``."""
    flat = np.arange(rank * ROWS * COLS, (rank + 1) * ROWS * COLS, dtype=np.int64)
    return ((flat % 65521) + step).astype(np.float32).reshape(ROWS, COLS)


def b_block(step: int, rank: int) -> np.ndarray:
    index = np.arange(rank * B_ROWS, (rank + 1) * B_ROWS, dtype=np.int64)
    return index * 1_000_003 ^ step


def tiny_block(step: int, rank: int) -> np.ndarray:
    return np.arange(rank * TINY, (rank + 1) * TINY, dtype=np.int16) + step


def rank_state(step: int, rank: int, world: int) -> dict[str, Any]:
    """What rank ``rank`` of ``world`` saves at ``step``: three sharded arrays, replicated
    values (saved by the coordinator) and a per-rank value."""
    return {
        "w": Shard(w_block(step, rank), (rank * ROWS, 0), (world * ROWS, COLS)),
        "b": Shard(b_block(step, rank), (rank * B_ROWS,), (world * B_ROWS,)),
        "tiny": Shard(tiny_block(step, rank), (rank * TINY,), (world * TINY,)),
        "step": step,
        "meta": {"label": f"step {step}", "world": world},
        "mine": PerRank({"rank": rank, "value": step * 100 + rank}),
    }


def global_state(step: int, world: int) -> dict[str, Any]:
    """What a one-process restore of ``step`` (no target) must return."""
    ranks = range(world)
    return {
        "w": np.concatenate([w_block(step, r) for r in ranks]),
        "b": np.concatenate([b_block(step, r) for r in ranks]),
        "tiny": np.concatenate([tiny_block(step, r) for r in ranks]),
        "step": step,
        "meta": {"label": f"step {step}", "world": world},
        "mine": [{"rank": r, "value": step * 100 + r} for r in ranks],
    }


def assert_tidy(store: Path, name: str = NAME) -> None:
    """After ``gc(min_age=0)`` with no job running, the name's folder holds the committed
    steps (each step folder exactly the files its manifest names), the newest-step record,
    the lease and its lock, and the rank exchange folders (``ranks-*``): ``gc`` keeps their
    files for an hour whatever ``min_age`` (a live job of that launch may still read them;
    see ``collect_garbage``), so they are the one kind of leftover allowed here. Nothing
    else: no data file of a save that did not commit, no temporary file."""
    local = LocalStore(store)
    steps = set(Checkpointer(name, location=store).steps())
    for entry in sorted((store / name).iterdir()):
        if entry.name in ("latest.json", ".lock", "lease"):
            continue
        if entry.name.startswith("ranks-") and entry.is_dir():
            for file in entry.iterdir():
                assert _RANK_FILE.fullmatch(file.name) or _TEMP.fullmatch(file.name), (
                    f"unexpected file {file} in a rank exchange folder")
            continue
        step = step_of_manifest(entry.name) if entry.is_file() else step_of_folder(entry.name)
        assert step is not None and step in steps, f"gc left {entry} (committed: {sorted(steps)})"
        if entry.is_dir():
            named = {rel.rsplit("/", 1)[1] for rel, _ in read_manifest(local, name, step).files}
            assert {f.name for f in entry.iterdir()} == named, f"gc left files in {entry}"


def data_files(store: Path, step: int, name: str = NAME) -> list[str]:
    """The files in ``step``'s data folder (none once a failed save cleaned up)."""
    folder = store / name / f"{step:012d}"
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def assert_clean_after_gc(store: Path, name: str = NAME) -> None:
    """``safepoint.check`` finds no damage; after ``gc`` no leftover either (beyond the
    young rank exchange files, which check does not report), and the folder is tidy."""
    report = safepoint.check(store)
    assert report.ok, str(report)
    Checkpointer(name, location=store).gc()
    report = safepoint.check(store)
    assert report.ok and report.clean, str(report)
    assert_tidy(store, name)


# ------------------------------------------------------------------- faults


def half_then(store: Any, then: Any) -> Any:
    """A ``write_blob`` for ``store`` whose second call writes half the file, then calls
    ``then()`` (which raises, or kills the process)."""
    original, calls = store.write_blob, []

    def write_blob(key: str, chunks: Any, *, durable: bool) -> None:
        calls.append(key)
        if len(calls) < 2:
            return original(key, chunks, durable=durable)
        data = b"".join(bytes(c) for c in chunks)
        original(key, [data[: len(data) // 2]], durable=durable)
        then()

    return write_blob


def disk_full() -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def spoil(scenario: str, state: dict[str, Any], ckpt: Checkpointer, world: int) -> None:
    """Make this rank's save of ``state`` fail the way ``scenario`` says."""
    w = state["w"]
    if scenario == "dtype":
        state["w"] = Shard(w.data.astype(np.float64), w.offsets, w.global_shape)
    elif scenario == "global shape":
        state["w"] = Shard(w.data, w.offsets, (w.global_shape[0] + 8, w.global_shape[1]))
    elif scenario == "unsupported":
        state["mine"] = PerRank(threading.Lock())
    elif scenario == "disk full":
        ckpt.store.write_blob = half_then(ckpt.store, disk_full)  # type: ignore[method-assign]
    elif scenario == "dies":  # in the middle of writing its data, before round 1
        ckpt.store.write_blob = half_then(ckpt.store, die)  # type: ignore[method-assign]
    elif scenario == "dies after round 1":  # before it takes part in round 2
        group: Any = ckpt.group
        group.broadcast = lambda value: die()  # round 2: the coordinator's outcome
    else:
        raise AssertionError(scenario)


def outcome_of(call: Any) -> dict[str, Any]:
    try:
        call()
    except Exception as exc:
        return {"raised": type(exc).__name__, "message": str(exc),
                "errno": getattr(exc, "errno", None)}
    return {"raised": None}
