"""The journal: the newest intact record wins; a torn tail is told from damage in the
middle, which is reported and never erased; compaction keeps what it is given."""

from __future__ import annotations

from pathlib import Path

import pytest

from safepoint.errors import CorruptCheckpoint
from safepoint.store import LocalStore
from safepoint.store.journal import HEADER, MAGIC, PREALLOCATE, Journal, frame, read_journal, scan

KEY = "job/run.journal"


def written(tmp_path: Path, payloads: list[bytes], **options: object) -> tuple[LocalStore, Path]:
    store = LocalStore(tmp_path / "store")
    journal = Journal(store, KEY, **options)  # type: ignore[arg-type]
    assert journal.open().records == []
    for payload in payloads:
        journal.append(payload)
    journal.close()
    return store, store.path(KEY)


def newest(store: LocalStore) -> bytes | None:
    found, _ = read_journal(store, KEY)
    return None if found is None else found.newest


def test_newest_record_wins_and_survives_reopening(tmp_path: Path) -> None:
    store, path = written(tmp_path, [b"one", b"two", b"three"])
    found, size = read_journal(store, KEY)
    assert found is not None and found.newest == b"three" and size == path.stat().st_size
    journal = Journal(store, KEY)
    assert journal.open().newest == b"three"
    assert journal.append(b"four") == 4
    journal.close()
    assert [seq for seq, _ in scan(path.read_bytes()).records] == [1, 2, 3, 4]
    assert newest(store) == b"four"


def test_no_journal_reads_as_none_and_a_run_that_never_commits_leaves_no_file(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    assert read_journal(store, KEY) == (None, 0)
    journal = Journal(store, KEY)
    assert journal.open().records == []
    journal.close()
    assert not store.path(KEY).exists()


@pytest.mark.parametrize("kept", [0, 3, 4, 7, 8, HEADER, HEADER + 9, 40])
def test_a_torn_tail_is_ignored_then_cleared_by_the_writer(tmp_path: Path, kept: int) -> None:
    store, path = written(tmp_path, [b"first-record"])
    data = bytearray(path.read_bytes())
    end = scan(bytes(data)).end
    torn = frame(2, b"second-record, never finished")
    data[end : end + kept] = torn[:kept]  # the crash came after `kept` bytes of the record
    path.write_bytes(bytes(data))
    found = scan(bytes(data))
    assert found.newest == b"first-record" and not found.damage and (found.torn > 0) == (kept > 0)
    journal = Journal(store, KEY)
    assert journal.open().newest == b"first-record"
    journal.append(b"third")
    journal.close()
    after = path.read_bytes()
    assert after.startswith(MAGIC + frame(1, b"first-record") + frame(2, b"third"))
    assert not after[end + len(frame(2, b"third")) :].strip(b"\0")  # no trace of the torn one


def test_a_cut_file_falls_back_to_the_last_whole_record(tmp_path: Path) -> None:
    store, path = written(tmp_path, [b"first-record", b"second-record"])
    end = scan(path.read_bytes()).end
    path.write_bytes(path.read_bytes()[: end - 5])
    assert newest(store) == b"first-record"


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
    assert newest(store) == b"record 2999"
    assert growths <= 12  # the records went into zeros written ahead: few size changes
    assert path.stat().st_size <= 2 * 3000 * len(frame(1, b"record 000")) + PREALLOCATE


PAYLOADS = [f"state {i:02d} ".encode() * (1 + i % 3) for i in range(12)]


def _bounds(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each record of an intact journal."""
    bounds, pos = [], len(MAGIC)
    for _, payload in scan(data).records:
        bounds.append((pos, pos + HEADER + len(payload)))
        pos += HEADER + len(payload)
    return bounds


def test_every_flipped_byte_is_survived_and_damage_is_told_from_a_torn_tail(tmp_path: Path) -> None:
    """Flip each byte of a journal of many records, one at a time. A flip in the last record
    looks like a commit cut short: the one before wins, nothing is reported. A flip anywhere
    else is damage: the newest record still wins, the damage is reported, and a writer
    opening the journal erases no intact record."""
    store, path = written(tmp_path, PAYLOADS)
    original = path.read_bytes()
    bounds = _bounds(original)
    for position in range(len(original)):
        data = bytearray(original)
        data[position] ^= 0xFF
        if position < len(MAGIC):
            with pytest.raises(CorruptCheckpoint):
                scan(bytes(data))
            continue
        found = scan(bytes(data))
        hit = next((i for i, (start, end) in enumerate(bounds) if start <= position < end), None)
        intact = [p for i, p in enumerate(PAYLOADS) if i != hit]
        assert [p for _, p in found.records] == intact, position
        if hit is None or hit == len(PAYLOADS) - 1:  # the tail: a torn commit, not damage
            assert not found.damage, position
        else:
            assert found.damage and str(bounds[hit][0]) in found.damage[0], position
        path.write_bytes(bytes(data))
        journal = Journal(store, KEY)
        assert journal.open().newest == intact[-1]
        journal.append(b"after")
        journal.close()
        assert [p for _, p in scan(path.read_bytes()).records] == [*intact, b"after"], position
    path.write_bytes(original)


def test_a_damaged_first_record_is_damage_not_an_empty_log(tmp_path: Path) -> None:
    store, path = written(tmp_path, [b"only one"])
    data = bytearray(path.read_bytes())
    data[len(MAGIC) + HEADER + 2] ^= 0x01
    path.write_bytes(bytes(data))
    found = scan(bytes(data))
    assert found.records == [] and "first record" in found.damage[0]
    with pytest.raises(CorruptCheckpoint, match="no intact record") as info:
        Journal(store, KEY).open()  # a run must not silently start over
    assert f"`safepoint rm {KEY.rpartition('/')[0]}` to start over" in str(info.value)


def test_compaction_keeps_what_it_is_given_and_bounds_the_size(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    journal = Journal(store, KEY, compact_bytes=4096)
    journal.open()
    payloads = [f"state {i:04d}".encode() * 10 for i in range(500)]
    for payload in payloads:
        journal.append(payload)
        if journal.due:
            journal.replace([b"steps so far", payload])
    journal.close()
    path = store.path(KEY)
    found = scan(path.read_bytes())
    assert found.end <= 4096 + 2 * len(frame(1, payloads[-1]))
    assert path.stat().st_size <= 4096 + PREALLOCATE
    assert found.newest == payloads[-1] and found.seq >= 500
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    journal = Journal(store, KEY)
    assert journal.open().newest == payloads[-1]
    journal.append(b"after compaction")
    journal.close()
    assert newest(store) == b"after compaction"


@pytest.mark.parametrize(("content", "message"), [
    (b"not a journal at all", "not a safepoint journal"),
    (b"SPJRNL1\n" + bytes(20), "another version"),
    (MAGIC[:3], "too short"),
])
def test_something_else_than_a_journal_is_refused(tmp_path: Path, content: bytes, message: str) -> None:
    store = LocalStore(tmp_path / "store")
    store.path(KEY).parent.mkdir(parents=True)
    store.path(KEY).write_bytes(content)
    with pytest.raises(CorruptCheckpoint, match=message):
        read_journal(store, KEY)
