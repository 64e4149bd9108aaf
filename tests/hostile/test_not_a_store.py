"""Commands that delete act only inside a store and only on what safepoint wrote."""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile_support import snapshot, two_steps

import safepoint
from conftest import Invoke
from safepoint import Checkpointer
from safepoint.errors import InvalidName


def _project(root: Path) -> None:
    """A user's project folder: all-digit folders and a src/ among them."""
    for rel in ("data/2024/01.csv", "data/000000000001/x.bin", "src/main.py", "src/a1b2c3d4e5f6-0.bin"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("user data")


def test_gc_and_rm_refuse_a_folder_that_is_not_a_store(tmp_path: Path, invoke: Invoke) -> None:
    project = tmp_path / "proj"
    _project(project)
    before = snapshot(project)
    for args in (("gc", "--min-age", "0", "-l", project), ("rm", "src", "-l", project),
                 ("rm", "data", "-l", project)):
        result = invoke(*args)
        assert result.exit_code == 1, result.output
        assert "not a safepoint store" in result.stderr and result.stderr.count("\n") == 1
    assert snapshot(project) == before
    result = invoke("gc", "-l", tmp_path / "missing")  # a typo: a usage error, status 2
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_inside_a_store_only_what_safepoint_wrote_is_touched(tmp_path: Path, invoke: Invoke) -> None:
    root = tmp_path / "store"
    two_steps(root)
    _project(root)  # user folders inside the store, some named like safepoint's
    (root / "job" / "notes.txt").write_text("mine")
    user = {k: v for k, v in snapshot(root).items() if k.startswith(("data", "src")) or k.endswith("notes.txt")}
    assert invoke("gc", "--min-age", "0", "-l", root).exit_code == 0
    result = invoke("rm", "data", "-l", root)
    assert result.exit_code == 1 and "nothing safepoint wrote is named 'data'" in result.stderr
    result = invoke("rm", "job", "-l", root)
    assert result.exit_code == 0 and "kept job/notes.txt: not written by safepoint" in result.stdout
    after = snapshot(root)
    assert all(after.get(k) == v for k, v in user.items())
    assert sorted(p.name for p in (root / "job").iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("name", ["../x", "a/../../x", "../../etc/job"])
def test_shorthand_names_never_climb_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidName, match=r"'\.\.'"):
        Checkpointer(name)
    with pytest.raises(InvalidName, match=r"'\.\.'"):
        safepoint.resume(name)
    assert list(tmp_path.iterdir()) == []
