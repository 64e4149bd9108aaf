"""LocalStore specifics: the commit protocol step by step, fsync, temp-file cleanup, links."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from safepoint.store import LocalStore
from safepoint.store import local as local_module


def _fail_on(monkeypatch: pytest.MonkeyPatch, name: str, when: Callable[..., bool] = lambda *a: True,
             code: int = errno.EIO) -> list[Any]:
    """Make ``os.<name>`` raise OSError(code) for calls where ``when(*args)`` is true."""
    real = getattr(os, name)
    calls: list[Any] = []

    def fake(*args: Any, **kwargs: Any) -> Any:
        if when(*args):
            calls.append(args)
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(local_module.os, name, fake)
    return calls


def _is_dir_fd(fd: int, *rest: Any) -> bool:
    return os.path.isdir(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else False


@pytest.mark.parametrize("phase", ["writev", "fsync", "replace"])
def test_a_failed_commit_keeps_the_old_value_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, phase: str
) -> None:
    store = LocalStore(tmp_path)
    store.commit("n/manifest.json", b"old", durable=True)
    calls = _fail_on(monkeypatch, phase)
    with pytest.raises(OSError):
        store.commit("n/manifest.json", b"new value", durable=True)
    monkeypatch.undo()
    assert calls
    assert store.read("n/manifest.json") == b"old"
    assert os.listdir(tmp_path / "n") == ["manifest.json"]


def test_a_failed_directory_fsync_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc to tell directory descriptors")
    store = LocalStore(tmp_path)
    store.commit("n/manifest.json", b"old", durable=True)
    calls = _fail_on(monkeypatch, "fsync", _is_dir_fd)
    with pytest.raises(OSError):
        store.commit("n/manifest.json", b"new", durable=True)
    assert calls
    # the rename happened: the caller (write_checkpoint) decides whether to roll it back
    assert store.read("n/manifest.json") == b"new"


def test_a_failed_create_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path)
    store.create("c/x", b"", durable=False)  # make the folder
    store.delete("c/x")
    _fail_on(monkeypatch, "writev", code=errno.ENOSPC)
    with pytest.raises(OSError) as info:
        store.create("c/lock", b"attempt 1", durable=True)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path / "c") == []
    assert store.create("c/lock", b"attempt 2", durable=True) is True


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of the descriptors the local store fsyncs from now on, in order."""
    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc to name the descriptors that were synced")
    synced: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(local_module.os, "fsync", record)
    return synced


def test_durable_writes_fsync_files_and_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path)
    synced = _record_fsyncs(monkeypatch)
    store.write_blob("job/000000000001/a.bin", [b"x"], durable=True)
    store.commit("job/000000000001/manifest.json", b"m", durable=True)
    assert str(tmp_path / "job/000000000001/a.bin") in synced  # the blob's data
    assert str(tmp_path / "job") in synced  # the new step folder's entry
    assert str(tmp_path / "job/000000000001") in synced  # the renamed manifest's entry
    assert any(".manifest.json." in path for path in synced)  # the manifest's data, before rename

    synced.clear()
    store.write_blob("job/000000000002/a.bin", [b"x"], durable=False)
    store.commit("job/000000000002/manifest.json", b"m", durable=False)
    store.create("job/lock", b"1", durable=False)
    assert synced == []


def test_a_durable_lease_ticket_syncs_its_name_not_its_contents(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """After a power loss a ticket is judged by its name and age alone, so only the folder
    that names it is synced (create, by contrast, syncs the data before linking it)."""
    store = LocalStore(tmp_path)
    store.create("job/lease/00000000", b"0", durable=True)  # the folders exist already
    synced = _record_fsyncs(monkeypatch)
    created, lock = store.create_locked("job/lease/00000001", b"ticket", durable=True)
    assert created and lock is not None
    lock.close()
    assert synced == [str(tmp_path / "job/lease")]
    synced.clear()
    assert store.create("job/lease/00000002", b"ticket", durable=True)
    assert len(synced) == 2 and synced[-1] == str(tmp_path / "job/lease")  # data, then the name


def test_map_of_an_empty_file(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.write_blob("e.bin", [], durable=False)
    mapped = store.map("e.bin")
    assert mapped is not None and bytes(mapped) == b""


def test_delete_does_not_follow_a_symlink_out_of_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"keep me")
    store = LocalStore(tmp_path / "store")
    store.commit("job/manifest.json", b"m", durable=False)
    os.symlink(outside, tmp_path / "store" / "job" / "link")
    store.delete("job")
    assert (outside / "precious").read_bytes() == b"keep me"
    assert not (tmp_path / "store" / "job").exists()
