"""Damage to any byte of a checkpoint is detected, every time.

A small checkpoint (a manifest of about 2 KB and one blob of about 4 KB) is damaged at every
byte position (XOR 0x01 and 0xFF) and truncated at every length. Each time,
``restore(step=2)`` raises CorruptCheckpoint naming the damaged file, and ``restore()``
warns and falls back to the intact step 1, exactly.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from safepoint import check, knobs
from safepoint.checkpointer import Checkpointer, CorruptCheckpointWarning
from safepoint.errors import CorruptCheckpoint
from safepoint.format import checksum, verify_checkpoint
from safepoint.store import LocalStore

INLINE_LIMIT = 4096


def _state(step: int) -> dict[str, object]:
    return {
        "step": step,
        "weights": np.arange(INLINE_LIMIT // 8 + 20, dtype=np.float64) * step,  # one blob
        "bias": np.full(40, step, dtype=np.int32),  # inline
        "names": ["alpha", "beta", ("gamma", step)],
        "nested": {"lr": 0.001 * step, "nan": float("nan"), 7: b"seven"},
    }


@pytest.fixture(params=["read at load", "prefetched"])
def damaged(tmp_path: Path, request: pytest.FixtureRequest,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Checkpointer, Path]]:
    """Two steps; step 2 is damaged by the test. Restores read the data files after
    decoding the tree, or (as for a manifest of many arrays) on a thread beside it."""
    if request.param == "prefetched":
        monkeypatch.setattr(knobs, "PREFETCH_BLOBS", 1)
    store = LocalStore(tmp_path)
    ckpt = Checkpointer("job", location=store)
    ckpt.save(1, _state(1), metadata={"note": "intact"})
    ckpt.save(2, _state(2), metadata={"note": "to be damaged"})
    yield ckpt, tmp_path / "job"


STEP1 = _state(1)


def _corrupt_error(ckpt: Checkpointer, step: int) -> CorruptCheckpoint:
    """The error of ``restore(step=step)``, which must be CorruptCheckpoint (a plain try:
    pytest.raises is slow for sweeps of thousands of cases)."""
    try:
        ckpt.restore(step=step)
    except CorruptCheckpoint as error:
        return error
    raise AssertionError(f"restore(step={step}) accepted damaged data")


def _expected_step1(ckpt: Checkpointer) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = ckpt.restore()
    assert restored.step == 1
    assert [w.category for w in caught] == [CorruptCheckpointWarning]
    assert "step 2" in str(caught[0].message)
    state = restored.state
    assert state["step"] == 1 and restored.metadata == {"note": "intact"}
    assert np.array_equal(state["weights"], STEP1["weights"])
    assert np.array_equal(state["bias"], STEP1["bias"])


def _damage_in_place(path: Path) -> Iterator[tuple[str, bytes]]:
    """Damage ``path`` one way at a time, in place, and yield (what, damaged contents);
    the file is whole again afterwards. (Rewriting the file for each case would be slow:
    file systems flush a file that is truncated and rewritten.)"""
    original = path.read_bytes()
    fd = os.open(path, os.O_RDWR)
    try:
        for position in range(len(original)):
            for mask in (0x01, 0xFF):
                damaged = bytearray(original)
                damaged[position] ^= mask
                os.pwrite(fd, damaged[position : position + 1], position)
                yield f"byte {position} ^ {mask:#04x}", bytes(damaged)
            os.pwrite(fd, original[position : position + 1], position)
        for length in reversed(range(len(original))):
            os.ftruncate(fd, length)
            yield f"truncated to {length}", original[:length]
        os.pwrite(fd, original, 0)
    finally:
        os.close(fd)
    assert path.read_bytes() == original


def _blob(ckpt: Checkpointer, folder: Path) -> tuple[Path, int, str]:
    """The one data file of step 2: its path, size and checksum."""
    manifest = ckpt.manifest(2)
    ((rel, size),) = manifest.files
    ((_, _, _, crc),) = manifest.blobs[0]["ranges"]
    return folder / rel, size, crc


def _files(ckpt: Checkpointer, folder: Path) -> list[Path]:
    return [folder / "000000000002.json", _blob(ckpt, folder)[0]]


def test_every_damaged_byte_of_the_manifest_is_detected(damaged: tuple[Checkpointer, Path]) -> None:
    ckpt, folder = damaged
    path = folder / "000000000002.json"
    assert 500 < path.stat().st_size < 4000
    for what, _ in _damage_in_place(path):
        error = _corrupt_error(ckpt, 2)
        assert error.path.endswith("job/000000000002.json"), what
        assert error.step == 2, what
        _expected_step1(ckpt)
    assert ckpt.restore().step == 2


def test_every_damaged_byte_of_a_blob_is_detected(damaged: tuple[Checkpointer, Path]) -> None:
    ckpt, folder = damaged
    path, size, crc = _blob(ckpt, folder)
    assert path.stat().st_size == size > INLINE_LIMIT
    for what, data in _damage_in_place(path):
        error = _corrupt_error(ckpt, 2)
        assert error.path.endswith(f"job/000000000002/{path.name}"), what
        assert path.name in str(error), what
        if len(data) == size:
            assert (error.expected, error.actual) == (crc, checksum(data)), what
        else:
            assert (error.expected, error.actual) == (str(size), str(len(data))), what
        _expected_step1(ckpt)
    assert ckpt.restore().step == 2


def test_damage_is_detected_through_mmap_and_verify(damaged: tuple[Checkpointer, Path]) -> None:
    ckpt, folder = damaged
    store = LocalStore(folder.parent)
    for path in _files(ckpt, folder):
        original = path.read_bytes()
        for position in range(0, len(original), 61):
            data = bytearray(original)
            data[position] ^= 0x01
            path.write_bytes(data)
            with pytest.raises(CorruptCheckpoint):
                ckpt.restore(step=2, mmap=True)
            report = verify_checkpoint(store, "job", 2)
            assert not report.ok and path.name in report.problems[0]
        path.write_bytes(original)
        assert verify_checkpoint(store, "job", 2).ok


def test_a_missing_or_extra_file(damaged: tuple[Checkpointer, Path]) -> None:
    ckpt, folder = damaged
    blob = _blob(ckpt, folder)[0]
    original = blob.read_bytes()
    blob.write_bytes(original + b"\0")  # longer than recorded
    with pytest.raises(CorruptCheckpoint, match="expected"):
        ckpt.restore(step=2)
    blob.unlink()
    with pytest.raises(CorruptCheckpoint, match="missing"):
        ckpt.restore(step=2)
    _expected_step1(ckpt)
    (folder / "000000000002.json").unlink()  # no manifest: step 2 was never committed
    assert ckpt.steps() == [1]


def test_when_every_step_is_damaged_restore_says_so(damaged: tuple[Checkpointer, Path]) -> None:
    ckpt, folder = damaged
    for manifest in ("000000000002.json", "000000000001.json", "latest.json"):
        (folder / manifest).write_bytes(b"{}")
    with warnings.catch_warnings(record=True), pytest.raises(CorruptCheckpoint, match="every checkpoint"):
        warnings.simplefilter("always")
        ckpt.restore()


def test_a_damaged_blob_never_lands_in_an_array_being_filled(damaged: tuple[Checkpointer, Path]) -> None:
    ckpt, folder = damaged
    blob = _blob(ckpt, folder)[0]
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(data)
    target = np.full_like(STEP1["weights"], -1.0)
    with pytest.raises(CorruptCheckpoint):
        ckpt.restore(step=2, into={"weights": target})
    assert (target == -1.0).all()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        restored = ckpt.restore(into={"weights": target})
    assert restored.step == 1 and restored.state["weights"] is target
    assert np.array_equal(target, STEP1["weights"])


def test_many_arrays_are_read_beside_the_decoding_and_a_failed_read_is_damage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safepoint.format.read import FileSet

    many = {f"a{i}": np.full(1500, i, np.float32) for i in range(knobs.PREFETCH_BLOBS)}
    ckpt = Checkpointer("many", location=tmp_path)
    ckpt.save(1, many)
    ckpt.save(2, {k: v + 1 for k, v in many.items()})
    prefetched: list[str] = []
    prefetch = FileSet.prefetch

    def counting(self: FileSet) -> None:
        prefetched.append(self.manifest.key)
        prefetch(self)

    monkeypatch.setattr(FileSet, "prefetch", counting)
    restored = ckpt.restore(step=1).state
    assert prefetched == ["many/000000000001.json"]
    assert all(np.array_equal(restored[k], v) for k, v in many.items())
    assert all(restored[k].flags.writeable for k in many)

    step2 = sorted((tmp_path / "many" / "000000000002").iterdir())
    read_range = LocalStore.read_range

    def vanishing(self: LocalStore, key: str, offset: int, buffer: object) -> int:
        if "000000000002/" in key:  # removed after the restore looked at it
            raise FileNotFoundError(key)
        return read_range(self, key, offset, buffer)  # type: ignore[arg-type]

    monkeypatch.setattr(LocalStore, "read_range", vanishing)
    error = _corrupt_error(ckpt, 2)
    assert "data file is missing" in str(error) and error.step == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ckpt.restore().step == 1
    assert [w.category for w in caught] == [CorruptCheckpointWarning]
    assert step2 and all(p.exists() for p in step2)
    monkeypatch.undo()
    assert check(tmp_path).ok
