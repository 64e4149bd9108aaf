"""Names and keys cannot escape the store root; ``open_store`` picks the backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from safepoint.errors import InvalidName
from safepoint.store import FsspecStore, LocalStore, check_key, check_name, open_store

GOOD_NAMES = ["a", "train", "run_1", "exp-2.b", "_private", "0", "x" * 200, "A.b_c-D"]
BAD_NAMES = ["", ".", "..", "../x", "a/b", "/abs", ".hidden", "-flag", "a\x00b", "a\nb",
             "abc\n", "a b", "a\\b", "a..b", "é", "x" * 201, "a:b", "*"]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names_pass(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_rejected_with_the_name(name: str) -> None:
    with pytest.raises(InvalidName) as info:
        check_name(name)
    assert info.value.name == name
    assert repr(name) in str(info.value)


@pytest.mark.parametrize("name", [None, 3, b"abc", ["a"]])
def test_non_str_names_are_rejected(name: object) -> None:
    with pytest.raises(InvalidName, match="must be a str"):
        check_name(name)  # type: ignore[arg-type]


def test_keys_allow_a_hidden_last_component_only() -> None:
    assert check_key("job/000000000001/.manifest.json.1234.tmp")
    assert check_key("job/000000000001/manifest.json")
    for key in ["job/.x/manifest.json", ".job/a", "job/..", "job/.", "job/", "/job", "job//a"]:
        with pytest.raises(InvalidName):
            check_key(key)


def test_local_store_paths_stay_under_the_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    assert store.path("") == tmp_path
    assert store.path("a/b.bin") == tmp_path / "a" / "b.bin"
    for key in ["../x", "a/../../x", "/etc/passwd"]:
        with pytest.raises(InvalidName):
            store.path(key)


def test_open_store_chooses_the_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = open_store(tmp_path / "s")
    assert isinstance(local, LocalStore) and local.root == tmp_path / "s"
    assert isinstance(open_store(f"file://{tmp_path}/u"), LocalStore)
    assert open_store(f"file://{tmp_path}/u").root == tmp_path / "u"
    memory = open_store("memory://open-store-test")
    assert isinstance(memory, FsspecStore)
    assert open_store(memory) is memory

    monkeypatch.setenv("SAFEPOINT_DIR", str(tmp_path / "env"))
    assert open_store(None).root == tmp_path / "env"
    monkeypatch.delenv("SAFEPOINT_DIR")
    monkeypatch.chdir(tmp_path)
    assert open_store(None).root == tmp_path / ".safepoint"

    monkeypatch.setenv("HOME", str(tmp_path))
    assert open_store("~/ck").root == tmp_path / "ck"


def test_storage_options_only_apply_to_urls(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fsspec URLs"):
        open_store(tmp_path, storage_options={"anon": True})
    with pytest.raises(ValueError, match="Store instance"):
        open_store(LocalStore(tmp_path), storage_options={"anon": True})
    store = open_store("memory://with-options", storage_options={"use_listings_cache": False})
    assert isinstance(store, FsspecStore)
