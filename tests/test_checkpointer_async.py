"""Asynchronous saves: return before writing, snapshot the state, one in flight, errors
surface at the next call, and interpreter exit waits for the save in flight."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from safepoint.checkpointer import Checkpointer
from safepoint.errors import SaveFailed
from safepoint.store import LocalStore
from safepoint.store.base import Buffer


class GatedStore(LocalStore):
    """Blob writes wait until ``gate`` is set; ``writing`` is set when one is waiting."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.writing = threading.Event()

    def write_blob(self, key: str, chunks: Iterable[Buffer], *, durable: bool) -> None:
        self.writing.set()
        assert self.gate.wait(timeout=60), "the test never opened the gate"
        super().write_blob(key, chunks, durable=durable)


class FailingStore(LocalStore):
    """Blob writes of chosen steps fail with EIO."""

    def __init__(self, root: Path, failing_steps: set[int]) -> None:
        super().__init__(root)
        self.failing_steps = failing_steps

    def write_blob(self, key: str, chunks: Iterable[Buffer], *, durable: bool) -> None:
        if int(key.split("/")[1]) in self.failing_steps:
            raise OSError(5, "Input/output error")
        super().write_blob(key, chunks, durable=durable)


def test_save_returns_before_writing(tmp_path: Path) -> None:
    store = GatedStore(tmp_path)
    ckpt = Checkpointer("job", location=store)
    ckpt.save(1, {"w": np.ones(100_000)}, blocking=False)
    assert store.writing.wait(timeout=60)
    assert ckpt.steps() == []  # returned while the blob write is still held
    store.gate.set()
    ckpt.wait()
    assert ckpt.steps() == [1]
    assert (ckpt.restore().state["w"] == 1).all()


def test_changes_after_save_returns_are_not_saved(tmp_path: Path) -> None:
    store = GatedStore(tmp_path)
    ckpt = Checkpointer("job", location=store)
    weights = np.arange(100_000, dtype=np.float64)
    fortran = np.asfortranarray(np.arange(20_000, dtype=np.int32).reshape(100, 200))
    raw = bytearray(b"x" * 10_000)
    small = np.arange(10)
    nested = {"lr": 0.1, "history": [1, 2]}
    state = {"w": weights, "f": fortran, "raw": raw, "small": small, "nested": nested}
    expected = {"w": weights.copy(), "f": fortran.copy(), "raw": bytes(raw), "small": small.copy()}
    metadata = {"loss": [0.5]}
    ckpt.save(1, state, metadata=metadata, blocking=False)
    assert store.writing.wait(timeout=60)
    metadata["loss"].append(0.1)
    weights[:] = -1
    fortran[:] = -1
    raw[:] = b"y" * len(raw)
    small[:] = -1
    nested["lr"] = 99.0
    nested["history"].append(3)
    store.gate.set()
    ckpt.wait()
    restored = ckpt.restore()
    assert restored.metadata == {"loss": [0.5]}
    saved = restored.state
    np.testing.assert_array_equal(saved["w"], expected["w"])
    np.testing.assert_array_equal(saved["f"], expected["f"])
    assert saved["raw"] == bytearray(expected["raw"])
    np.testing.assert_array_equal(saved["small"], expected["small"])
    assert saved["nested"] == {"lr": 0.1, "history": [1, 2]}


def test_buffers_are_reused_and_still_exact_across_saves(tmp_path: Path) -> None:
    ckpt = Checkpointer("job", location=tmp_path)
    weights = np.zeros(50_000)
    for step in range(1, 4):
        weights[:] = step
        ckpt.save(step, {"w": weights}, blocking=False)
    ckpt.wait()
    for step in range(1, 4):
        assert (ckpt.restore(step=step).state["w"] == step).all()


class Probe:
    """A live object whose capture records whether step 1 was already committed."""

    def __init__(self, ckpt: Checkpointer, store: LocalStore) -> None:
        self.ckpt, self.store = ckpt, store
        self.first_was_committed: bool | None = None

    def state_dict(self) -> dict[str, Any]:
        self.first_was_committed = self.store.exists("job/000000000001.json")
        return {"x": 2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def test_at_most_one_save_in_flight(tmp_path: Path) -> None:
    store = GatedStore(tmp_path)
    ckpt = Checkpointer("job", location=store)
    ckpt.save(1, {"w": np.ones(100_000)}, blocking=False)
    assert store.writing.wait(timeout=60)
    probe = Probe(ckpt, store)
    second = threading.Thread(target=ckpt.save, args=(2, {"p": probe}))
    second.start()
    second.join(timeout=0.2)  # give it the chance to overtake; it must wait instead
    store.gate.set()
    second.join(timeout=60)
    assert probe.first_was_committed is True
    assert ckpt.steps() == [1, 2]


def test_a_background_error_is_raised_by_wait(tmp_path: Path) -> None:
    ckpt = Checkpointer("job", location=FailingStore(tmp_path, {2}))
    ckpt.save(1, {"w": np.ones(10_000)})
    ckpt.save(2, {"w": np.ones(10_000)}, blocking=False)
    with pytest.raises(SaveFailed, match="'job' step 2") as info:
        ckpt.wait()
    assert info.value.step == 2
    ckpt.wait()  # reported once
    assert ckpt.steps() == [1]
    ckpt.save(3, {"w": np.ones(10_000)}, blocking=False)
    ckpt.wait()
    assert ckpt.steps() == [1, 3]


@pytest.mark.parametrize("next_call", ["save", "restore", "delete", "gc"])
def test_a_background_error_is_raised_by_the_next_call(tmp_path: Path, next_call: str) -> None:
    ckpt = Checkpointer("job", location=FailingStore(tmp_path, {2}))
    ckpt.save(1, {"w": np.ones(10_000)})
    ckpt.save(2, {"w": np.ones(10_000)}, blocking=False)
    calls = {
        "save": lambda: ckpt.save(3, {"x": 3}),
        "restore": lambda: ckpt.restore(),
        "delete": lambda: ckpt.delete(1),
        "gc": lambda: ckpt.gc(),
    }
    with pytest.raises(SaveFailed):
        calls[next_call]()
    calls[next_call]()  # the error was reported; the call now does its work
    assert ckpt.steps() == {"save": [1, 3], "restore": [1], "delete": [], "gc": [1]}[next_call]


def test_the_state_raising_leaves_everything_untouched(tmp_path: Path) -> None:
    class Exploding:
        def state_dict(self) -> dict[str, Any]:
            raise RuntimeError("boom")

        def load_state_dict(self, state: dict[str, Any]) -> None:
            pass

    ckpt = Checkpointer("job", location=tmp_path)
    ckpt.save(1, {"w": np.ones(10_000)})
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for blocking in (True, False):
        with pytest.raises(RuntimeError, match="boom"):
            ckpt.save(2, {"w": np.ones(10_000), "model": Exploding()}, blocking=blocking)
        ckpt.wait()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert ckpt.steps() == [1]


def _run(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)


def test_interpreter_exit_waits_for_the_save_in_flight(tmp_path: Path) -> None:
    result = _run("""
        import sys, threading, numpy as np
        from safepoint.checkpointer import Checkpointer
        from safepoint.store import LocalStore

        class SlowStore(LocalStore):
            def write_blob(self, key, chunks, *, durable):
                threading.Event().wait(0.5)  # still writing when the main thread ends
                super().write_blob(key, chunks, durable=durable)

        ckpt = Checkpointer("job", location=SlowStore(sys.argv[1]))
        ckpt.save(7, {"w": np.arange(1_000_000, dtype=np.float64)}, blocking=False)
        print("returned", ckpt.steps(), flush=True)
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "returned []"
    restored = Checkpointer("job", location=tmp_path).restore()
    assert restored.step == 7
    np.testing.assert_array_equal(restored.state["w"], np.arange(1_000_000, dtype=np.float64))


def test_an_error_nobody_waited_for_is_printed_at_exit(tmp_path: Path) -> None:
    result = _run("""
        import sys, numpy as np
        from safepoint.checkpointer import Checkpointer
        from safepoint.store import LocalStore

        class BrokenStore(LocalStore):
            def write_blob(self, key, chunks, *, durable):
                raise OSError(28, "No space left on device")

        ckpt = Checkpointer("job", location=BrokenStore(sys.argv[1]))
        ckpt.save(1, {"w": np.ones(100_000)}, blocking=False)
    """, tmp_path)
    assert "the asynchronous save of 'job' failed" in result.stderr
    assert "disk is full" in result.stderr
    assert Checkpointer("job", location=tmp_path).steps() == []
