"""The cyclic garbage collector is paused while a save encodes and a restore decodes, and
enabled again exactly when the last pause ends (nested, on several threads, after an
error, in a forked child), never left off."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from safepoint import Checkpointer, check, knobs
from safepoint.format import tree
from safepoint.format.collector import collector_paused


@pytest.fixture(autouse=True)
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    assert gc.isenabled(), "a pause left the collector off"
    if not was:
        gc.disable()


def test_a_pause_disables_the_collector_until_it_ends() -> None:
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause goes on
    assert gc.isenabled()


def test_an_error_inside_ends_the_pause() -> None:
    with pytest.raises(KeyError), collector_paused():
        raise KeyError("x")
    assert gc.isenabled()


def test_a_collector_the_caller_disabled_stays_disabled() -> None:
    gc.disable()
    with collector_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()
    gc.enable()


def test_the_knob_turns_the_pause_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knobs, "PAUSE_GC", False)
    with collector_paused():
        assert gc.isenabled()


def test_overlapping_pauses_on_two_threads_end_with_the_last() -> None:
    inside, release = threading.Event(), threading.Event()
    seen: list[bool] = []

    def other() -> None:
        with collector_paused():
            inside.set()
            release.wait(10)
        seen.append(gc.isenabled())

    thread = threading.Thread(target=other)
    with collector_paused():
        thread.start()
        assert inside.wait(10)
    assert not gc.isenabled()  # ours ended first: the other thread's pause goes on
    release.set()
    thread.join(10)
    assert seen == [True] and gc.isenabled()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_while_another_thread_pauses_has_the_collector_on() -> None:
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with collector_paused():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    assert inside.wait(10)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the pausing thread does not exist here
        try:
            with collector_paused():
                pass
            os.write(write, b"1" if gc.isenabled() else b"0")
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    release.set()
    thread.join(10)
    assert answer == b"1"


def test_saves_and_restores_encode_and_decode_with_the_collector_paused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, list[bool]] = {"encode": [], "decode": []}
    encode, decode = tree.Encoder._ndarray, tree.Decoder._ndarray

    def encoding(self: Any, *args: Any) -> Any:
        seen["encode"].append(gc.isenabled())
        return encode(self, *args)

    def decoding(self: Any, *args: Any) -> Any:
        seen["decode"].append(gc.isenabled())
        return decode(self, *args)

    monkeypatch.setattr(tree.Encoder, "_ndarray", encoding)
    monkeypatch.setattr(tree.Decoder, "_ndarray", decoding)
    state = {f"a{i}": np.full(1500, i, np.float64) for i in range(50)}
    ckpt = Checkpointer("paused", location=tmp_path)
    ckpt.save(1, state)
    ckpt.save(2, state, blocking=False).wait()
    restored = ckpt.restore().state
    assert all(np.array_equal(restored[k], v) for k, v in state.items())
    assert len(seen["encode"]) == 100 and not any(seen["encode"])
    assert len(seen["decode"]) == 50 and not any(seen["decode"])
    assert gc.isenabled()
    assert check(tmp_path).ok


def test_a_blocking_save_is_paused_throughout_and_a_background_write_only_while_it_encodes(
        tmp_path: Path) -> None:
    """A blocking save makes nothing that outlives it, so it pauses from start to end; a
    background write leaves the collector on while it waits on its writes, so that the
    caller's own garbage is collected meanwhile."""
    from safepoint.store import LocalStore

    seen: list[bool] = []

    class Watching(LocalStore):
        def write_blob(self, key: str, chunks: Any, *, durable: bool) -> None:
            seen.append(gc.isenabled())
            super().write_blob(key, chunks, durable=durable)

    state = {"w": np.ones(1 << 16)}
    ckpt = Checkpointer("watched", location=Watching(tmp_path))
    ckpt.save(1, state)
    assert seen == [False] and gc.isenabled()
    seen.clear()
    ckpt.save(2, state, blocking=False).wait()
    assert seen == [True]
    assert np.array_equal(ckpt.restore().state["w"], state["w"])
    assert check(tmp_path).ok
