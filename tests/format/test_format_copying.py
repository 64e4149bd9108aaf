"""Large copies and checksum checks split across threads give what one thread gives.

The thresholds are lowered so that arrays of a few hundred KiB take the threaded paths: an
asynchronous save's snapshot, ``restore(into=...)``, and the checks of a large restore. A
damaged byte is found whichever thread's share it falls in, and nothing damaged reaches a
target.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from safepoint import Checkpointer, check, knobs
from safepoint.errors import CorruptCheckpoint
from safepoint.format.copying import copy_into


@pytest.fixture
def threaded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Small thresholds for the threaded paths; the names of the copy helpers started."""
    monkeypatch.setattr(knobs, "COPY_PART_BYTES", 64 << 10)
    monkeypatch.setattr(knobs, "COPY_THREADS", 3)
    monkeypatch.setattr(knobs, "PARALLEL_BYTES", 256 << 10)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    started: list[str] = []
    start = threading.Thread.start

    def noted(self: threading.Thread) -> None:
        started.append(self.name)
        start(self)

    monkeypatch.setattr(threading.Thread, "start", noted)
    return started


@pytest.mark.parametrize("shape", [(100_003,), (3, 33_335), (7, 11, 1301)])
@pytest.mark.parametrize("dtype", ["<f4", "<u2", "<c16", "V3"])
def test_a_threaded_copy_is_the_copy(threaded: list[str], shape: tuple[int, ...], dtype: str) -> None:
    rng = np.random.default_rng(0)
    source = np.frombuffer(rng.bytes(int(np.prod(shape)) * np.dtype(dtype).itemsize),
                           dtype).reshape(shape)
    target = np.zeros_like(source)
    copy_into(target, source)
    assert target.tobytes() == source.tobytes()
    assert threaded.count("safepoint-copy") == 2  # three shares: the caller's and two helpers'


def test_what_cannot_be_split_is_one_copy_that_raises_as_numpy_does(threaded: list[str]) -> None:
    source = np.arange(200_000, dtype=np.float32)
    strided = np.zeros(400_000, np.float32)[::2]
    copy_into(strided, source)  # not contiguous: one np.copyto
    assert np.array_equal(strided, source) and "safepoint-copy" not in threaded
    with pytest.raises(TypeError):
        copy_into(np.zeros(200_000, np.float64), source)  # casting="no", as before
    small = np.zeros(10, np.float32)
    copy_into(small, np.ones(10, np.float32))
    assert small.sum() == 10 and "safepoint-copy" not in threaded


def test_a_helper_threads_error_is_raised_in_the_caller(threaded: list[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    copyto = np.copyto
    calls = []

    def failing_in_helpers(target: np.ndarray, source: np.ndarray, **options: Any) -> None:
        calls.append(threading.current_thread().name)
        if threading.current_thread().name == "safepoint-copy":
            raise MemoryError("a helper failed")
        copyto(target, source, **options)

    monkeypatch.setattr(np, "copyto", failing_in_helpers)
    with pytest.raises(MemoryError, match="a helper failed"):
        copy_into(np.zeros(200_000, np.float32), np.ones(200_000, np.float32))
    assert calls.count("safepoint-copy") == 2


def _state() -> dict[str, Any]:
    rng = np.random.default_rng(1)
    return {f"w{i}": rng.standard_normal(40_000).astype(np.float32) for i in range(6)}  # 160 KB each


def test_async_snapshot_and_restore_into_on_threads_are_exact(tmp_path: Path, threaded: list[str]) -> None:
    state = _state()
    ckpt = Checkpointer("job", location=tmp_path)
    saved = {k: v.copy() for k, v in state.items()}
    ckpt.save(1, state, blocking=False)
    for value in state.values():  # the snapshot was taken: the caller may change its arrays
        value += 1.0
    ckpt.wait()
    assert threaded.count("safepoint-copy") >= 6  # each 160 KB array split between two threads
    targets = {k: np.full_like(v, -1.0) for k, v in saved.items()}
    ckpt.restore(into=targets)
    assert all(np.array_equal(targets[k], saved[k]) for k in saved)
    plain = ckpt.restore().state
    assert all(np.array_equal(plain[k], saved[k]) for k in saved)
    ckpt.close()
    assert check(tmp_path).ok


@pytest.mark.parametrize("victim", ["w0", "w3", "w5"])
def test_damage_is_found_in_every_share_and_never_lands(tmp_path: Path, threaded: list[str],
                                                        victim: str) -> None:
    state = _state()
    ckpt = Checkpointer("job", location=tmp_path)
    ckpt.save(1, state)
    manifest = ckpt.manifest(1)
    blob = next(b for b in manifest.blobs if b["path"].endswith(f"['{victim}']"))
    fi, offset, length, *_ = blob["ranges"][0]
    path = tmp_path / "job" / manifest.files[fi][0]
    with path.open("r+b") as f:
        f.seek(offset + length // 2)
        byte = f.read(1)
        f.seek(offset + length // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    targets = {k: np.full_like(v, -1.0) for k, v in state.items()}
    with pytest.raises(CorruptCheckpoint, match=victim):
        ckpt.restore(step=1, into=targets)
    assert all((t == -1.0).all() for t in targets.values())  # all or nothing
    with pytest.raises(CorruptCheckpoint, match=victim):
        ckpt.restore(step=1)
    ckpt.close()
    assert not check(tmp_path).ok
