"""Links and special files inside a store: never followed, never read, never hung on.

A link or a FIFO sits where safepoint expects one of its own files or folders (a name, a
step's data folder, a data file, a step manifest, the newest-step record), pointing at a
faithful copy outside the store, into a loop, or nowhere. Each time: nothing outside the
store is read, changed or deleted, no message reveals the checksum of an outside file,
the damage is a CorruptCheckpoint, a restore falls back to the intact step, ``verify``
reports it, and ``ls``, ``gc`` and ``rm`` keep working for the other names.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
from hostile_support import assert_state, corrupt_error, restore_falls_back, snapshot, two_steps

from conftest import Invoke
from safepoint import Checkpointer
from safepoint.errors import CorruptCheckpoint, SafepointError
from safepoint.format import checksum

WHERE = {
    "name": "job",
    "data folder": "job/000000000002",
    "data file": None,  # the pack of step 2, found at run time
    "step manifest": "job/000000000002.json",
    "newest-step record": "job/latest.json",
}


def _entry(root: Path, where: str) -> Path:
    if where == "data file":
        return next((root / "job" / "000000000002").iterdir())
    return root / WHERE[where]


def _replace_by_link(root: Path, outside: Path, where: str, target: str) -> Path:
    """Move the entry out (a faithful copy outside) and put a link where it was."""
    entry = _entry(root, where)
    copy = outside / entry.relative_to(root)
    if target == "outside copy":
        copy.parent.mkdir(parents=True, exist_ok=True)
        if entry.is_dir():
            shutil.copytree(entry, copy)
        else:
            shutil.copy2(entry, copy)
    if entry.is_dir():
        shutil.rmtree(entry)
    else:
        entry.unlink()
    if target == "outside copy":
        entry.symlink_to(copy)
    elif target == "loop":
        entry.symlink_to(entry.name)  # a link to itself
    else:
        entry.symlink_to(outside / "nothing-here")
    return copy


def _crcs(root: Path) -> set[str]:
    return {checksum(p.read_bytes()) for p in root.rglob("*") if p.is_file()}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("target", ["outside copy", "loop", "dangling"])
@pytest.mark.parametrize("where", list(WHERE))
def test_a_link_is_never_followed(tmp_path: Path, invoke: Invoke, where: str, target: str) -> None:
    root, outside = tmp_path / "store", tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    store, ckpt = two_steps(root)
    _replace_by_link(root, outside, where, target)
    before, outside_crcs = snapshot(outside), _crcs(outside)

    errors: list[str] = []
    if where == "name":
        with pytest.raises(CorruptCheckpoint) as info:
            Checkpointer("job", location=store).restore()
        errors.append(str(info.value))
        assert "symbolic link" in str(info.value)
    elif where == "newest-step record":
        assert_state(Checkpointer("job", location=store).restore(), 2)  # the listing finds it
    elif where == "step manifest":  # the newest-step record is an intact copy of it
        ckpt = Checkpointer("job", location=store)
        errors.append(str(corrupt_error(ckpt, 2)))
        assert_state(ckpt.restore(), 2)
    else:
        ckpt = Checkpointer("job", location=store)
        errors.append(str(corrupt_error(ckpt, 2)))
        errors += restore_falls_back(ckpt, 1)
    for error in errors:  # nothing read outside: no outside checksum in any message
        assert not any(crc in error for crc in outside_crcs), error

    result = invoke("verify", "-l", root, "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    bad = {r["name"] for r in report["results"] if not r["ok"]}
    assert bad == {"job"}
    assert all(not any(crc in p for crc in outside_crcs) for r in report["results"] for p in r["problems"])

    listing = invoke("ls", root, "--json")
    assert listing.exit_code == 0 and {e["name"] for e in json.loads(listing.stdout)} >= {"job", "other"}
    assert invoke("gc", "--min-age", "0", "-l", root).exit_code == 0
    assert snapshot(outside) == before
    result = invoke("rm", "job", "-l", root)
    assert result.exit_code == 0, result.output
    assert snapshot(outside) == before  # a link is removed, never what it points at
    assert not (root / "job").exists() or not any((root / "job").rglob("*"))
    assert Checkpointer("other", location=store).restore().state == {"fine": True}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["fifo", "folder"])
@pytest.mark.parametrize("where", ["data file", "step manifest", "newest-step record"])
def test_a_special_file_is_never_read(tmp_path: Path, invoke: Invoke, where: str, kind: str) -> None:
    root = tmp_path / "store"
    store, _ = two_steps(root)
    entry = _entry(root, where)
    entry.unlink()
    if kind == "fifo":
        os.mkfifo(entry)  # a read of it would block forever
    else:
        entry.mkdir()
    ckpt = Checkpointer("job", location=store)
    if where == "newest-step record":
        assert_state(ckpt.restore(), 2)
    else:
        error = corrupt_error(ckpt, 2)
        assert ("FIFO" in str(error) or "folder" in str(error)), error
        if where == "step manifest":  # the newest-step record is an intact copy of it
            assert_state(ckpt.restore(), 2)
        else:
            restore_falls_back(ckpt, 1)
    result = invoke("verify", "-l", root)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert invoke("ls", root).exit_code == 0
    assert invoke("show", "job", "-l", root).exit_code in (0, 1)
    assert invoke("gc", "--min-age", "0", "-l", root).exit_code == 0
    assert entry.exists()  # not safepoint's file: gc leaves it


def test_a_stray_entry_named_like_a_step_keeps_the_name_usable(tmp_path: Path, invoke: Invoke) -> None:
    root = tmp_path / "store"
    store, ckpt = two_steps(root)
    (root / "job" / "000000000009.json").write_bytes(b"not a manifest")
    (root / "job" / "000000000010.json").mkdir()
    (root / "job" / "000000000011").write_bytes(b"a file where a data folder would be")
    assert ckpt.steps() == [1, 2]
    assert_state(ckpt.restore(), 2)
    (root / "job" / "latest.json").unlink()  # now the listing decides: strays are skipped
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert_state(Checkpointer("job", location=store).restore(), 2)
    assert invoke("ls", root).exit_code == 0
    ckpt = Checkpointer("job", location=store)
    ckpt.save(20, {"after": True})
    assert ckpt.restore().state == {"after": True}


def test_a_data_file_path_that_is_a_file_is_damage_not_a_crash(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store, _ = two_steps(root)
    folder = root / "job" / "000000000002"
    shutil.rmtree(folder)
    folder.write_bytes(b"a file where the data folder was")
    ckpt = Checkpointer("job", location=store)
    with pytest.raises(SafepointError):
        ckpt.restore(step=2)
    restore_falls_back(ckpt, 1)
