"""A run's journal damaged in the middle: the run resumes from the newest intact record,
erases none, and ``verify`` names the damage; a damaged only record stops the run instead
of silently starting it over (which would truncate its outputs)."""

from __future__ import annotations

from pathlib import Path

import pytest

import safepoint
from conftest import Invoke
from safepoint.errors import CorruptCheckpoint, UnsupportedType
from safepoint.store.journal import HEADER, MAGIC, scan


class Stop(Exception):
    pass


def _run(root: Path, stop_at: int | None, out: Path | None = None) -> int:
    with safepoint.resume("stream", location=root, policy=safepoint.every(items=1)) as run:
        sink = run.open_output(out) if out else None
        for i in run.range(20):
            if i == stop_at:
                raise Stop
            run.state["total"] = run.state.get("total", 0) + i
            if sink:
                sink.write(f"{i}\n")
    return int(run.state["total"])


def test_damage_in_the_middle_of_a_run_journal(tmp_path: Path, invoke: Invoke) -> None:
    root = tmp_path / "store"
    with pytest.raises(Stop):
        _run(root, stop_at=12)
    journal = next((root / "stream").glob("run-*.journal"))
    data = bytearray(journal.read_bytes())
    records = scan(bytes(data)).records
    data[len(MAGIC) + HEADER + 3] ^= 0x40  # the first record's payload
    journal.write_bytes(bytes(data))
    result = invoke("verify", "stream", "-l", root)
    assert result.exit_code == 1 and "damaged" in result.stdout, result.output
    with pytest.warns(safepoint.CorruptCheckpointWarning, match=r"bytes 8-\d+ are damaged"):
        assert _run(root, stop_at=None) == sum(range(20))  # resumed at item 12, exact
    report = safepoint.check(root)
    assert report.ok and report.clean, report.findings  # the finished run left nothing behind
    assert len(records) > 2


def test_a_damaged_only_record_stops_the_run(tmp_path: Path) -> None:
    root, out = tmp_path / "store", tmp_path / "out.txt"
    with pytest.raises(Stop), safepoint.resume("stream", location=root,
                                               policy=safepoint.manual()) as run:
        sink = run.open_output(out)
        for i in run.range(20):
            sink.write(f"{i}\n")
            if i == 9:
                run.checkpoint()  # the one and only record
                raise Stop
    journal = next((root / "stream").glob("run-*.journal"))
    data = bytearray(journal.read_bytes())
    data[len(MAGIC) + HEADER + 1] ^= 0x01
    journal.write_bytes(bytes(data))
    before = out.read_bytes()
    with pytest.raises(CorruptCheckpoint, match=r"no intact record .*`safepoint rm stream` to "
                       "start over"):
        _run(root, stop_at=None, out=out)
    assert out.read_bytes() == before  # the output was not truncated by a fresh start


def test_a_state_that_contains_itself_is_refused_with_its_path(tmp_path: Path) -> None:
    loop: dict[str, object] = {"a": [1, 2]}
    loop["a"].append(loop)  # type: ignore[attr-defined]
    with pytest.raises(UnsupportedType, match=r"state\['x'\]\['a'\]\[2\]: the state tree contains itself"):
        safepoint.Checkpointer("c", location=tmp_path).save(1, {"x": loop})
    deep: object = 0
    for _ in range(500):
        deep = [deep]
    with pytest.raises(UnsupportedType, match="nests more than 200"):
        safepoint.Checkpointer("c", location=tmp_path).save(1, deep)
