"""The journal: newest intact record wins; torn and damaged tails are ignored and cut off
by the next writer; compaction keeps the newest record and bounds the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from safepoint.errors import CorruptCheckpoint
from safepoint.store import LocalStore
from safepoint.store.journal import MAGIC, PREALLOCATE, Journal, frame, read_journal, scan

KEY = "job/run.journal"


def written(tmp_path: Path, payloads: list[bytes], **options: object) -> tuple[LocalStore, Path]:
    store = LocalStore(tmp_path / "store")
    journal = Journal(store, KEY, **options)
    assert journal.open() is None
    for payload in payloads:
        journal.append(payload)
    journal.close()
    return store, store.path(KEY)


def test_newest_record_wins_and_survives_reopening(tmp_path: Path) -> None:
    store, path = written(tmp_path, [b"one", b"two", b"three"])
    assert read_journal(store, KEY) == (b"three", path.stat().st_size)
    journal = Journal(store, KEY)
    assert journal.open() == b"three"
    journal.append(b"four")
    journal.close()
    assert read_journal(store, KEY)[0] == b"four"
    assert scan(path.read_bytes()).records == 4


def test_no_journal_reads_as_none_and_a_run_that_never_commits_leaves_no_file(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    assert read_journal(store, KEY) == (None, 0)
    journal = Journal(store, KEY)
    assert journal.open() is None
    journal.close()
    assert not store.path(KEY).exists()


@pytest.mark.parametrize("kept", [0, 3, 4, 7, 8, 9, 20])
def test_a_torn_tail_is_ignored_then_cleared_by_the_writer(tmp_path: Path, kept: int) -> None:
    store, path = written(tmp_path, [b"first-record"])
    data = bytearray(path.read_bytes())
    end = scan(bytes(data)).end
    torn = frame(b"second-record, never finished")
    data[end : end + kept] = torn[:kept]  # the crash came after `kept` bytes of the record
    path.write_bytes(bytes(data))
    assert read_journal(store, KEY)[0] == b"first-record"
    journal = Journal(store, KEY)
    assert journal.open() == b"first-record"
    journal.append(b"third")
    journal.close()
    assert read_journal(store, KEY)[0] == b"third"
    after = path.read_bytes()
    assert after.startswith(MAGIC + frame(b"first-record") + frame(b"third"))
    assert not after[end + len(frame(b"third")) :].strip(b"\0")  # no trace of the torn record


def test_a_cut_file_falls_back_to_the_last_whole_record(tmp_path: Path) -> None:
    store, path = written(tmp_path, [b"first-record", b"second-record"])
    end = scan(path.read_bytes()).end
    path.write_bytes(path.read_bytes()[: end - 5])
    assert read_journal(store, KEY)[0] == b"first-record"


def test_commits_overwrite_space_written_in_advance(tmp_path: Path) -> None:
    store, path = written(tmp_path, [b"record 000"])
    journal = Journal(store, KEY)
    journal.open()
    growths = 0
    for i in range(1, 3000):
        before = path.stat().st_size
        journal.append(f"record {i:03d}".encode())
        growths += path.stat().st_size != before
    journal.close()
    assert read_journal(store, KEY)[0] == b"record 2999"
    assert growths <= 12  # the records went into zeros written ahead: few size changes
    assert path.stat().st_size <= 2 * 3000 * len(frame(b"record 000")) + PREALLOCATE


@pytest.mark.parametrize("where", ["length", "checksum", "payload"])
def test_a_flipped_byte_in_the_last_record_falls_back_to_the_one_before(tmp_path: Path, where: str) -> None:
    store, path = written(tmp_path, [b"older state", b"newer state"])
    data = bytearray(path.read_bytes())
    last = len(MAGIC) + len(frame(b"older state"))
    index = {"length": last, "checksum": last + 5, "payload": scan(bytes(data)).end - 3}[where]
    data[index] ^= 0x40
    path.write_bytes(bytes(data))
    assert read_journal(store, KEY)[0] == b"older state"


def test_a_damaged_record_in_the_middle_is_skipped(tmp_path: Path) -> None:
    _store, path = written(tmp_path, [b"a" * 20, b"b" * 20, b"c" * 20])
    data = bytearray(path.read_bytes())
    data[len(MAGIC) + len(frame(b"a" * 20)) + 10] ^= 0xFF  # payload byte of the second record
    path.write_bytes(bytes(data))
    found = scan(bytes(data))
    assert found.newest == b"c" * 20 and found.records == 2


def test_compaction_keeps_only_the_newest_record_and_bounds_the_size(tmp_path: Path) -> None:
    payloads = [f"state {i:04d}".encode() * 10 for i in range(500)]
    store, path = written(tmp_path, payloads, compact_bytes=4096)
    assert scan(path.read_bytes()).end <= 4096 + len(frame(payloads[-1]))
    assert path.stat().st_size <= 4096 + PREALLOCATE
    assert read_journal(store, KEY)[0] == payloads[-1]
    leftovers = [p.name for p in path.parent.iterdir() if p.name != path.name]
    assert leftovers == []  # the temporary files of compaction were renamed into place
    journal = Journal(store, KEY, compact_bytes=4096)
    assert journal.open() == payloads[-1]
    journal.append(b"after compaction")
    journal.close()
    assert read_journal(store, KEY)[0] == b"after compaction"


def test_something_else_than_a_journal_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.path(KEY).parent.mkdir(parents=True)
    store.path(KEY).write_bytes(b"not a journal at all")
    with pytest.raises(CorruptCheckpoint, match="not a safepoint journal"):
        read_journal(store, KEY)


def test_a_creation_cut_short_reads_as_empty(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.path(KEY).parent.mkdir(parents=True)
    store.path(KEY).write_bytes(MAGIC[:3])
    assert read_journal(store, KEY)[0] is None
    journal = Journal(store, KEY)
    assert journal.open() is None
    journal.append(b"fresh")
    journal.close()
    assert read_journal(store, KEY)[0] == b"fresh"
