"""Copy-on-write snapshots (``Checkpointer(snapshot="fork")``): an asynchronous save forks a
process that writes and commits the checkpoint; the caller goes on at once.

These tests fork from the pytest process itself, which has threads (moto's server, the
lease heartbeats and committers of earlier tests, and the busy threads of the last test):
the snapshot process must not need any lock those threads may hold.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import safepoint
from safepoint.checkpointer import Checkpointer
from safepoint.checkpointer.snapshot import shared_blobs
from safepoint.errors import SafepointError, SaveFailed, StaleAttempt
from safepoint.format import prepare
from safepoint.store import FsspecStore, LocalStore
from safepoint.store.base import Buffer


class GatedStore(LocalStore):
    """In a snapshot process (any process but the one that made the store), each blob write
    announces ``W <pid>`` on a pipe and waits for a byte on another one."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.owner = os.getpid()
        self.events_read, self.events_write = os.pipe()
        self.gate_read, self.gate_write = os.pipe()

    def write_blob(self, key: str, chunks: Iterable[Buffer], *, durable: bool) -> None:
        if os.getpid() != self.owner:
            os.write(self.events_write, f"W {os.getpid()}\n".encode())
            os.read(self.gate_read, 1)
        super().write_blob(key, chunks, durable=durable)

    def child_writing(self) -> int:
        """Wait until a snapshot process is writing; its pid."""
        line = b""
        while not line.endswith(b"\n"):
            line += os.read(self.events_read, 1)
        return int(line.split()[1])

    def open_gate(self) -> None:
        os.write(self.gate_write, b"x" * 64)

    def close(self) -> None:
        for fd in (self.events_read, self.events_write, self.gate_read, self.gate_write):
            os.close(fd)


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[GatedStore]:
    store = GatedStore(tmp_path / "store")
    yield store
    store.close()


class FailingStore(LocalStore):
    """Blob writes of chosen steps fail with EIO."""

    def __init__(self, root: Path, failing_steps: set[int]) -> None:
        super().__init__(root)
        self.failing_steps = failing_steps

    def write_blob(self, key: str, chunks: Iterable[Buffer], *, durable: bool) -> None:
        if int(key.split("/")[1]) in self.failing_steps:
            raise OSError(5, "Input/output error")
        super().write_blob(key, chunks, durable=durable)


def sample_state(step: int) -> dict[str, Any]:
    rng = np.random.default_rng(step)
    return {
        "f64": rng.random(200_000),
        "f32_fortran": np.asfortranarray(rng.random((300, 200), dtype=np.float32)),
        "strided": rng.integers(0, 1 << 30, 100_000)[::3],
        "bool": rng.random(50_000) > 0.5,
        "complex": rng.random(10_000) + 1j * rng.random(10_000),
        "raw": bytearray(rng.bytes(20_000)),
        "blob": rng.bytes(30_000),
        "small": np.arange(5) * step,
        "nested": {"step": step, "lr": 0.1, "tags": ["a", ("b", step)]},
    }


def assert_same(actual: Any, expected: Any) -> None:
    assert type(actual) is type(expected)
    if isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            assert_same(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_same(a, e)
    elif isinstance(expected, np.ndarray):
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape)
        assert actual.tobytes() == expected.tobytes()
    else:
        assert actual == expected


def test_round_trips_are_bit_exact_and_retention_runs(tmp_path: Path) -> None:
    ckpt = Checkpointer("job", location=tmp_path, snapshot="fork", keep=2)
    for step in range(4):
        pending = ckpt.save(step, sample_state(step), blocking=False, metadata={"loss": 1 / (step + 1)})
        pending.wait()
        assert pending.done()
    assert ckpt.steps() == [2, 3]  # retention ran in the saving process
    for step in (2, 3):
        restored = ckpt.restore(step=step)
        assert_same(restored.state, sample_state(step))
        assert restored.metadata == {"loss": 1 / (step + 1)}
    assert ckpt.latest_step() == 3
    assert safepoint.check(tmp_path).ok  # step 1's data goes at the next save (readers)


def test_changes_after_save_returns_are_not_saved(gated: GatedStore) -> None:
    ckpt = Checkpointer("job", location=gated, snapshot="fork")
    state = sample_state(1)
    expected = sample_state(1)
    metadata = {"loss": [0.5]}
    pending = ckpt.save(1, state, metadata=metadata, blocking=False)
    gated.child_writing()  # the child is writing: now change everything it is writing
    state["f64"][:] = -1
    state["f32_fortran"][:] = -1
    state["raw"][:] = b"y" * len(state["raw"])
    state["nested"]["lr"] = 99.0
    state["nested"]["tags"].append("late")
    metadata["loss"].append(0.1)
    gated.open_gate()
    pending.wait()
    restored = ckpt.restore()
    assert_same(restored.state, expected)
    assert restored.metadata == {"loss": [0.5]}


def test_incremental_fork_saves_write_only_changed_chunks(tmp_path: Path) -> None:
    ckpt = Checkpointer("job", location=tmp_path, snapshot="fork", incremental=True, keep=2)
    weights = np.random.default_rng(0).random(3_000_000)  # 24 MB: several chunks
    saved = []
    for step in range(4):
        weights[step * 1000] = -step  # one chunk changes per step
        saved.append(weights.copy())
        ckpt.save(step, {"w": weights, "step": step}, blocking=False)
        weights[:] += 0  # the caller writes right away (copy-on-write)
    ckpt.wait()
    assert ckpt.steps() == [2, 3]
    for step in (2, 3):
        assert ckpt.restore(step=step).state["w"].tobytes() == saved[step].tobytes()
    assert safepoint.check(tmp_path).ok  # removed steps' chunks go a save later (readers)


def test_a_forked_incremental_save_tells_its_parent_what_it_saw(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The child's view of each chunk's place (its XXH3 and BLAKE3, whether it was new)
    comes back to the parent, so that the next forked save knows unchanged chunks and packs
    the segments rewritten at two saves in a row, as a save without fork does."""
    from safepoint import knobs
    from safepoint.format import read_manifest
    from safepoint.format.chunks import chunk_entries

    monkeypatch.setattr(knobs, "CHUNK_BYTES", 64 << 10)
    monkeypatch.setattr(knobs, "CHUNKS_PER_FILE", 4)
    ckpt = Checkpointer("job", location=tmp_path, snapshot="fork", incremental=True)
    weights = np.zeros(8 * (64 << 10) // 8)  # two segments of four chunks
    for step in range(3):
        weights[:] = np.arange(weights.size) + step  # every chunk changes at every step
        ckpt.save(step, {"w": weights}, blocking=False).wait()
    ckpt.close()
    entries = chunk_entries(read_manifest(ckpt.store, "job", 2))
    assert sorted(len(chunks) for _, chunks in entries.values()) == [4, 4]
    assert (ckpt.restore(step=2).state["w"] == np.arange(weights.size) + 2).all()
    assert safepoint.check(tmp_path).clean


def test_a_plain_state_is_frozen_at_the_fork_too(tmp_path: Path) -> None:
    ckpt = Checkpointer("job", location=tmp_path, snapshot="fork")
    state = {"step": 1, "history": [0.5, 0.25], "config": {"lr": 0.1, "name": "run"}}
    pending = ckpt.save(1, state, blocking=False)  # JSON only: the node is the state itself
    state["history"].append(0.125)
    state["config"]["lr"] = 99.0
    pending.wait()
    assert ckpt.restore().state == {"step": 1, "history": [0.5, 0.25],
                                    "config": {"lr": 0.1, "name": "run"}}


def test_memory_shared_with_other_processes_is_copied_before_the_fork(gated: GatedStore) -> None:
    size = 400_000
    with mmap.mmap(-1, size) as shared:  # MAP_SHARED: not copy-on-write across a fork
        array = np.frombuffer(shared, np.uint8)
        array[:] = 7
        private = np.full(size, 7, np.uint8)
        prepared = prepare({"shared": array, "private": private})
        assert shared_blobs(prepared) == [0]
        ckpt = Checkpointer("job", location=gated, snapshot="fork")
        pending = ckpt.save(1, {"shared": array, "private": private}, blocking=False)
        gated.child_writing()
        array[:] = 9
        private[:] = 9
        gated.open_gate()
        pending.wait()
        restored = ckpt.restore().state
        assert (restored["shared"] == 7).all() and (restored["private"] == 7).all()
        del array, prepared


def test_an_error_in_the_child_is_raised_in_the_parent(tmp_path: Path) -> None:
    ckpt = Checkpointer("job", location=FailingStore(tmp_path, {2}), snapshot="fork")
    ckpt.save(1, {"w": np.ones(10_000)}, blocking=False)
    pending = ckpt.save(2, {"w": np.ones(10_000)}, blocking=False)
    with pytest.raises(SaveFailed, match=r"'job' step 2.*Input/output error") as info:
        pending.wait()
    assert info.value.step == 2 and info.value.errno == 5
    assert any("snapshot process" in note for note in info.value.__notes__)
    with pytest.raises(SaveFailed):  # also raised by the next call, as for a copy snapshot
        ckpt.wait()
    ckpt.wait()  # reported once
    assert ckpt.steps() == [1]
    ckpt.save(3, {"w": np.ones(10_000)}, blocking=False).wait()
    assert ckpt.steps() == [1, 3]


def test_a_killed_child_fails_the_save_and_leaves_the_previous_step(gated: GatedStore) -> None:
    ckpt = Checkpointer("job", location=gated, snapshot="fork")
    ckpt.save(1, {"w": np.ones(100_000)})  # blocking: written by this process, no gate
    pending = ckpt.save(2, {"w": np.zeros(100_000)}, blocking=False)
    os.kill(gated.child_writing(), signal.SIGKILL)
    with pytest.raises(SaveFailed, match=r"'job' step 2: the snapshot process \(pid \d+\) was "
                                         "killed by SIGKILL"):
        pending.wait()
    with contextlib.suppress(SaveFailed):
        ckpt.wait()
    assert ckpt.steps() == [1]
    assert (ckpt.restore().state["w"] == 1).all()
    assert safepoint.check(gated).ok
    gated.open_gate()
    ckpt.save(3, {"w": np.full(100_000, 3.0)}, blocking=False).wait()
    assert ckpt.steps() == [1, 3]
    report = safepoint.check(gated, fix=True)
    assert report.ok
    assert safepoint.check(gated).clean


def test_the_child_ignores_signals_the_parent_handles_in_python(gated: GatedStore) -> None:
    ckpt = Checkpointer("job", location=gated, snapshot="fork")
    pending = ckpt.save(1, {"w": np.ones(100_000)}, blocking=False)
    os.kill(gated.child_writing(), signal.SIGINT)  # Ctrl+C to the process group
    gated.open_gate()
    pending.wait()
    assert ckpt.steps() == [1]


class Probe:
    """A live object whose capture records whether step 1 was already committed."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store
        self.first_was_committed: bool | None = None

    def state_dict(self) -> dict[str, Any]:
        self.first_was_committed = self.store.exists("job/000000000001.json")
        return {"x": 2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def test_at_most_one_save_in_flight(gated: GatedStore) -> None:
    ckpt = Checkpointer("job", location=gated, snapshot="fork")
    ckpt.save(1, {"w": np.ones(100_000)}, blocking=False)
    gated.child_writing()
    probe = Probe(gated)
    second = threading.Thread(target=ckpt.save, args=(2, {"p": probe}), kwargs={"blocking": False})
    second.start()
    second.join(timeout=0.2)  # give it the chance to overtake; it must wait instead
    gated.open_gate()
    second.join(timeout=60)
    ckpt.wait()
    assert probe.first_was_committed is True
    assert ckpt.steps() == [1, 2]


def test_a_stale_writers_child_cannot_commit_over_the_newer_writer(gated: GatedStore) -> None:
    old = Checkpointer("job", location=gated, snapshot="fork")
    old.save(1, {"w": np.ones(100_000)})  # takes the lease
    pending = old.save(2, {"w": np.full(100_000, 2.0)}, blocking=False)
    gated.child_writing()
    new = Checkpointer("job", location=LocalStore(gated.root), takeover=True)
    new.save(5, {"w": np.full(100_000, 5.0)})
    gated.open_gate()
    with pytest.raises((StaleAttempt, SaveFailed)):
        pending.wait()
    assert new.steps() == [1, 5]
    assert (new.restore().state["w"] == 5).all()
    assert safepoint.check(gated.root).ok


def test_refused_where_a_fork_is_not_safe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="'copy' or 'fork'"):
        Checkpointer("job", location=tmp_path, snapshot="cow")  # type: ignore[arg-type]
    with pytest.raises(SafepointError, match=r"local-directory store.*use snapshot='copy'"):
        Checkpointer("job", location=FsspecStore("memory://snapshot-refused"), snapshot="fork")
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(SafepointError, match=r"needs Linux, not darwin.*use snapshot='copy'"):
        Checkpointer("job", location=tmp_path, snapshot="fork")
    monkeypatch.undo()
    ckpt = Checkpointer("job", location=tmp_path, snapshot="fork")
    assert ckpt.snapshot == "fork"
    ckpt.save(1, {"w": np.ones(10)})  # blocking saves write in the caller, as always
    assert ckpt.steps() == [1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args],
                          capture_output=True, text=True, timeout=120)


def test_interpreter_exit_waits_for_the_child_and_reports_its_error(tmp_path: Path) -> None:
    result = _run("""
        import sys, numpy as np
        from safepoint.checkpointer import Checkpointer
        from safepoint.store import LocalStore

        class BrokenStore(LocalStore):
            def write_blob(self, key, chunks, *, durable):
                if "000000000002" in key:
                    raise OSError(28, "No space left on device")
                super().write_blob(key, chunks, durable=durable)

        ckpt = Checkpointer("job", location=BrokenStore(sys.argv[1]), snapshot="fork")
        ckpt.save(1, {"w": np.arange(1_000_000, dtype=np.float64)}, blocking=False)
        print("returned", ckpt.steps(), flush=True)
        ckpt.wait()
        ckpt.save(2, {"w": np.ones(100_000)}, blocking=False)
    """, str(tmp_path))
    assert result.stdout.strip() == "returned []"
    assert "the asynchronous save of 'job' failed" in result.stderr
    assert "disk is full" in result.stderr
    restored = Checkpointer("job", location=tmp_path).restore()
    assert restored.step == 1
    np.testing.assert_array_equal(restored.state["w"], np.arange(1_000_000, dtype=np.float64))


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie nobody reaped yet
    except FileNotFoundError:
        return True


def test_an_orphaned_child_abandons_its_save(tmp_path: Path) -> None:
    """The saving process dies while its child writes: the child commits nothing (a
    restarted writer may already have restored the step before), removes what it wrote and
    exits; the previous step stays the newest, and the store is clean."""
    writing, gate = tmp_path / "writing", tmp_path / "gate"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import os, sys, time, numpy as np
        from pathlib import Path
        from safepoint.checkpointer import Checkpointer
        from safepoint.store import LocalStore

        owner = os.getpid()
        writing, gate = Path(sys.argv[2]), Path(sys.argv[3])

        class Gated(LocalStore):
            def write_blob(self, key, chunks, *, durable):
                if os.getpid() != owner:
                    writing.write_text(str(os.getpid()))
                    while not gate.exists():
                        time.sleep(0.01)
                super().write_blob(key, chunks, durable=durable)

        ckpt = Checkpointer("job", location=Gated(sys.argv[1]), snapshot="fork")
        ckpt.save(1, {"w": np.ones(100_000)})
        ckpt.save(2, {"w": np.zeros(100_000)}, blocking=False)
        time.sleep(120)
    """), str(tmp_path / "store"), str(writing), str(gate)])
    try:
        deadline = time.monotonic() + 60
        while not (writing.exists() and writing.read_text()):
            assert time.monotonic() < deadline and parent.poll() is None, "the child never wrote"
            time.sleep(0.01)
        child = int(writing.read_text())
    finally:
        parent.kill()
        parent.wait()
    gate.touch()
    deadline = time.monotonic() + 60
    while not _gone(child):
        assert time.monotonic() < deadline, "the orphaned child did not exit"
        time.sleep(0.01)
    ckpt = Checkpointer("job", location=tmp_path / "store")
    assert ckpt.steps() == [1]
    assert (ckpt.restore().state["w"] == 1).all()
    assert safepoint.check(tmp_path / "store").ok  # nothing damaged; an empty folder is left
    safepoint.check(tmp_path / "store", fix=True)
    assert safepoint.check(tmp_path / "store").clean


def test_fork_saves_in_a_busy_multi_threaded_process(tmp_path: Path) -> None:
    """Threads that log, compute and save (taking the logging, committer and lease locks
    all the time) while the main thread forks snapshot after snapshot: none may hang.

    The computing thread multiplies small matrices, which OpenBLAS does on the calling
    thread: a fork() while another thread is inside a *multi-threaded* OpenBLAS call
    deadlocks in OpenBLAS's own at-fork handler, in any program (docs/checkpointer.md)."""
    stop = threading.Event()
    logger = logging.getLogger("safepoint-tests.busy")
    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115 (closed below)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # not into pytest's log capture

    def log_forever() -> None:
        while not stop.is_set():
            logger.debug("busy %s", "x" * 100)

    def compute_forever() -> None:
        matrix = np.random.default_rng(0).random((48, 48))
        while not stop.is_set():
            matrix = matrix @ matrix
            matrix /= np.abs(matrix).max()

    def save_forever() -> None:
        other = Checkpointer("other", location=tmp_path, keep=1)
        step = 0
        while not stop.is_set():
            other.save(step, {"w": np.full(20_000, step)}, blocking=False)
            step += 1
        other.close()

    threads = [threading.Thread(target=fn, daemon=True)
               for fn in (log_forever, compute_forever, save_forever)]
    for thread in threads:
        thread.start()
    try:
        ckpt = Checkpointer("job", location=tmp_path, snapshot="fork", keep=3)
        for step in range(30):
            ckpt.save(step, {"w": np.full(50_000, step, np.float32), "step": step},
                      blocking=False).wait(timeout=60)
        assert ckpt.steps() == [27, 28, 29]
        for step in (27, 28, 29):
            assert (ckpt.restore(step=step).state["w"] == step).all()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        logger.removeHandler(handler)
        logger.propagate = True
        handler.stream.close()
