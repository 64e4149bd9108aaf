"""``safepoint verify``, ``rm`` and ``gc`` on real stores, damaged and with crash leftovers."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from cli_support import Invoke, interrupted_run, parse_json, weights

import safepoint
from safepoint import Checkpointer
from safepoint.cli import maintenance
from safepoint.format import checksum


def step_folder(store_dir: Path, name: str, step: int) -> Path:
    return store_dir / name / f"{step:012d}"


def flip_a_byte(path: Path, offset: int = 100) -> tuple[str, str]:
    """Flip one bit of ``path``; returns the checksums before and after."""
    data = bytearray(path.read_bytes())
    before = checksum(bytes(data))
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    return before, checksum(bytes(data))


# --------------------------------------------------------------------- verify


def test_verify_an_intact_store(invoke: Invoke, store_dir: Path) -> None:
    result = invoke("verify", "-l", store_dir)
    assert result.exit_code == 0, result.output
    assert "all 5 checkpoints intact" in result.stdout  # four steps and a flow's journal
    assert "prep journal ok" in " ".join(result.stdout.split())
    report = parse_json(invoke("verify", "-l", store_dir, "--json"))
    assert report["ok"] is True
    assert sorted((r["name"], r["step"] or -1) for r in report["results"]) == [
        ("prep", -1), ("solo", 7), ("train", 10), ("train", 20), ("train", 30)]
    checked = {(r["name"], r["step"]): r["checked_bytes"] for r in report["results"]}
    assert checked["train", 20] == 80_000 + 64 * 64 * 2


def test_verify_flipped_byte_exits_1_and_names_the_file(invoke: Invoke, store_dir: Path) -> None:
    manifest = Checkpointer("train", location=store_dir).manifest(20)
    ((rel, _),) = manifest.files  # both arrays in one pack
    blob = store_dir / "train" / rel
    _, offset, length, expected = next(
        r for b in manifest.blobs for r in b["ranges"] if r[1] <= 100 < r[1] + r[2])
    flip_a_byte(blob, offset=100)
    actual = checksum(blob.read_bytes()[offset : offset + length])
    result = invoke("verify", "train", "-l", store_dir)
    assert result.exit_code == 1
    out = " ".join(result.stdout.split())  # long lines may wrap
    assert str(blob) in out
    assert f"expected {expected}, got {actual}" in out
    assert "1 of 3 checkpoints are damaged" in out

    report = parse_json(invoke("verify", "-l", store_dir, "--json"))
    bad = [r for r in report["results"] if not r["ok"]]
    assert report["ok"] is False and [(r["name"], r["step"]) for r in bad] == [("train", 20)]
    assert str(blob) in bad[0]["problems"][0]
    # verify is safepoint.check's report, row for row
    found = safepoint.check(store_dir)
    assert [(c.name, c.step, c.ok, c.checked_bytes) for c in found.checked] == [
        (r["name"], r["step"], r["ok"], r["checked_bytes"]) for r in report["results"]]
    assert [f.key for f in found.damage] == [f"train/{20:012d}.json"]


def test_verify_finds_a_truncated_blob_and_a_damaged_manifest(invoke: Invoke, store_dir: Path) -> None:
    blob = next(step_folder(store_dir, "train", 10).glob("*.bin"))
    blob.write_bytes(blob.read_bytes()[:-1])
    flip_a_byte(store_dir / "solo" / "000000000007.json", offset=40)
    report = parse_json(invoke("verify", "-l", store_dir, "--json"))
    problems = {(r["name"], r["step"]): r["problems"] for r in report["results"] if not r["ok"]}
    assert set(problems) == {("train", 10), ("solo", 7)}
    assert "truncated" in problems["train", 10][0]
    assert "manifest checksum mismatch" in problems["solo", 7][0]
    assert invoke("verify", "-l", store_dir).exit_code == 1


def test_verify_of_a_missing_name_fails_clearly(invoke: Invoke, store_dir: Path) -> None:
    result = invoke("verify", "ghost", "-l", store_dir)
    assert result.exit_code == 1
    assert "no checkpoint named 'ghost'" in result.stderr


def test_verify_checks_a_run_journal(invoke: Invoke, tmp_path: Path) -> None:
    store = tmp_path / "runs"
    interrupted_run(store, "stream", 4)  # a run without arrays commits to its journal only
    journal = next((store / "stream").glob("run-*.journal"))
    report = parse_json(invoke("verify", "stream", "-l", store, "--json"))
    assert report["ok"] is True
    assert [(r["name"], r["step"], r["checked_bytes"]) for r in report["results"]] == [
        ("stream", None, journal.stat().st_size)]
    assert "stream journal ok" in " ".join(invoke("verify", "-l", store).stdout.split())

    journal.write_bytes(b"garbage!" + journal.read_bytes()[8:])  # the header is gone
    result = invoke("verify", "-l", store)
    assert result.exit_code == 1, result.output
    out = " ".join(result.stdout.split())
    assert f"stream journal: {journal}" in out and "not a safepoint journal" in out
    assert "`safepoint rm NAME` removes it, and it then starts over" in out and "checkpoints are damaged" not in out
    report = parse_json(invoke("verify", "stream", "-l", store, "--json"))
    assert report["ok"] is False and report["results"][0]["step"] is None


def test_verify_shows_progress_over_bytes_for_a_large_store(
    invoke: Invoke, store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(maintenance, "PROGRESS_MIN_BYTES", 100_000)  # the store holds ~260 KB
    result = invoke("verify", "-l", store_dir, env={"TTY_COMPATIBLE": "1"})  # a live display
    assert result.exit_code == 0
    assert "verifying" in result.stderr and "KiB" in result.stderr
    monkeypatch.setattr(maintenance, "PROGRESS_MIN_BYTES", 10 << 20)
    result = invoke("verify", "-l", store_dir, env={"TTY_COMPATIBLE": "1"})
    assert "verifying" not in result.stderr  # small store, stdout not a terminal: no bar


# ------------------------------------------------------------------------- rm


def test_rm_removes_a_name(invoke: Invoke, store_dir: Path) -> None:
    result = invoke("rm", "train", "-l", store_dir)
    assert result.exit_code == 0, result.output
    assert "removed train (3 steps)" in result.stdout
    assert not (store_dir / "train").exists()
    assert sorted(p.name for p in store_dir.iterdir()) == [".safepoint-store", "prep", "solo"]


def test_rm_one_step(invoke: Invoke, store_dir: Path) -> None:
    result = invoke("rm", "train", "--step", "20", "-l", store_dir)
    assert result.exit_code == 0, result.output
    assert Checkpointer("train", location=store_dir).steps() == [10, 30]
    restored = Checkpointer("train", location=store_dir).restore(10)
    assert (restored.state["w"] == weights(10)["w"]).all()


def test_rm_missing_name_or_step_exits_1(invoke: Invoke, store_dir: Path) -> None:
    result = invoke("rm", "ghost", "-l", store_dir)
    assert result.exit_code == 1 and "nothing safepoint wrote is named 'ghost'" in result.stderr
    result = invoke("rm", "train", "--step", "11", "-l", store_dir)
    assert result.exit_code == 1 and "has no step 11" in result.stderr
    assert Checkpointer("train", location=store_dir).steps() == [10, 20, 30]


@pytest.mark.parametrize("name", ["..", "../store", "train/000000000010", "/etc", ".hidden", "a b"])
def test_rm_rejects_names_that_could_escape(invoke: Invoke, store_dir: Path, name: str) -> None:
    before = sorted(p.relative_to(store_dir.parent) for p in store_dir.parent.rglob("*"))
    result = invoke("rm", name, "-l", store_dir / "train")
    assert result.exit_code == 1
    assert "invalid name" in result.stderr and "Traceback" not in result.output
    assert sorted(p.relative_to(store_dir.parent) for p in store_dir.parent.rglob("*")) == before


# ------------------------------------------------------------------------- gc


def make_leftovers(store_dir: Path, age: float) -> list[Path]:
    """What a crashed save leaves: a step folder without a manifest, and an orphan blob."""
    folder = step_folder(store_dir, "train", 40)
    folder.mkdir()
    dead = folder / f"dead{int(age):08x}-0.bin"  # named like a data file: <save id>-<k>.bin
    dead.write_bytes(b"x" * 1000)
    orphan = step_folder(store_dir, "train", 30) / f"0e{int(age):010x}-0.bin"
    orphan.write_bytes(b"y" * 500)
    old = time.time() - age
    for path in (dead, folder, orphan):
        os.utime(path, (old, old))
    return [folder, orphan]


def test_gc_removes_old_leftovers_only(invoke: Invoke, store_dir: Path) -> None:
    folder, orphan = make_leftovers(store_dir, age=3600)
    step_folder(store_dir, "solo", 7).mkdir()
    fresh = step_folder(store_dir, "solo", 7) / "f0e5f0e5f0e5-0.bin"
    fresh.write_bytes(b"z" * 10)
    report = parse_json(invoke("gc", "-l", store_dir, "--json"))
    assert report["count"] == 2 and report["nbytes"] == 1500
    removed = {r["key"] for r in report["removed"]}
    assert removed == {"train/000000000040", f"train/000000000030/{orphan.name}"}
    assert not folder.exists() and not orphan.exists()
    assert fresh.exists()  # younger than --min-age (300 s by default): maybe a save in flight
    assert Checkpointer("train", location=store_dir).steps() == [10, 20, 30]
    assert invoke("verify", "-l", store_dir).exit_code == 0

    result = invoke("gc", "--min-age", "0", "-l", store_dir)
    assert result.exit_code == 0
    assert "1 leftover removed, 10 B freed" in result.stdout
    assert not fresh.exists()


def test_gc_respects_min_age(invoke: Invoke, store_dir: Path) -> None:
    folder, orphan = make_leftovers(store_dir, age=100)
    result = invoke("gc", "-l", store_dir)
    assert result.exit_code == 0 and "0 leftovers removed" in result.stdout
    assert folder.exists() and orphan.exists()
    said = " ".join(result.stdout.split())  # what it kept, how big, and why
    assert (f"kept train/000000000030/{orphan.name} (500 B): younger than 300 s: a save may be "
            "in progress") in said
    assert "2 kept (1.5 KiB): younger than 300 s, so a save may still be writing them" in said
    report = parse_json(invoke("gc", "--min-age", "60", "-l", store_dir, "--json"))
    assert report["count"] == 2
    assert not folder.exists() and not orphan.exists()


def test_verify_reports_a_run_whose_checkpoint_is_missing(invoke: Invoke, tmp_path: Path) -> None:
    store = tmp_path / "runs"
    interrupted_run(store, "arrays", 4, arrays=True)  # its state is a checkpoint step
    (step,) = Checkpointer("arrays", location=store).steps()
    Checkpointer("arrays", location=store).delete(step)
    result = invoke("verify", "arrays", "-l", store)
    assert result.exit_code == 1, result.output
    assert f"refers to checkpoint step {step}, which is missing" in " ".join(result.stdout.split())
