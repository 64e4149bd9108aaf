"""The manifest and its safety: pickle only when allowed, crafted manifests rejected before
anything runs, metadata, verify, and clear save errors."""

from __future__ import annotations

import base64
import errno
import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from safepoint import knobs
from safepoint.checkpointer import Checkpointer
from safepoint.errors import CorruptCheckpoint, SaveFailed, UnsafeCheckpoint
from safepoint.format import prepare, read_manifest, verify_checkpoint, write_checkpoint
from safepoint.format.manifest import encode_manifest
from safepoint.store import LocalStore, Store


class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


class Payload:
    """Unpickling this creates a directory: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def rewrite_manifest(store: Store, name: str, step: int, change: Any) -> None:
    """Edit a committed manifest's body and commit it with a valid checksum (an attacker's
    edit, not damage), in the step's manifest and in the newest-step record."""
    key = f"{name}/{step:012d}.json"
    body = json.loads(store.read(key))["manifest"]
    change(body)
    data = encode_manifest(body)
    store.commit(key, data, durable=False)
    latest = json.loads(store.read(f"{name}/latest.json"))["manifest"]
    if latest["step"] == step:
        store.commit(f"{name}/latest.json", data, durable=False)


def test_pickle_round_trips_only_when_allowed(tmp_path: Path) -> None:
    state = {"model": {"layers": [1, 2, 3, Point(1, 2)]}, "big": [Point(i, i) for i in range(500)]}
    with pytest.raises(Exception, match=r"state\['model'\]\['layers'\]\[3\]: cannot store a Point"):
        Checkpointer("p", location=tmp_path).save(1, state)
    assert Checkpointer("p", location=tmp_path).steps() == []

    Checkpointer("p", location=tmp_path, allow_pickle=True).save(1, state)
    with pytest.raises(UnsafeCheckpoint) as info:
        Checkpointer("p", location=tmp_path).restore()
    assert "state['model']['layers'][3]" in info.value.leaves
    assert "allow_pickle=True" in str(info.value)
    assert Checkpointer("p", location=tmp_path).restore(allow_pickle=True).state == state
    assert Checkpointer("p", location=tmp_path, allow_pickle=True).restore().state == state


def test_loading_a_pickle_without_permission_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = Checkpointer("evil", location=tmp_path / "store", allow_pickle=True)
    ckpt.save(1, {"x": Payload(marker)})
    assert not marker.exists()  # pickling does not run the payload

    with pytest.raises(UnsafeCheckpoint):
        Checkpointer("evil", location=tmp_path / "store").restore()
    with pytest.raises(UnsafeCheckpoint):
        Checkpointer("evil", location=tmp_path / "store").restore(step=1, allow_pickle=False)
    assert not marker.exists()

    Checkpointer("evil", location=tmp_path / "store").restore(allow_pickle=True)
    assert marker.exists()  # the payload was real


@pytest.mark.parametrize("where", ["root", "nested", "dict key", "tuple"])
def test_a_pickle_node_injected_into_a_manifest_is_refused(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "pwned"
    store = LocalStore(tmp_path / "store")
    ckpt = Checkpointer("job", location=store)
    ckpt.save(1, {"a": [1, 2], "b": 3})
    node = {"$": "pickle", "type": "x.Payload",
            "b64": base64.b64encode(pickle.dumps(Payload(marker))).decode()}

    def inject(body: dict[str, Any]) -> None:
        assert body["pickled"] == []  # stays empty: the attacker does not announce it
        if where == "root":
            body["tree"] = node
        elif where == "nested":
            body["tree"]["a"][1] = node
        elif where == "dict key":
            body["tree"] = {"$": "dict", "items": [[node, 1]]}
        else:
            body["tree"] = {"$": "tuple", "items": [1, node]}

    rewrite_manifest(store, "job", 1, inject)
    with pytest.raises(UnsafeCheckpoint):
        ckpt.restore(step=1)
    with pytest.raises(UnsafeCheckpoint):
        ckpt.restore()
    assert not marker.exists()


@pytest.mark.parametrize("dtype", ["O", "|O", "i8,O", {"names": ["a"], "formats": ["O"], "offsets": [0], "itemsize": 8},
                                   {"subdtype": "O", "shape": [2]}])
def test_object_dtypes_in_a_manifest_are_refused(tmp_path: Path, dtype: Any) -> None:
    store = LocalStore(tmp_path)
    ckpt = Checkpointer("job", location=store)
    ckpt.save(1, {"a": np.zeros(2, np.int64), "s": np.int64(1)})

    def set_dtype(body: dict[str, Any]) -> None:
        body["tree"]["a"]["dtype"] = dtype

    rewrite_manifest(store, "job", 1, set_dtype)
    with pytest.raises(CorruptCheckpoint):
        ckpt.restore(step=1)


@pytest.mark.parametrize(("change", "message"), [
    (lambda b: b["files"][0].__setitem__(0, "../../../etc/passwd"), "not a key in the store"),
    (lambda b: b["files"][0].__setitem__(0, "/etc/passwd"), "not a key in the store"),
    (lambda b: b["files"][0].__setitem__(0, "000000000002/a.bin"), "outside the step's own folder"),
    (lambda b: b["files"][0].__setitem__(1, "12"), "bad file entry 0"),
    (lambda b: b["blobs"][0].update(size="12"), "blob 0: bad entry"),
    (lambda b: b["blobs"][0]["ranges"][0].__setitem__(2, 10**9), "runs past the end"),
    (lambda b: b.update(name="other"), "lies in 'job'"),
    (lambda b: b.update(step="1"), "no valid step"),
    (lambda b: b.update(version="1"), "no valid format version"),
    (lambda b: b.update(version=99), "newer safepoint"),
    (lambda b: b.pop("tree"), "no tree"),
    (lambda b: b.update(blobs={}), "not a list"),
    (lambda b: b.update(pickled="state"), "pickled"),
    (lambda b: b.update(format="other"), "not a safepoint manifest"),
])
def test_malformed_manifests_are_corrupt(tmp_path: Path, change: Any, message: str) -> None:
    store = LocalStore(tmp_path)
    ckpt = Checkpointer("job", location=store)
    ckpt.save(1, {"a": np.zeros(1000)})
    rewrite_manifest(store, "job", 1, change)
    with pytest.raises(CorruptCheckpoint, match=message) as info:
        ckpt.restore(step=1)
    assert info.value.path.endswith("job/000000000001.json")
    assert not verify_checkpoint(store, "job", 1).ok


def test_manifest_is_plain_json_with_metadata(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    metadata = {"loss": np.float32(0.25), "epoch": np.int64(3), "tags": ["a"], "nan": float("nan"),
                "inf": [float("-inf")]}
    Checkpointer("job", location=store).save(5, {"x": 1}, metadata=metadata,
                                             extra={"kind": "test", "progress": float("inf")})
    def strict(token: str) -> None:
        raise AssertionError(f"the manifest is not strict JSON: {token}")

    raw = json.loads((tmp_path / "job/000000000005.json").read_text(), parse_constant=strict)
    assert set(raw) == {"crc32c", "manifest"}
    body = raw["manifest"]
    assert body["format"] == "safepoint" and body["version"] == 2 and body["step"] == 5
    assert body["kind"] == "test" and body["tree"] == {"x": 1}
    manifest = read_manifest(store, "job", 5)
    assert manifest.metadata["loss"] == 0.25 and manifest.metadata["epoch"] == 3
    assert manifest.metadata["inf"] == [float("-inf")] and manifest.metadata["tags"] == ["a"]
    assert manifest.metadata["nan"] != manifest.metadata["nan"]


def test_extra_cannot_replace_the_manifest_keys(tmp_path: Path) -> None:
    ckpt = Checkpointer("job", location=tmp_path)
    with pytest.raises(ValueError, match="'step'"):
        ckpt.save(1, {"x": 1}, extra={"step": 99})
    assert ckpt.steps() == []


@pytest.mark.parametrize("metadata", [{"x": object()}, {"x": {1, 2}}, ["not", "a", "dict"]])
def test_metadata_must_be_json(tmp_path: Path, metadata: Any) -> None:
    ckpt = Checkpointer("job", location=tmp_path)
    with pytest.raises(TypeError, match="metadata must be"):
        ckpt.save(1, {"x": 1}, metadata=metadata)
    assert ckpt.steps() == []
    assert LocalStore(tmp_path).list("job/000000000001") == []


def test_verify_reports_each_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knobs, "PACK_BELOW", 1)  # one data file per array
    store = LocalStore(tmp_path)
    ckpt = Checkpointer("job", location=store)
    ckpt.save(1, {"a": np.zeros(2000), "b": np.ones(3000)})
    report = verify_checkpoint(store, "job", 1)
    assert report.ok and report.checked_bytes == 5000 * 8
    files = ckpt.manifest(1).files
    (tmp_path / "job" / files[0][0]).write_bytes(b"short")
    (tmp_path / "job" / files[1][0]).unlink()
    report = verify_checkpoint(store, "job", 1)
    assert len(report.problems) == 2
    assert "5 bytes, expected 16000" in report.problems[0]
    assert "missing" in report.problems[1]
    assert not verify_checkpoint(store, "job", 9).ok


class BrokenStore(LocalStore):
    def __init__(self, root: Path, code: int) -> None:
        super().__init__(root)
        self.code = code

    def write_blob(self, key: str, chunks: Any, *, durable: bool) -> None:
        raise OSError(self.code, os.strerror(self.code), str(self.path(key)))


@pytest.mark.parametrize(("code", "words"), [
    (errno.ENOSPC, "the disk is full"),
    (errno.EDQUOT, "quota"),
    (errno.EACCES, "permission denied"),
    (errno.EROFS, "read-only"),
    (errno.EIO, "Input/output error"),
])
def test_save_errors_say_what_happened(tmp_path: Path, code: int, words: str) -> None:
    store = BrokenStore(tmp_path, code)
    with pytest.raises(SaveFailed) as info:
        write_checkpoint(store, "job", 1, prepare({"a": np.zeros(1000)}), metadata=None)
    error = info.value
    assert words in str(error)
    assert "'job' step 1" in str(error) and "untouched" in str(error)
    assert error.errno == code and error.step == 1 and error.name == "job"
    assert isinstance(error.__cause__, OSError)


def test_the_format_doc_reader_example_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/format.md shows how to read a checkpoint with JSON, base64 and crc32c alone."""
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "format.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", doc, re.S)
    exec(compile(block.replace("/tmp/fmt", str(tmp_path / "fmt")), "format.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "3 0.1 [0. 1. 2.]"
