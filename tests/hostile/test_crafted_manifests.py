"""Crafted manifests, with their checksum recomputed as docs/format.md describes: every one
is a CorruptCheckpoint (never a RecursionError, MemoryError, struct.error, ...), restore
falls back to the intact step, ``verify`` refuses exactly what restore refuses, and the CLI
prints one line. Intact oddities (a 20,000-bit int) are never called damaged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hostile_support import (
    corrupt_error,
    restore_falls_back,
    rewrite,
    two_steps,
    verified,
    write_body_text,
)

from conftest import Invoke
from safepoint import Checkpointer
from safepoint.errors import CorruptCheckpoint


def _set(*path_and_value: Any) -> Any:
    *path, value = path_and_value

    def change(body: dict[str, Any]) -> None:
        node = body
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


def _nest(depth: int) -> Any:
    node: Any = 0
    for _ in range(depth):
        node = {"a": node}
    return node


CASES: dict[str, Any] = {
    "huge data file": _set("files", 0, 1, 3 << 30),
    "negative file size": _set("files", 0, 1, -1),
    "file outside the step": _set("files", 0, 0, "000000000001/x.bin"),
    "file escaping the store": _set("files", 0, 0, "../../etc/passwd"),
    "range past the end": _set("blobs", 0, "ranges", 0, 2, 10**12),
    "range size mismatch": _set("blobs", 0, "size", 7),
    "negative offset": _set("blobs", 0, "ranges", 0, 1, -5),
    "bad crc text": _set("blobs", 0, "ranges", 0, 3, "xyz"),
    "chunk content on a step's own file": lambda body: (body.update(version=5),
                                                        body["blobs"][0]["ranges"][0].append("a" * 64)),
    "chunk content in version 4": lambda body: (body.update(version=4),
                                                body["blobs"][0]["ranges"][0].append("a" * 64)),
    "a sixth range element": lambda body: (body.update(version=5),
                                           body["blobs"][0]["ranges"][0].extend(["a" * 64, 1])),
    "negative shape": _set("tree", "w", "shape", [-1]),
    "overflowing shape": _set("tree", "w", "shape", [2**40, 2**40, 2**40]),
    "too many dims": _set("tree", "w", "shape", [1] * 100),
    "shape of strings": _set("tree", "w", "shape", ["3000"]),
    "unknown tag": _set("tree", "note", {"$": "bogus"}),
    "tag of another type": _set("tree", "note", {"$": 5}),
    "bad base64": _set("tree", "note", {"$": "bytes", "b64": "!!!"}),
    "inline array of the wrong size": _set("tree", "w", {"$": "ndarray", "dtype": "<f8", "shape": [4],
                                                         "order": "C", "b64": "AAAA"}),
    "blob shorter than its shape": _set("tree", "w", "shape", [3001]),
    "blob longer than its shape": _set("tree", "w", "dtype", "<f4"),
    "an F-ordered blob of the wrong size": lambda body: body["tree"]["b"].update(order="F", shape=[40, 41]),
    "bad inline data beside a blob index": lambda body: body["tree"]["w"].update(b64="!!!"),
    "blob index out of range": _set("tree", "w", "blob", 99),
    "blob index not an int": _set("tree", "w", "blob", "0"),
    "unhashable key": _set("tree", "note", {"$": "dict", "items": [[[1, 2], 3]]}),
    "dict item not a pair": _set("tree", "note", {"$": "dict", "items": [[1]]}),
    "object dtype": _set("tree", "w", "dtype", "|O"),
    "unknown dtype": _set("tree", "w", "dtype", "<x9"),
    "unknown ml_dtypes": _set("tree", "w", "dtype", {"ml_dtypes": "float99"}),
    "bad order": _set("tree", "w", "order", "Z"),
    "scalar of the wrong size": _set("tree", "note", {"$": "npscalar", "dtype": "<f8", "b64": "AAAA"}),
    "bad int hex": _set("tree", "note", {"$": "int", "hex": "0xzz"}),
    "bad float bits": _set("tree", "note", {"$": "float", "bits": "12"}),
    "unknown leaf kind": _set("tree", "note", {"$": "leaf", "kind": "evil.Tensor", "attrs": {},
                                               "array": {"$": "ndarray"}}),
    "too deep": _set("tree", "note", _nest(400)),
    "wrong step": _set("step", 3),
    "wrong name": _set("name", "other"),
    "old version": _set("version", 1),
    "newer version": _set("version", 99),
    "metadata not an object": _set("metadata", [1]),
    "bad save id": _set("save_id", "../x"),
}


DATA_LEVEL = {"huge data file"}
"""Cases whose manifest is consistent in itself: only reading the data (restore, verify)
finds them, not ``show``, which reads the manifest alone."""


@pytest.mark.parametrize("case", list(CASES))
def test_a_crafted_manifest_is_damage_everywhere(tmp_path: Path, invoke: Invoke, case: str) -> None:
    root = tmp_path / "store"
    store, _ = two_steps(root)
    rewrite(store, "job", 2, CASES[case])
    ckpt = Checkpointer("job", location=store)
    error = corrupt_error(ckpt, 2)
    assert error.step == 2
    assert not verified(store, "job", 2)  # verify refuses what restore refuses
    assert verified(store, "job", 1)
    messages = restore_falls_back(ckpt, 1)
    assert messages and "step 2" in messages[0]
    result = invoke("show", "job", "--step", "2", "-l", root)
    assert "Traceback" not in result.output
    if case not in DATA_LEVEL:  # show reads the manifest only: damage in it is one line
        assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert invoke("ls", root).exit_code == 0


@pytest.mark.parametrize("text", [
    b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than any parser's recursion
    b'{"format":"safepoint","version":2,"step":NaN}',  # a non-standard constant
    b'"just a string"',
    b"{" + b'"a":1,' * 10 + b"}",  # not JSON at all
])
def test_a_crafted_body_text_is_damage(tmp_path: Path, text: bytes) -> None:
    store, ckpt = two_steps(tmp_path / "store")
    write_body_text(store, "job/000000000002.json", text)
    write_body_text(store, "job/latest.json", text)
    with pytest.raises(CorruptCheckpoint):
        ckpt.restore(step=2)
    assert not verified(store, "job", 2)
    restore_falls_back(Checkpointer("job", location=store), 1)


def test_intact_oddities_are_never_called_damaged(tmp_path: Path, invoke: Invoke) -> None:
    root = tmp_path / "store"
    odd = {"big": 2**20000, "neg": -(7**9000), "nan": float("nan"), "deep": _nest(150),
           "keys": {2**300: "huge key", (1, (2, 3)): "tuple key"}, "empty": np.zeros((0, 3))}
    ckpt = Checkpointer("odd", location=root)
    ckpt.save(1, odd)
    restored = ckpt.restore().state
    assert restored["big"] == 2**20000 and restored["deep"] == odd["deep"]
    assert verified(ckpt.store, "odd", 1)
    result = invoke("verify", "-l", root)
    assert result.exit_code == 0, result.output
    shown = invoke("show", "odd", "-l", root)
    assert shown.exit_code == 0, shown.output
    assert "20001-bit int" in shown.stdout
    info = json.loads(invoke("show", "odd", "-l", root, "--json").stdout)
    assert info["step"] == 1


def test_one_bad_name_never_hides_the_others(tmp_path: Path, invoke: Invoke) -> None:
    root = tmp_path / "store"
    store, _ = two_steps(root)
    for key in ("job/000000000001.json", "job/000000000002.json", "job/latest.json"):
        write_body_text(store, key, b"[" * 50_000 + b"]" * 50_000)
    result = invoke("ls", root, "--json")
    assert result.exit_code == 0, result.output
    entries = {e["name"]: e for e in json.loads(result.stdout)}
    assert entries["job"]["damaged"] and not entries["other"]["damaged"]
    result = invoke("ls", root)
    assert result.exit_code == 0 and "other" in result.stdout and "job" in result.stdout
    result = invoke("verify", "-l", root)
    assert result.exit_code == 1 and "Traceback" not in result.output


def _plain_steps(root: Path) -> tuple[Any, Checkpointer]:
    """Two steps of a plain state whose manifests are long enough to be read without a walk."""
    ckpt = Checkpointer("job", location=root)
    for step in (1, 2):
        ckpt.save(step, {"step": step, "pad": ["x" * 100] * 200, "note": "plain"})
    return ckpt.store, ckpt


def _body_text(store: Any, step: int) -> bytes:
    return json.dumps(json.loads(store.read(f"job/{step:012d}.json"))["manifest"],
                      separators=(",", ":")).encode()


def test_a_plain_manifest_is_read_without_a_walk_and_only_when_it_is_plain(tmp_path: Path) -> None:
    """The read takes a plain tree as the state only when its text holds no "$" (written as
    itself, with spaces around, or escaped) and nests no deeper than a save may write."""
    store, ckpt = _plain_steps(tmp_path)
    assert ckpt.manifest(2).plain_tree and ckpt.restore(2).state["note"] == "plain"
    text = _body_text(store, 2)
    escaped = text.replace(b'"note":"plain"', b'"note":{"\\u0024":"int","hex":"0x5"}')
    spaced = text.replace(b'"note":"plain"', b'"note":{"$" : "int","hex":"0x6"}')
    for body, value in ((escaped, 5), (spaced, 6)):
        write_body_text(store, "job/000000000002.json", body)
        assert not ckpt.manifest(2).plain_tree
        assert ckpt.restore(2).state["note"] == value  # decoded as the tag it is, as by json
    deep = text.replace(b'"note":"plain"', b'"note":' + json.dumps(_nest(400)).encode())
    write_body_text(store, "job/000000000002.json", deep)
    with pytest.raises(CorruptCheckpoint, match="nested more than"):
        ckpt.restore(step=2)
    assert not verified(store, "job", 2)
    assert ckpt.restore(1).state["step"] == 1
