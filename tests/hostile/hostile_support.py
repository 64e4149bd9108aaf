"""Helpers for the hostile-store suite: a store with two steps, an attacker's edits."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from safepoint import Checkpointer
from safepoint.checkpointer import CorruptCheckpointWarning
from safepoint.errors import CorruptCheckpoint
from safepoint.format import checksum, verify_checkpoint
from safepoint.format.manifest import encode_manifest
from safepoint.store import LocalStore, Store


def state(step: int) -> dict[str, Any]:
    """A state with two blob-backed arrays (one pack) and inline values."""
    return {"step": step, "w": np.arange(3000, dtype=np.float64) * step,
            "b": np.full((40, 40), step, np.int32), "note": f"step {step}"}


def two_steps(root: Path) -> tuple[LocalStore, Checkpointer]:
    store = LocalStore(root)
    ckpt = Checkpointer("job", location=store)
    ckpt.save(1, state(1))
    ckpt.save(2, state(2))
    Checkpointer("other", location=store).save(5, {"fine": True})
    return store, ckpt


def assert_state(restored: Any, step: int) -> None:
    expected = state(step)
    assert restored.step == step and restored.state["step"] == step
    np.testing.assert_array_equal(restored.state["w"], expected["w"])
    np.testing.assert_array_equal(restored.state["b"], expected["b"])


def restore_falls_back(ckpt: Checkpointer, to: int) -> list[str]:
    """``restore()`` returns step ``to`` (warning about what it skipped); the warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = ckpt.restore()
    assert_state(restored, to)
    messages = [str(w.message) for w in caught if w.category is CorruptCheckpointWarning]
    return messages


def corrupt_error(ckpt: Checkpointer, step: int) -> CorruptCheckpoint:
    try:
        ckpt.restore(step=step)
    except CorruptCheckpoint as error:
        return error
    raise AssertionError(f"restore(step={step}) accepted damaged data")


def write_body_text(store: Store, key: str, text: bytes) -> None:
    """Commit a manifest whose body is ``text`` with a valid checksum (an attacker's file)."""
    data = b'{"crc32c":"' + checksum(text).encode() + b'","manifest":' + text + b"}\n"
    store.commit(key, data, durable=False)


def rewrite(store: Store, name: str, step: int, change: Any) -> None:
    """Edit step ``step``'s manifest (and the newest-step record when it is that step) and
    commit it with a valid checksum."""
    key = f"{name}/{step:012d}.json"
    body = json.loads(store.read(key))["manifest"]
    change(body)
    data = encode_manifest(body)
    store.commit(key, data, durable=False)
    latest = json.loads(store.read(f"{name}/latest.json"))["manifest"]
    if latest["step"] == step:
        store.commit(f"{name}/latest.json", data, durable=False)


def verified(store: Store, name: str, step: int) -> bool:
    return verify_checkpoint(store, name, step).ok


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (not following links) with its contents."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            found[str(path.relative_to(root))] = b"-> " + str(path.readlink()).encode()
        elif path.is_file():
            found[str(path.relative_to(root))] = path.read_bytes()
    return found
