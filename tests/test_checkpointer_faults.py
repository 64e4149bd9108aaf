"""Fault injection at every phase of a save, and a disk that fills up.

Each phase of a local save (blob write, blob fsync, new folder fsync, manifest write,
manifest fsync, rename, directory fsync, retention) is made to fail with EIO or ENOSPC.
Each time: the error says what happened, nothing half-written is visible (the steps are
unchanged, the previous step restores exactly, no manifest of the failed step), nothing was
deleted, and a later save succeeds and leaves a clean store after gc.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import safepoint
from safepoint.checkpointer import Checkpointer
from safepoint.errors import CheckpointNotFound, SaveFailed, StaleAttempt
from safepoint.format import verify_checkpoint
from safepoint.store import LocalStore
from safepoint.store import local as local_module

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs /proc to name descriptors")

STEP1_FOLDER = "job/000000000001"
STEP2_FOLDER = "job/000000000002"


def _state(step: int) -> dict[str, Any]:
    return {"step": step, "w": np.full(20_000, step, np.float64), "b": np.arange(3000) * step,
            "meta": {"lr": 0.1 * step}}


def _assert_restores(ckpt: Checkpointer, step: int) -> None:
    restored = ckpt.restore(step=step)
    expected = _state(step)
    assert restored.state["step"] == step and restored.state["meta"] == expected["meta"]
    np.testing.assert_array_equal(restored.state["w"], expected["w"])
    np.testing.assert_array_equal(restored.state["b"], expected["b"])


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


class Faults:
    """Makes chosen ``os`` calls of LocalStore raise OSError(code)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
        self.monkeypatch, self.code = monkeypatch, code
        self.hits: list[str] = []

    def arm(self, name: str, when: Callable[..., bool]) -> None:
        real = getattr(os, name)

        def faulty(*args: Any, **kwargs: Any) -> Any:
            if when(*args):
                self.hits.append(name)
                raise OSError(self.code, os.strerror(self.code))
            return real(*args, **kwargs)

        self.monkeypatch.setattr(local_module.os, name, faulty)

    def disarm(self) -> None:
        self.monkeypatch.undo()


def _blob_fd(fd: int, *rest: Any) -> bool:
    return _fd_path(fd).endswith(".bin")


def _manifest_fd(fd: int, *rest: Any) -> bool:
    return ".000000000002.json." in os.path.basename(_fd_path(fd))


def _folder_fd(folder: str) -> Callable[..., bool]:
    return lambda fd, *rest: _fd_path(fd).endswith(folder)


def _latest_names(fd: int, step: Any) -> bool:
    """Whether ``fd`` is the name's folder and latest.json already names ``step``."""
    if not _fd_path(fd).endswith("/job"):
        return False
    with contextlib.suppress(OSError, ValueError, KeyError):
        latest = json.loads(Path(_fd_path(fd), "latest.json").read_bytes())
        return bool(latest["manifest"]["tree"]["step"] == step)
    return False


PHASES: dict[str, tuple[str, Callable[..., bool]]] = {
    "blob write": ("writev", _blob_fd),
    "blob fsync": ("fsync", _blob_fd),
    "new step folder fsync": ("fsync", _folder_fd("/job")),
    "step folder fsync": ("fsync", _folder_fd(f"/{STEP2_FOLDER}")),
    "manifest write": ("writev", _manifest_fd),
    "manifest fsync": ("fsync", _manifest_fd),
    # a new step's manifest is linked into place: link() refuses to replace another's
    "manifest link": ("link", lambda src, dst, *rest: str(dst) == "000000000002.json"),
    "latest rename": ("replace", lambda src, dst, *rest: str(dst) == "latest.json"),
    "directory fsync": ("fsync", lambda fd, *rest: _latest_names(fd, 2)),
}


WRITER = {"lease", ".lock"}  # the writer's lease, and the lock of its conditional commits


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _assert_clean(store: LocalStore, ckpt: Checkpointer) -> None:
    """Every step verifies, and its folder holds exactly its data files."""
    ckpt.gc()
    for step in ckpt.steps():
        assert verify_checkpoint(store, "job", step).ok
        expected = {rel.rsplit("/", 1)[1] for rel, _ in ckpt.manifest(step).files}
        assert set(store.list(f"job/{step:012d}")) == expected
    assert set(store.list("job")) - WRITER == {f"{s:012d}" for s in ckpt.steps()} | {
        f"{s:012d}.json" for s in ckpt.steps()} | {"latest.json"}
    report = safepoint.check(store)
    assert report.ok and report.clean, report.findings


@pytest.fixture
def saved(tmp_path: Path) -> tuple[LocalStore, Checkpointer]:
    store = LocalStore(tmp_path)
    ckpt = Checkpointer("job", location=store, keep=1)
    ckpt.save(1, _state(1))
    return store, ckpt


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
@pytest.mark.parametrize("phase", PHASES)
def test_a_fault_in_any_phase_leaves_the_previous_checkpoint(
    saved: tuple[LocalStore, Checkpointer], monkeypatch: pytest.MonkeyPatch, phase: str, code: int
) -> None:
    store, ckpt = saved
    faults = Faults(monkeypatch, code)
    faults.arm(*PHASES[phase])
    with pytest.raises(SaveFailed) as info:
        ckpt.save(2, _state(2))
    faults.disarm()
    assert faults.hits, f"the {phase} fault never fired"
    error = info.value
    assert error.errno == code and error.step == 2 and isinstance(error.__cause__, OSError)
    assert ("disk is full" if code == errno.ENOSPC else "Input/output error") in str(error)
    assert "previous checkpoints are untouched" in str(error)

    assert ckpt.steps() == [1]  # keep=1 did not delete step 1: retention never ran
    _assert_restores(ckpt, 1)
    assert not store.exists(f"{STEP2_FOLDER}.json")
    with pytest.raises(CheckpointNotFound):
        ckpt.restore(step=2)
    assert store.list(STEP2_FOLDER) == []  # the failed save removed what it wrote

    ckpt.save(2, _state(2))
    assert ckpt.steps() == [2]
    _assert_restores(ckpt, 2)
    _assert_clean(store, ckpt)


def test_a_fault_when_overwriting_keeps_the_old_version(
    saved: tuple[LocalStore, Checkpointer], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, ckpt = saved
    before = _files(store.root)
    faults = Faults(monkeypatch, errno.EIO)
    faults.arm("fsync", lambda fd, *rest: _latest_names(fd, "replacement"))  # after the renames
    with pytest.raises(SaveFailed):
        ckpt.save(1, {"step": "replacement"}, overwrite=True)
    faults.disarm()
    assert faults.hits
    _assert_restores(ckpt, 1)
    assert _files(store.root) == before


def test_when_cleaning_up_fails_too_gc_removes_the_leftovers(
    saved: tuple[LocalStore, Checkpointer], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, ckpt = saved
    faults = Faults(monkeypatch, errno.EIO)
    faults.arm("fsync", _blob_fd)
    faults.arm("unlink", lambda path, *rest: str(path).endswith(".bin"))
    with pytest.raises(SaveFailed):
        ckpt.save(2, _state(2))
    faults.disarm()
    leftovers = store.list(STEP2_FOLDER)
    assert leftovers and all(f.endswith(".bin") for f in leftovers)
    assert ckpt.steps() == [1]
    _assert_restores(ckpt, 1)
    removed = ckpt.gc()
    assert removed == [STEP2_FOLDER]
    ckpt.save(2, _state(2))
    _assert_restores(ckpt, 2)
    _assert_clean(store, ckpt)


def test_a_fault_in_retention_keeps_every_visible_step_whole(
    saved: tuple[LocalStore, Checkpointer], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, ckpt = saved
    faults = Faults(monkeypatch, errno.EIO)
    faults.arm("unlink", lambda path, *rest: str(path) == "000000000001.json")
    with pytest.raises(SaveFailed, match="step 2 was committed, but removing old steps failed"):
        ckpt.save(2, _state(2))
    faults.disarm()
    assert faults.hits
    assert ckpt.steps() == [1, 2]  # a manifest that could not be removed keeps its step whole
    for step in ckpt.steps():
        _assert_restores(ckpt, step)
    ckpt.save(3, _state(3))
    assert ckpt.steps() == [3]
    _assert_clean(store, ckpt)
    assert [e for e in store.list("job") if e not in WRITER] == [
        "000000000003", "000000000003.json", "latest.json"]


def test_a_fault_removing_the_data_of_a_removed_step_never_fails_a_save(
    saved: tuple[LocalStore, Checkpointer], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, ckpt = saved
    ckpt.save(2, _state(2))  # step 1 is gone; its data goes at the next save
    assert ckpt.steps() == [2] and store.list(STEP1_FOLDER)
    faults = Faults(monkeypatch, errno.EIO)
    faults.arm("unlink", lambda path, *rest: str(path).endswith(".bin"))
    ckpt.save(3, _state(3))
    ckpt.wait()  # the removal runs in a thread of its own, which wait() joins
    faults.disarm()
    assert faults.hits and store.list(STEP1_FOLDER)  # still there: housekeeping failed
    assert ckpt.steps() == [3]
    _assert_restores(ckpt, 3)
    _assert_clean(store, ckpt)  # gc removes it
    assert not store.exists(STEP1_FOLDER)


def test_a_fence_that_refuses_the_commit_leaves_nothing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    allowed = [True]

    def fence() -> None:
        if not allowed[0]:
            raise StaleAttempt("attempt 1 was taken over by attempt 2", name="job", attempt=1, current=2)

    ckpt = Checkpointer("job", location=store, keep=1, fence=fence)
    ckpt.save(1, _state(1))
    before = _files(tmp_path)
    allowed[0] = False
    with pytest.raises(StaleAttempt):
        ckpt.save(2, _state(2))
    assert set(_files(tmp_path)) - set(before) <= {STEP2_FOLDER}  # at most an empty folder
    assert store.list(STEP2_FOLDER) == []
    _assert_restores(ckpt, 1)


# -------------------------------------------------------------------- disk full


@contextlib.contextmanager
def _quota(monkeypatch: pytest.MonkeyPatch, limit: int) -> Iterator[None]:
    """Pretend the disk has ``limit`` bytes free: writes beyond them fail with ENOSPC
    (after a short write, as a real file system does)."""
    used = [0]
    real = os.write

    def writev(fd: int, buffers: Any) -> int:
        room = limit - used[0]
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        data = b"".join(bytes(b) for b in buffers)
        written = real(fd, data[:room])
        used[0] += written
        return written

    monkeypatch.setattr(local_module.os, "writev", writev)
    try:
        yield
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("free", [0, 1000, 160_000, 184_000])  # in the blobs, or the manifest
def test_a_full_disk_fails_the_save_cleanly(
    saved: tuple[LocalStore, Checkpointer], monkeypatch: pytest.MonkeyPatch, free: int
) -> None:
    store, ckpt = saved
    before = _files(store.root)
    with _quota(monkeypatch, free), pytest.raises(SaveFailed, match="the disk is full") as info:
        ckpt.save(2, _state(2))
    assert info.value.errno == errno.ENOSPC
    assert _files(store.root) in (before, sorted([*before, STEP2_FOLDER]))
    _assert_restores(ckpt, 1)
    ckpt.save(2, _state(2))  # space is back
    _assert_restores(ckpt, 2)
    _assert_clean(store, ckpt)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, where this process may mount one (root on Linux); else skip."""
    mount_point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                                capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("cannot run mount here")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode(errors='replace').strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def test_a_real_disk_that_fills_up(tiny_disk: Path) -> None:
    store = LocalStore(tiny_disk / "store")
    ckpt = Checkpointer("job", location=store, keep=1)
    ckpt.save(1, _state(1))
    filler = tiny_disk / "filler"
    with open(filler, "wb") as f:  # leave about 100 KB free
        f.write(b"\0" * (2 * 1024 * 1024 - 100_000 - sum(p.stat().st_size for p in tiny_disk.rglob("*.bin"))))
    with pytest.raises(SaveFailed, match="the disk is full") as info:
        ckpt.save(2, _state(2))
    assert info.value.errno == errno.ENOSPC
    assert ckpt.steps() == [1]
    _assert_restores(ckpt, 1)
    assert store.list(STEP2_FOLDER) == []

    filler.unlink()  # free the space
    ckpt.save(2, _state(2))
    assert ckpt.steps() == [2]
    _assert_restores(ckpt, 2)
    _assert_clean(store, ckpt)
