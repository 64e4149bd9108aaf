"""Incremental saves: content-addressed chunks, on every backend (local, memory://, s3).

Bytes written in proportion to bytes changed (nothing, some chunks, everything), bit-exact
round trips, sharing under retention (only chunks no kept step names are removed),
damage to a shared chunk found in every step that names it with restore() falling back,
gc's stable pass, and format version 2 checkpoints still read.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import safepoint
from safepoint import Checkpointer, CorruptCheckpointWarning, knobs
from safepoint.checkpointer import collect_garbage
from safepoint.format import chunk_references, read_manifest, verify_checkpoint
from safepoint.format.chunks import chunk_entries, chunk_files_in_store
from safepoint.store import Store
from state_checks import Counting

CHUNK = 64 << 10
NAME = "inc"


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knobs, "CHUNK_BYTES", CHUNK)


def state_of(seed: int, changed: int = 0) -> dict[str, Any]:
    """Two large arrays (16 and 8 chunks), a Fortran-ordered one, bytes, small values;
    ``changed`` chunks of ``big`` differ from seed 0's."""
    rng = np.random.default_rng(seed)
    big = np.random.default_rng(0).random(16 * CHUNK // 8)
    for i in range(changed):
        big[i * CHUNK // 8 : i * CHUNK // 8 + 3] = rng.random(3)
    return {
        "big": big,
        "ints": np.arange(8 * CHUNK // 4 + 5, dtype=np.int32) * (seed + 1),  # a partial last chunk
        "fortran": np.asfortranarray(np.arange(3 * CHUNK // 8, dtype=np.float64).reshape(96, -1)),
        "raw": bytes(range(256)) * (2 * CHUNK // 256 + 1),
        "small": np.full(10, seed),
        "step": seed,
    }


def assert_same(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    if isinstance(b, dict):
        assert list(a) == list(b)
        for key in b:
            assert_same(a[key], b[key])
    elif isinstance(b, np.ndarray):
        assert (a.dtype, a.shape, a.flags.f_contiguous) == (b.dtype, b.shape, b.flags.f_contiguous)
        assert a.tobytes() == b.tobytes()
    else:
        assert a == b


def test_bytes_written_follow_bytes_changed(make_store: Callable[[], Store]) -> None:
    store = make_store()
    counting = Counting(store)
    ckpt = Checkpointer(NAME, location=store, incremental=True)
    states = {1: state_of(1), 2: state_of(1), 3: state_of(1, changed=2), 4: state_of(4)}
    ckpt.save(1, states[1])
    full = counting.take()
    assert full >= states[1]["big"].nbytes + states[1]["ints"].nbytes
    ckpt.save(2, states[2])  # nothing changed: only what is not chunked (small leaves)
    assert counting.take() == 0
    ckpt.save(3, states[3])  # two chunks of big changed
    assert counting.take() == 2 * CHUNK
    ckpt.save(4, states[4])  # ints changed everywhere; big is seed 0's again: reused
    assert counting.take() == states[4]["ints"].nbytes
    for step, state in states.items():
        assert_same(ckpt.restore(step).state, state)
        assert_same(ckpt.restore(step, mmap=True).state, state)
        into = {k: (np.zeros_like(v, order="K") if isinstance(v, np.ndarray) else None)
                for k, v in state.items()}
        ckpt.restore(step, into=into)
        for key in ("big", "ints", "fortran", "small"):
            assert into[key].tobytes() == state[key].tobytes()
        assert verify_checkpoint(store, NAME, step).ok
    assert read_manifest(store, NAME, 4).body["version"] == 3  # one chunk per chunk file
    report = safepoint.check(store)
    assert report.clean, report.findings
    # every chunk file is named by some step, and each content is stored once
    present = chunk_files_in_store(store, NAME)
    assert set(present) == chunk_references(store, NAME).files
    contents = [rel.split("/")[1].split("-")[0] for rel in present]
    assert len(contents) == len(set(contents))


@pytest.mark.parametrize("backend", ["local", "memory"])
def test_bytes_are_cut_where_their_content_says(make_store: Callable[[], Store]) -> None:
    """Bytes inserted into a byte string move only the chunk boundaries near them: the
    chunks after them are shared, not written again."""
    store = make_store()
    counting = Counting(store)
    ckpt = Checkpointer(NAME, location=store, incremental=True)
    text = np.random.default_rng(5).bytes(64 * CHUNK)
    ckpt.save(1, {"text": text, "blob": bytearray(text)})
    assert counting.take() == len(text)  # the bytearray holds the same chunks: written once
    edited = text[: 20 * CHUNK] + b"inserted here" + text[20 * CHUNK :]
    ckpt.save(2, {"text": edited, "blob": bytearray(text)})
    written = counting.take()
    assert 0 < written <= 12 * CHUNK  # the chunk around the insertion (at most 4 chunks long)
    assert ckpt.restore(1).state == {"text": text, "blob": bytearray(text)}
    assert ckpt.restore(2).state == {"text": edited, "blob": bytearray(text)}
    ranges = read_manifest(store, NAME, 2).blobs[0]["ranges"]
    lengths = {r[2] for r in ranges}
    assert len(ranges) > 8 and len(lengths) > 2  # not fixed-size
    assert safepoint.check(store).clean


@pytest.mark.parametrize("backend", ["local", "memory"])  # s3: the same code, slower
def test_async_save_hashes_in_the_background(make_store: Callable[[], Store]) -> None:
    store = make_store()
    ckpt = Checkpointer(NAME, location=store, incremental=True, keep=2)
    for step in range(1, 6):
        state = state_of(step % 2, changed=step)
        expected = {k: (v.copy(order="K") if isinstance(v, np.ndarray) else v) for k, v in state.items()}
        pending = ckpt.save(step, state, blocking=False)
        state["big"][:] = -1.0  # the save copied it
        pending.wait()
        assert_same(ckpt.restore(step).state, expected)
    assert ckpt.steps() == [4, 5]
    assert safepoint.check(store).ok


@pytest.mark.parametrize("backend", ["local", "memory"])
def test_retention_removes_only_unshared_chunks(make_store: Callable[[], Store]) -> None:
    store = make_store()
    ckpt = Checkpointer(NAME, location=store, incremental=True, keep=2)
    for step in range(1, 9):
        ckpt.save(step, state_of(step % 3, changed=step % 5))
        kept = ckpt.steps()
        for s in kept:
            for rel in chunk_entries(read_manifest(store, NAME, s)):
                assert store.exists(f"{NAME}/{rel}"), (step, s, rel)
            assert_same(ckpt.restore(s).state, state_of(s % 3, changed=s % 5))
    assert ckpt.steps() == [7, 8]
    assert safepoint.check(store).ok
    ckpt.close()  # gc leaves a running writer's leftovers alone
    safepoint.check(store, fix=True)  # the chunks retention deferred (readers) go now
    assert set(chunk_files_in_store(store, NAME)) == chunk_references(store, NAME).files
    assert safepoint.check(store).clean
    ckpt.delete(7)
    assert set(chunk_files_in_store(store, NAME)) == chunk_references(store, NAME).files
    assert_same(ckpt.restore().state, state_of(8 % 3, changed=8 % 5))
    ckpt.delete_all()
    assert not store.exists(NAME)


def _damage(store: Store, key: str) -> None:
    data = bytearray(store.read(key))
    data[100] ^= 0xFF
    store.commit(key, bytes(data), durable=True)


def test_damaged_shared_chunk_damages_every_step_that_names_it(make_store: Callable[[], Store]) -> None:
    store = make_store()
    ckpt = Checkpointer(NAME, location=store, incremental=True)
    ckpt.save(1, state_of(1, changed=1))
    ckpt.save(2, state_of(2))  # big's first chunk is seed 0's: a new chunk file
    ckpt.save(3, state_of(3))  # shares it with step 2
    first = read_manifest(store, NAME, 2)
    rel = first.files[first.blobs[0]["ranges"][0][0]][0]
    assert rel in chunk_entries(read_manifest(store, NAME, 3))
    assert rel not in chunk_entries(read_manifest(store, NAME, 1))
    _damage(store, f"{NAME}/{rel}")
    into = {"big": np.zeros(16 * CHUNK // 8), "ints": np.zeros(8 * CHUNK // 4 + 5, np.int32)}
    with pytest.raises(safepoint.CorruptCheckpoint):
        ckpt.restore(3, into={**state_of(3), **into})
    assert not into["big"].any() and not into["ints"].any()  # all or nothing
    assert verify_checkpoint(store, NAME, 1).ok
    for step in (2, 3):
        report = verify_checkpoint(store, NAME, step)
        assert not report.ok and rel in report.problems[0]
    report = safepoint.check(store, fix=True)
    assert sorted(f.key for f in report.damage) == [f"{NAME}/000000000002.json",
                                                   f"{NAME}/000000000003.json"]
    assert store.exists(f"{NAME}/{rel}")  # damage is evidence, never removed
    with pytest.warns(CorruptCheckpointWarning):
        restored = ckpt.restore()
    assert restored.step == 1
    assert_same(restored.state, state_of(1, changed=1))


def test_missing_chunk_is_damage_and_restore_falls_back(make_store: Callable[[], Store]) -> None:
    store = make_store()
    ckpt = Checkpointer(NAME, location=store, incremental=True)
    ckpt.save(1, state_of(1))
    ckpt.save(2, state_of(2))  # ints differ: chunks of step 2 only
    only = set(chunk_entries(read_manifest(store, NAME, 2))) - set(chunk_entries(read_manifest(store, NAME, 1)))
    store.delete(f"{NAME}/{sorted(only)[0]}")
    assert not verify_checkpoint(store, NAME, 2).ok
    assert not safepoint.check(store).ok
    with pytest.warns(CorruptCheckpointWarning):
        assert ckpt.restore().step == 1


def test_version_2_steps_read_and_continued_incrementally(make_store: Callable[[], Store]) -> None:
    store = make_store()
    plain = Checkpointer(NAME, location=store, keep=2)
    plain.save(1, state_of(1))
    assert read_manifest(store, NAME, 1).body["version"] == 2  # no chunk: still version 2
    plain.close()
    inc = Checkpointer(NAME, location=store, keep=2, incremental=True)
    assert_same(inc.restore().state, state_of(1))
    inc.save(2, state_of(1))
    inc.save(3, state_of(3))
    inc.close()
    # A Checkpointer that does not write chunks still removes the ones its retention frees.
    plain = Checkpointer(NAME, location=store, keep=1)
    plain.save(4, state_of(4))
    plain.save(5, state_of(5))
    assert plain.steps() == [5]
    plain.wait()  # the data of removed steps goes in the background, a save later
    safepoint.check(store, fix=True)
    assert chunk_files_in_store(store, NAME) == []
    assert safepoint.check(store).clean
    assert_same(plain.restore().state, state_of(5))


def test_gc_keeps_young_chunks_and_waits_for_a_stable_pass(tmp_path: Any) -> None:
    store = safepoint.store.LocalStore(tmp_path / "s")
    ckpt = Checkpointer(NAME, location=store, incremental=True)
    ckpt.save(1, state_of(1))
    ckpt.save(2, state_of(2))
    ckpt.close()  # gc as another process runs it once the writer stopped
    # a crashed save's chunk: unreferenced, young
    stray = f"{NAME}/chunks/{'ab' * 32}-{'0' * 12}.bin"
    store.write_blob(stray, [b"x" * 10], durable=True)
    report = collect_garbage(store, NAME, min_age=60)
    assert stray in [key for key, _ in report.kept]
    assert store.exists(stray)
    assert stray in [key for key, _ in collect_garbage(store, NAME).removed]
    # a step removed while the pass reads the manifests: the pass starts again
    calls = {"n": 0}
    original = store.read

    def read(key: str, **kwargs: Any) -> bytes:
        calls["n"] += 1
        if calls["n"] == 1 and key.endswith("000000000001.json"):
            raise FileNotFoundError(key)
        return original(key, **kwargs)

    store.read = read  # type: ignore[method-assign]
    references = chunk_references(store, NAME)
    store.read = original  # type: ignore[method-assign]
    assert references.problem is None and calls["n"] > 2
    assert references.files == set(chunk_entries(read_manifest(store, NAME, 1))) | set(
        chunk_entries(read_manifest(store, NAME, 2)))
    # a damaged manifest: no chunk is deleted (its chunks are unknown)
    (tmp_path / "s" / NAME / "000000000001.json").write_bytes(b"{}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = collect_garbage(store, NAME)
    assert not [key for key, _ in report.removed if "/chunks/" in key]
    assert verify_checkpoint(store, NAME, 2).ok


def test_only_version_3_names_chunk_files_and_only_well_formed_ones(tmp_path: Any) -> None:
    from safepoint.errors import CorruptCheckpoint
    from safepoint.format.manifest import decode_manifest, encode_manifest

    store = safepoint.store.LocalStore(tmp_path / "s")
    ckpt = Checkpointer(NAME, location=store, incremental=True)
    ckpt.save(1, state_of(1))
    body = read_manifest(store, NAME, 1).body
    good = next(rel for rel, _ in body["files"] if rel.startswith("chunks/"))
    decode_manifest(encode_manifest(body), "m", name=NAME, step=1)
    for version, rel in ((2, good), (3, "chunks/evil.bin"), (3, "chunks/../x.bin"),
                         (3, f"chunks/{'a' * 64}-{'0' * 12}.bin/x"), (3, "other/" + good[7:])):
        bad = {**body, "version": version,
               "files": [[rel if r == good else r, size] for r, size in body["files"]]}
        with pytest.raises(CorruptCheckpoint, match="malformed manifest"):
            decode_manifest(encode_manifest(bad), "m", name=NAME, step=1)


def test_check_reads_a_shared_chunk_once(tmp_path: Any) -> None:
    store = safepoint.store.LocalStore(tmp_path / "s")
    ckpt = Checkpointer(NAME, location=store, incremental=True)
    for step in range(1, 6):
        ckpt.save(step, state_of(1))  # every step names the same chunks
    read: list[int] = []
    report = safepoint.check(store, on_bytes=read.append)
    assert report.clean and report.steps == 5
    per_step = verify_checkpoint(store, NAME, 1).checked_bytes
    assert report.checked_bytes == 5 * per_step  # each step's data counts as checked
    chunked = sum(size for size, _ in chunk_entries(read_manifest(store, NAME, 1)).values())
    assert sum(read) == 5 * per_step - 4 * chunked  # but shared chunks were read once


def test_chunks_are_named_by_the_blake3_of_their_bytes_and_sha256_ones_still_read(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """safepoint 0.1 named chunks by their SHA-256: such a step restores, and a newer save
    writes its chunks afresh (no hash of one function matches the other's)."""
    import hashlib

    from blake3 import blake3

    from safepoint.format import chunk_writer as write_module
    from safepoint.format import chunks as chunks_module

    store = safepoint.store.LocalStore(tmp_path / "s")
    monkeypatch.setattr(write_module, "digest", lambda data: hashlib.sha256(data).hexdigest())
    Checkpointer(NAME, location=store, incremental=True).save(1, state_of(1))
    monkeypatch.undo()
    monkeypatch.setattr(knobs, "CHUNK_BYTES", CHUNK)
    ckpt = Checkpointer(NAME, location=store, incremental=True)
    counting = Counting(store)
    ckpt.save(2, state_of(1))  # the same bytes: every chunk written again, under new names
    assert counting.take() >= state_of(1)["big"].nbytes
    for step, hashed in ((1, hashlib.sha256), (2, blake3)):
        assert_same(ckpt.restore(step).state, state_of(1))
        for rel, (_, chunks) in chunk_entries(read_manifest(store, NAME, step)).items():
            data = store.read(f"{NAME}/{rel}")
            first = min(chunks, key=lambda chunk: chunk.offset)
            assert chunks_module.content_of(rel) == first.content  # a file is named by its first
            for chunk in chunks:
                assert chunk.content == hashed(data[chunk.offset : chunk.offset + chunk.size]).hexdigest()
    ckpt.save(3, state_of(1))  # now reused
    assert counting.take() < CHUNK
    ckpt.close()
    assert safepoint.check(store).clean


def test_unchanged_chunks_are_known_at_their_place_without_blake3(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk whose XXH3 matches the one its place had at the last save is named without
    its BLAKE3; a changed chunk is hashed; bytes remembered but no longer kept are written
    again under their remembered name; a new writer (a new index) hashes everything."""
    from safepoint.format import chunk_writer as write_module

    hashed: list[int] = []
    real = write_module.digest

    def counted(data: Any) -> str:
        hashed.append(memoryview(data).nbytes)
        return real(data)

    monkeypatch.setattr(write_module, "digest", counted)
    store = safepoint.store.LocalStore(tmp_path / "s")
    counting = Counting(store)
    ckpt = Checkpointer(NAME, location=store, incremental=True)
    chunked = ("big", "ints", "fortran")
    ckpt.save(1, state_of(1))
    assert sum(hashed) >= sum(state_of(1)[key].nbytes for key in chunked)
    hashed.clear()
    counting.take()
    ckpt.save(2, state_of(1))  # nothing changed
    assert hashed == [] and counting.take() == 0
    ckpt.save(3, state_of(1, changed=2))  # two chunks of big changed
    assert hashed == [CHUNK, CHUNK] and counting.take() == 2 * CHUNK
    hashed.clear()
    for step in (1, 2, 3):
        ckpt.delete(step)
    ckpt.save(4, state_of(1, changed=2))  # no kept step holds these bytes: written again
    # (every chunk known by its XXH3 alone: the bytes are those of the last save)
    assert hashed == [] and counting.take() >= state_of(1)["big"].nbytes
    assert_same(ckpt.restore(4).state, state_of(1, changed=2))
    ckpt.close()
    other = Checkpointer(NAME, location=store, incremental=True)
    other.save(5, state_of(1, changed=2))  # a new index: hashed, and reused by content
    assert sum(hashed) >= state_of(1)["big"].nbytes and counting.take() == 0
    assert_same(other.restore(5).state, state_of(1, changed=2))
    hashed.clear()
    monkeypatch.setattr(knobs, "QUICK_UNCHANGED", False)  # every chunk by its BLAKE3 alone
    other.save(6, state_of(1, changed=2))
    assert sum(hashed) >= state_of(1)["big"].nbytes and counting.take() == 0
    other.close()
    report = safepoint.check(store)
    assert report.clean, report.findings


def test_a_place_rewritten_at_every_save_is_named_by_its_xxh3(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the bytes at a place changed at the last save and change again, the chunk is
    named from its XXH3, with no BLAKE3 (bytes that change at every save are never shared):
    a save that changed everything hashes each byte once, at XXH3's speed. Bytes that the
    writer saw before (a region set back) keep their earlier name and are not written
    again; a new writer names everything by BLAKE3 and reads the XXH3-named chunks."""
    from safepoint.format import chunk_writer as write_module

    quick: list[int] = []
    strong: list[int] = []
    real_quick, real_strong = write_module.quick_digest, write_module.digest

    def counted_quick(data: Any, seed: int) -> int:
        quick.append(memoryview(data).nbytes)
        return real_quick(data, seed)

    def counted_strong(data: Any) -> str:
        strong.append(memoryview(data).nbytes)
        return real_strong(data)

    monkeypatch.setattr(write_module, "quick_digest", counted_quick)
    monkeypatch.setattr(write_module, "digest", counted_strong)
    store = safepoint.store.LocalStore(tmp_path / "s")
    counting = Counting(store)
    ckpt = Checkpointer(NAME, location=store, incremental=True)
    ints = state_of(1)["ints"].nbytes  # every chunk of ints changes with the seed

    def save(step: int, state: dict[str, Any]) -> tuple[int, int]:
        quick.clear()
        strong.clear()
        ckpt.save(step, state)
        return sum(quick), sum(strong)

    total, _ = save(1, state_of(1))  # no history: every place by its XXH3, then its BLAKE3
    assert total >= ints + 16 * CHUNK
    assert save(2, state_of(2, changed=2)) == (total, ints + 2 * CHUNK)  # changed once: BLAKE3
    names = set(chunk_entries(read_manifest(store, NAME, 2)))
    counting.take()
    assert save(3, state_of(3, changed=2)) == (total, 0)  # changed again: XXH3 alone
    assert counting.take() == ints + 2 * CHUNK
    assert save(4, state_of(2, changed=2)) == (total, 0)  # set back to step 2's bytes
    assert counting.take() == 0
    assert set(chunk_entries(read_manifest(store, NAME, 4))) == names  # step 2's chunk files
    assert save(5, state_of(2, changed=2)) == (total, 0)  # unchanged: named, not written
    assert counting.take() == 0
    for step, seed in ((1, 1), (2, 2), (3, 3), (4, 2), (5, 2)):
        assert_same(ckpt.restore(step).state, state_of(seed, changed=2 if step > 1 else 0))
    ckpt.close()
    other = Checkpointer(NAME, location=store, incremental=True)  # a new writer, a new seed
    assert_same(other.restore(3).state, state_of(3, changed=2))
    strong.clear()
    other.save(6, state_of(3, changed=2))
    assert sum(strong) >= ints + 16 * CHUNK  # every chunk by BLAKE3: it knows no XXH3 of ours
    assert counting.take() == ints + 2 * CHUNK  # the XXH3-named chunks are not found by it
    assert_same(other.restore(6).state, state_of(3, changed=2))
    other.close()
    report = safepoint.check(store)
    assert report.clean, report.findings


def chunk_counts(store: Store, step: int) -> dict[str, int]:
    """The chunks each chunk file that ``step`` names holds, as its manifest says."""
    return {rel: len(chunks) for rel, (_, chunks) in chunk_entries(read_manifest(store, NAME, step)).items()}


def test_a_segment_rewritten_at_two_saves_in_a_row_shares_one_file(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """New chunks go each to a file of their own, except in a segment (CHUNKS_PER_FILE
    consecutive chunks of a blob) of which every chunk is new at this save and was at the
    last: those share one file (one write, one fsync). A kept chunk is named wherever it
    lies, and a file stays while any kept step names one of its chunks."""
    monkeypatch.setattr(knobs, "CHUNKS_PER_FILE", 4)
    store = safepoint.store.LocalStore(tmp_path / "s")
    counting = Counting(store)
    ckpt = Checkpointer(NAME, location=store, incremental=True)
    ckpt.save(1, state_of(1))  # no history: a file per chunk
    assert set(chunk_counts(store, 1).values()) == {1}
    assert read_manifest(store, NAME, 1).body["version"] == 3
    counting.take()
    counting.calls = 0
    ckpt.save(2, state_of(2))  # ints (9 chunks) new again: segments of 4, 4 and 1
    assert (counting.calls, counting.take()) == (3, state_of(2)["ints"].nbytes)
    assert sorted(chunk_counts(store, 2).values()).count(4) == 2
    assert read_manifest(store, NAME, 2).body["version"] == 5
    counting.calls = 0
    ckpt.save(3, state_of(1, changed=2))  # two chunks of big, unchanged at the last save
    assert (counting.calls, counting.take()) == (2, 2 * CHUNK)
    partly = state_of(2)
    partly["ints"][0] += 1  # step 4 names three of the four chunks of step 2's first file
    ckpt.save(4, partly)
    assert counting.take() == CHUNK
    assert_same(ckpt.restore(4).state, partly)
    first = next(rel for rel, n in chunk_counts(store, 2).items() if n == 4
                 and rel in chunk_counts(store, 4))
    assert chunk_counts(store, 4)[first] == 3
    # step 2 then step 4 removed: the file is deleted, and its chunks are written again
    # when the bytes come back, never named from a file that is gone
    ckpt.delete(2)
    ckpt.delete(4)
    assert first not in chunk_files_in_store(store, NAME)
    ckpt.save(5, state_of(2))
    assert counting.take() >= state_of(2)["ints"].nbytes
    assert_same(ckpt.restore(5).state, state_of(2))
    assert_same(ckpt.restore(5, mmap=True).state, state_of(2))
    assert verify_checkpoint(store, NAME, 5).ok
    ckpt.close()
    report = safepoint.check(store)
    assert report.clean, report.findings


def test_a_crafted_chunk_content_is_damage(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A range's fifth element names part of a chunk file of several chunks; on a range
    that covers a whole file, or on a file's first chunk other than the one naming the
    file, it is refused, so no crafted manifest makes the writer trust wrong content."""
    import json

    from safepoint.format.manifest import encode_manifest

    monkeypatch.setattr(knobs, "CHUNKS_PER_FILE", 4)
    store = safepoint.store.LocalStore(tmp_path / "s")
    with Checkpointer(NAME, location=store, incremental=True) as ckpt:
        ckpt.save(1, state_of(1))
        ckpt.save(2, state_of(2))  # ints: segments rewritten twice, in shared files
    key = f"{NAME}/{2:012d}.json"
    original = json.loads(store.read(key))["manifest"]
    ints = next(b for b in original["blobs"] if b["path"].endswith("['ints']"))
    first = next(i for i, r in enumerate(ints["ranges"]) if len(r) == 5 and r[1] == 0)
    second = first + 1

    def crafted(change: Callable[[list[Any], list[Any]], None]) -> None:
        body = json.loads(json.dumps(original))
        blob = next(b for b in body["blobs"] if b["path"] == ints["path"])
        change(blob["ranges"][first], blob["ranges"][second])
        store.commit(key, encode_manifest(body), durable=False)
        with pytest.raises(safepoint.CorruptCheckpoint, match="bad byte range"):
            read_manifest(store, NAME, 2)

    crafted(lambda a, b: a.__setitem__(4, b[4]))  # the first chunk is not the file's name
    crafted(lambda a, b: a.__setitem__(2, original["files"][a[0]][1]))  # the whole file
    store.commit(key, encode_manifest(original), durable=False)
    assert_same(Checkpointer(NAME, location=store).restore(2).state, state_of(2))


def test_a_step_left_visible_by_a_failed_save_keeps_its_chunks(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save whose publish failed after the manifest was in place, and could not be
    rolled back, leaves its step visible: the writer reads the kept steps' chunks again,
    so that retention never deletes a chunk file that step names."""
    from safepoint.format import write as write_module

    store = safepoint.store.LocalStore(tmp_path / "s")
    retention = safepoint.keep_last(2) | safepoint.keep_every(2)  # step 2 stays
    ckpt = Checkpointer(NAME, location=store, incremental=True, keep=retention)
    ckpt.save(1, state_of(1))
    publish = store.publish

    def publish_then_fail(*args: Any, **kwargs: Any) -> Any:
        publish(*args, **kwargs)
        raise OSError(5, "the folder fsync failed")

    monkeypatch.setattr(store, "publish", publish_then_fail)
    monkeypatch.setattr(write_module, "_roll_back", lambda *args, **kwargs: True)  # no undo
    with pytest.raises(safepoint.SaveFailed, match="committed but may not be durable"):
        ckpt.save(2, state_of(1, changed=2))  # names most of step 1's chunk files
    monkeypatch.setattr(store, "publish", publish)
    assert ckpt.steps() == [1, 2]
    ckpt.save(3, state_of(4))  # step 1 goes
    ckpt.save(4, state_of(4))  # the files only step 1 named go now
    ckpt.wait()
    assert ckpt.steps() == [2, 3, 4]
    assert verify_checkpoint(store, NAME, 2).ok
    assert_same(ckpt.restore(2).state, state_of(1, changed=2))
    ckpt.close()
    report = safepoint.check(store)
    assert report.ok, report.findings
