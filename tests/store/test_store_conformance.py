"""The conformance suite every store backend runs: local directory, memory://, s3:// (moto).

Each test takes the ``store`` fixture (tests/conftest.py), so it runs once per backend.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from safepoint.errors import InvalidName
from safepoint.store import KeyInfo, LocalStore, Store

BAD_KEYS = ["../x", "a/../b", "/abs", "a//b", "", ".hidden/x", "a/.hid/x", "a\x00b", "a\nb",
            "a\\b", "..", "a/..", "-lead", "x" * 201]


def test_write_blob_joins_chunks_of_any_buffer_type(store: Store) -> None:
    array = np.arange(10, dtype=np.float64)
    chunks = [b"head-", bytearray(b"middle-"), memoryview(array), memoryview(b"")]
    store.write_blob("ck/000000000001/blob.bin", chunks, durable=True)
    expected = b"head-middle-" + array.tobytes()
    assert store.read("ck/000000000001/blob.bin") == expected
    info = store.stat("ck/000000000001/blob.bin")
    assert isinstance(info, KeyInfo)
    assert info.size == len(expected)
    assert info.mtime is None or info.mtime > 0


def test_write_blob_replaces_a_previous_value(store: Store) -> None:
    store.write_blob("k/a.bin", [b"a much longer first value"], durable=False)
    store.write_blob("k/a.bin", [b"short"], durable=False)
    assert store.read("k/a.bin") == b"short"
    assert store.stat("k/a.bin").size == 5


def test_empty_blob(store: Store) -> None:
    store.write_blob("k/empty.bin", [], durable=True)
    assert store.read("k/empty.bin") == b""
    assert store.stat("k/empty.bin").size == 0
    assert store.read_into("k/empty.bin", memoryview(bytearray(0))) == 0


def test_commit_publishes_and_replaces(store: Store) -> None:
    store.commit("n/000000000003/manifest.json", b"first", durable=True)
    assert store.read("n/000000000003/manifest.json") == b"first"
    store.commit("n/000000000003/manifest.json", b"second, longer", durable=True)
    assert store.read("n/000000000003/manifest.json") == b"second, longer"
    # no temporary file of the commit is left behind
    assert store.list("n/000000000003") == ["manifest.json"]


def test_commit_is_atomic_for_concurrent_readers(store: Store) -> None:
    values = [bytes([i]) * (256 << 10) for i in (1, 2)]
    store.commit("atomic/manifest.json", values[0], durable=False)
    seen: list[bytes] = []
    done = threading.Event()

    def read_loop() -> None:
        while not done.is_set():
            seen.append(store.read("atomic/manifest.json"))

    reader = threading.Thread(target=read_loop)
    reader.start()
    try:
        for i in range(20):
            store.commit("atomic/manifest.json", values[i % 2], durable=False)
    finally:
        done.set()
        reader.join()
    assert seen, "the reader never ran"
    assert all(value in values for value in seen), "a reader saw a partly written value"


def test_create_is_exclusive(store: Store) -> None:
    assert store.create("c/attempt-1", b"mine", durable=True) is True
    assert store.create("c/attempt-1", b"theirs", durable=True) is False
    assert store.read("c/attempt-1") == b"mine"
    assert store.list("c") == ["attempt-1"]


def test_create_race_has_one_winner(store: Store, backend: str) -> None:
    if backend == "memory":
        pytest.skip("memory:// has no exclusive create across threads (check, then put)")
    winners: list[int] = []
    barrier = threading.Barrier(6)

    def contend(i: int) -> None:
        barrier.wait()
        if store.create("race/lock", str(i).encode(), durable=False):
            winners.append(i)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1
    assert store.read("race/lock") == str(winners[0]).encode()


def test_missing_keys(store: Store) -> None:
    with pytest.raises(FileNotFoundError):
        store.read("nope/manifest.json")
    with pytest.raises(FileNotFoundError):
        store.stat("nope/manifest.json")
    with pytest.raises(FileNotFoundError):
        store.read_into("nope/x.bin", memoryview(bytearray(4)))
    assert store.exists("nope/manifest.json") is False
    assert store.list("nope") == []


def test_read_into_exact_larger_smaller_and_typed_buffers(store: Store) -> None:
    payload = bytes(range(256)) * 40
    store.write_blob("r/x.bin", [payload], durable=False)

    exact = bytearray(len(payload))
    assert store.read_into("r/x.bin", memoryview(exact)) == len(payload)
    assert exact == payload

    larger = bytearray(len(payload) + 100)
    assert store.read_into("r/x.bin", memoryview(larger)) == len(payload)
    assert larger[: len(payload)] == payload
    assert larger[len(payload) :] == bytes(100)

    smaller = bytearray(100)  # the size tells the caller the value did not fit
    assert store.read_into("r/x.bin", memoryview(smaller)) == len(payload)
    assert smaller == payload[:100]

    typed = np.zeros(len(payload) // 8, dtype=np.float64)
    assert store.read_into("r/x.bin", memoryview(typed)) == len(payload)
    assert typed.tobytes() == payload


def test_list_names_directly_under_a_prefix(store: Store) -> None:
    assert store.list("") == []
    store.write_blob("job/000000000002/b.bin", [b"b"], durable=False)
    store.write_blob("job/000000000002/a.bin", [b"a"], durable=False)
    store.commit("job/000000000010/manifest.json", b"m", durable=False)
    store.commit("job/journal", b"j", durable=False)
    store.commit("other/manifest.json", b"o", durable=False)
    assert store.list("") == ["job", "other"]
    assert store.list("job") == ["000000000002", "000000000010", "journal"]
    assert store.list("job/000000000002") == ["a.bin", "b.bin"]
    assert store.list("job/journal") == []  # a file has nothing under it
    assert store.list("job/00000000000") == []  # a prefix of a name is not a folder


def test_exists_sees_files_and_folders(store: Store) -> None:
    store.write_blob("e/000000000001/a.bin", [b"a"], durable=False)
    assert store.exists("e/000000000001/a.bin")
    assert store.exists("e/000000000001")
    assert not store.exists("e/000000000001/b.bin")


def test_delete_file_folder_and_missing(store: Store) -> None:
    store.write_blob("d/000000000001/a.bin", [b"a"], durable=False)
    store.write_blob("d/000000000001/sub/b.bin", [b"b"], durable=False)
    store.commit("d/000000000001/manifest.json", b"m", durable=False)
    store.write_blob("d/000000000002/a.bin", [b"a"], durable=False)

    store.delete("d/000000000002/a.bin")
    assert not store.exists("d/000000000002/a.bin")

    store.delete("d/000000000001")
    assert not store.exists("d/000000000001/manifest.json")
    assert not store.exists("d/000000000001/sub/b.bin")
    assert "000000000001" not in store.list("d")

    store.delete("d/000000000001")  # already gone: no error
    store.delete("never/existed")


def test_delete_everything_under_the_root(store: Store) -> None:
    store.write_blob("a/1.bin", [b"1"], durable=False)
    store.commit("b/manifest.json", b"2", durable=False)
    store.delete("")
    assert store.list("") == []


@pytest.mark.parametrize("key", BAD_KEYS)
def test_every_method_rejects_keys_that_escape(store: Store, key: str, tmp_path) -> None:
    calls = [
        lambda: store.write_blob(key, [b"x"], durable=False),
        lambda: store.commit(key, b"x", durable=False),
        lambda: store.create(key, b"x", durable=False),
        lambda: store.read(key),
        lambda: store.read_into(key, memoryview(bytearray(1))),
        lambda: store.stat(key),
        lambda: store.exists(key),
        lambda: store.list(key),
        lambda: store.delete(key),
    ]
    if key == "":  # the empty key is the root: no value there, but it can be listed
        calls = calls[:5]
    for call in calls:
        with pytest.raises(InvalidName):
            call()
    assert store.list("") == []
    if isinstance(store, LocalStore):
        assert not (store.root.parent / "x").exists()


def test_map_where_supported(store: Store) -> None:
    payload = np.arange(1000, dtype=np.int32).tobytes()
    store.write_blob("m/x.bin", [payload], durable=False)
    mapped = store.map("m/x.bin")
    if not store.supports_mmap:
        assert mapped is None
        return
    assert mapped is not None
    assert mapped.readonly
    assert bytes(mapped) == payload


def test_remove_empty_folder_never_removes_what_is_inside(store: Store) -> None:
    store.write_blob("n/full/a.bin", [b"data"], durable=False)
    store.remove_empty_folder("n/full")
    assert store.read("n/full/a.bin") == b"data"
    store.delete("n/full/a.bin")
    store.remove_empty_folder("n/full")
    store.remove_empty_folder("n/missing")  # absent: nothing to do, no error
    assert store.scan("n/full") == []
    if isinstance(store, LocalStore):  # real folders: the empty one is gone
        assert not store.path("n/full").exists()
