"""``safepoint.check``: one consistency check of a whole store; it reports, and only with
``fix=True`` removes leftovers (never damage, never what safepoint did not write)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np
import pytest

import safepoint
from safepoint import Checkpointer, check
from safepoint.policy import manual
from safepoint.run import resume


class Crash(Exception):
    pass


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    ckpt = Checkpointer("train", location=root)
    for step in (1, 2):
        ckpt.save(step, {"w": np.full(10_000, float(step))})
    ckpt.close()
    with pytest.raises(Crash), safepoint.resume("job", location=root,
                                                policy=safepoint.every(items=1)) as run:
        for i in run.range(5):
            run.state["n"] = i
            if i == 3:
                raise Crash
    return root


def _leave_leftovers(root: Path) -> list[Path]:
    """What crashed saves leave: a step folder without a manifest, a manifest above the
    newest step, a temporary file; plus an older writer's lease ticket."""
    folder = root / "train" / "000000000009"
    folder.mkdir()
    (folder / "0123456789ab-0.bin").write_bytes(b"x" * 100)
    manifest = root / "train" / "000000000010.json"
    manifest.write_bytes((root / "train" / "000000000002.json").read_bytes())
    temp = root / "train" / ".000000000011.json.0123456789ab.tmp"
    temp.write_bytes(b"{")
    ticket = root / "job" / "lease" / "00000000.released"
    ticket.write_text("{}")
    return [folder, manifest, temp, ticket]


def test_a_sound_store_is_ok_and_clean(store: Path) -> None:
    report = safepoint.check(store)
    assert report.ok and report.clean, report.findings
    assert report.names == {"job": "run", "train": "checkpoint"}
    assert report.steps == 2 and report.records >= 1 and report.checked_bytes >= 160_000


def test_check_reports_leftovers_and_removes_them_only_with_fix(store: Path) -> None:
    leftovers = _leave_leftovers(store)
    before = _files(store)
    report = safepoint.check(store)
    assert report.ok and not report.clean
    found = {f.key for f in report.leftovers}
    assert {"train/000000000009", "train/000000000010.json", "job/lease/00000000.released"} <= found
    assert _files(store) == before  # reporting touches nothing
    fixed = safepoint.check(store, fix=True)
    assert {f.key for f in fixed.removed} >= found
    assert not any(p.exists() for p in leftovers)
    report = safepoint.check(store)
    assert report.ok and report.clean, report.findings
    assert Checkpointer("train", location=store).restore().step == 2


def test_young_leftovers_are_kept_with_the_reason(store: Path) -> None:
    folder = store / "train" / "000000000009"
    folder.mkdir()
    (folder / "0123456789ab-0.bin").write_bytes(b"x")
    report = safepoint.check(store, fix=True, min_age=3600)
    assert folder.exists()
    kept = [f for f in report.findings if f.what == "kept"]
    assert kept and "a save may be in progress" in kept[0].detail
    old = time.time() - 7200
    for path in (folder, folder / "0123456789ab-0.bin"):
        os.utime(path, (old, old))
    safepoint.check(store, fix=True, min_age=3600)
    assert not folder.exists()


def test_damage_is_reported_and_never_removed(store: Path) -> None:
    manifest = Checkpointer("train", location=store).manifest(1)
    ((rel, _),) = manifest.files
    blob = store / "train" / rel
    data = bytearray(blob.read_bytes())
    data[10] ^= 0xFF
    blob.write_bytes(bytes(data))
    report = safepoint.check(store, fix=True)
    assert not report.ok and [f.key for f in report.damage] == ["train/000000000001.json"]
    assert blob.exists()  # evidence: `safepoint rm` removes it, not check
    assert safepoint.check(store, data=False).ok  # sizes and manifests only: not seen


def test_what_safepoint_did_not_write_is_left_alone(store: Path) -> None:
    stray = store / "train" / "000000000002" / "notes.txt"
    stray.write_text("mine")
    report = safepoint.check(store, fix=True)
    assert stray.exists() and report.ok
    assert any(f.what == "foreign" and f.key.endswith("notes.txt") for f in report.findings)


def test_a_missing_location_holds_nothing(tmp_path: Path) -> None:
    report = safepoint.check(tmp_path / "nothing")
    assert report.ok and report.clean and report.names == {}


def test_a_log_with_no_intact_record_is_damage_and_its_steps_are_still_checked(tmp_path: Path) -> None:
    """verify's rows come from check(): a run whose log has no intact record is one damaged
    row, and the checkpoint step it wrote is verified all the same (and not removed)."""
    store = tmp_path / "store"

    class Stop(Exception):
        pass

    with contextlib.suppress(Stop), resume("arrays", location=store, policy=manual()) as run:
        run.state["w"] = np.arange(100_000.0)
        for i in run.range(10):
            if i == 3:
                run.checkpoint()
                raise Stop
    (journal,) = (store / "arrays").glob("run-*.journal")
    data = bytearray(journal.read_bytes())
    data[16:] = bytes(b ^ 0xFF for b in data[16:])
    journal.write_bytes(bytes(data))
    report = check(store, fix=True)
    log, step = report.checked
    assert log.step is None and not log.ok and "no intact record" in log.problems[0]
    assert step.ok and step.checked_bytes == 800_000
    assert [f.what for f in report.findings] == ["damage"] and not report.removed
