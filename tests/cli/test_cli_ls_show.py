"""``safepoint ls`` and ``safepoint show`` on stores written by the Checkpointer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_support import Invoke, interrupted_run, parse_json, weights

from safepoint import Checkpointer
from safepoint.cli.output import human_age, human_bytes
from safepoint.store import LocalStore


def rows(stdout: str) -> dict[str, list[str]]:
    """Table rows of ``ls`` by name (the first cell), split on runs of spaces."""
    table = {}
    for line in stdout.splitlines():
        cells = line.split()
        if cells and cells[0] in ("train", "prep", "solo"):
            table[cells[0]] = cells
    return table


def test_ls_lists_each_name_with_kind_steps_and_latest(invoke: Invoke, store_dir: Path) -> None:
    result = invoke("ls", store_dir)
    assert result.exit_code == 0, result.output
    table = rows(result.stdout)
    assert set(table) == {"train", "prep", "solo"}
    assert table["train"][1:5] == ["checkpoint", "-", "3", "30"]
    assert table["prep"][1:6] == ["flow", "idle", "2", "-", "50%"]  # two steps recorded
    assert table["solo"][1:5] == ["checkpoint", "-", "1", "7"]
    assert "just now" in result.stdout


def test_ls_json_matches_the_store(invoke: Invoke, store_dir: Path) -> None:
    result = invoke("ls", store_dir, "--json")
    assert result.exit_code == 0, result.output
    by_name = {entry["name"]: entry for entry in parse_json(result)}
    assert list(by_name) == ["prep", "solo", "train"]
    train = by_name["train"]
    assert (train["kind"], train["steps"], train["latest_step"]) == ("checkpoint", 3, 30)
    newest = [store_dir / "train" / "000000000030.json",
              *(store_dir / "train" / "000000000030").iterdir()]
    assert train["nbytes"] == sum(f.stat().st_size for f in newest)  # the newest step's bytes
    prep = by_name["prep"]
    assert (prep["progress"], prep["attempt"], prep["status"]) == (0.5, 2, "idle")
    assert prep["owner"]["pid"] == os.getpid() and prep["owner"]["kind"] == "flow"
    assert by_name["solo"]["progress"] is None


def test_ls_defaults_to_safepoint_dir(invoke: Invoke, tmp_path: Path) -> None:
    Checkpointer("here", location=tmp_path / "default").save(1, {"a": 1})
    result = invoke("ls", "--json")
    assert [e["name"] for e in parse_json(result)] == ["here"]


def test_ls_of_an_empty_store_says_so(invoke: Invoke, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = invoke("ls", tmp_path / "empty")
    assert result.exit_code == 0
    assert "no checkpoints in" in result.stdout


def test_ls_reads_an_fsspec_url(invoke: Invoke) -> None:
    Checkpointer("remote", location="memory://cli-ls-test").save(3, weights(3))
    result = invoke("ls", "memory://cli-ls-test", "--json")
    assert result.exit_code == 0, result.output
    assert [(e["name"], e["latest_step"]) for e in parse_json(result)] == [("remote", 3)]


def test_ls_counts_a_damaged_manifest(invoke: Invoke, store_dir: Path) -> None:
    manifest = store_dir / "train" / f"{30:012d}.json"
    manifest.write_bytes(manifest.read_bytes()[:-20])
    entry = next(e for e in parse_json(invoke("ls", store_dir, "--json")) if e["name"] == "train")
    assert (entry["steps"], entry["damaged"], entry["latest_step"]) == (3, 1, 30)
    assert "3 (1 bad)" in invoke("ls", store_dir).stdout


def test_ls_shows_runs_with_their_progress(invoke: Invoke, tmp_path: Path) -> None:
    from safepoint.run import describe_run

    store = tmp_path / "runs"
    interrupted_run(store, "journal", 4)
    interrupted_run(store, "arrays", 6, arrays=True)  # a run with arrays commits steps
    Checkpointer("plain", location=store).save(1, {"x": 1})
    listed = {e["name"]: e for e in parse_json(invoke("ls", store, "--json"))}
    assert set(listed) == {"journal", "arrays", "plain"}
    for name in ("journal", "arrays"):
        info = describe_run(LocalStore(store), name)
        assert info is not None
        entry = listed[name]
        assert entry["kind"] == "run"
        assert (entry["progress"], entry["attempt"], entry["complete"]) == (
            info.progress, info.attempt, info.complete)
    assert listed["journal"]["progress"] == pytest.approx(0.4)
    assert listed["plain"]["kind"] == "checkpoint"
    table = {line.split()[0]: line.split() for line in invoke("ls", store).stdout.splitlines()
             if line.split()[:1] in (["journal"], ["arrays"])}
    assert table["journal"][1:2] == ["run"] and "40%" in table["journal"]
    assert table["arrays"][1:2] == ["run"] and "60%" in table["arrays"]


def test_show_a_run(invoke: Invoke, tmp_path: Path) -> None:
    store = tmp_path / "runs"
    interrupted_run(store, "journal", 4)
    result = invoke("show", "journal", "-l", store)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "journal (run)" in out and "status   idle" in out and "attempt 1" in out
    assert "position 4 of 10 (40%)" in out
    info = parse_json(invoke("show", "journal", "-l", store, "--json"))
    assert (info["kind"], info["run"]["position"], info["run"]["total"]) == ("run", 4, 10)
    assert info["run"]["liveness"] == "idle" and info["run"]["owner"]["pid"] == os.getpid()


def test_show_a_run_shows_its_state(invoke: Invoke, tmp_path: Path) -> None:
    store = tmp_path / "runs"
    interrupted_run(store, "sums", 6, arrays=True)  # the state holds an array: a checkpoint
    interrupted_run(store, "small", 3)
    tree = {r["path"]: r for r in parse_json(invoke("show", "sums", "-l", store, "--json"))["tree"]}
    assert tree["state['w']"]["shape"] == [10000] and tree["state['w']"]["dtype"] == "float64"
    assert "state['w']" in invoke("show", "sums", "-l", store).stdout
    small = parse_json(invoke("show", "small", "-l", store, "--json"))
    assert small["tree"][0]["path"] == "state" and small["table"] == []


def test_show_prints_metadata_and_the_tree(invoke: Invoke, store_dir: Path) -> None:
    result = invoke("show", "train", "-l", store_dir)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "train step 30" in out
    assert "10, 20, 30" in out
    assert "loss = 0.0333" in out
    assert "state['w']" in out and "float32" in out and "(20000,)" in out
    assert "78.1 KiB" in out  # 20,000 float32
    assert "state['b']" in out and "int16" in out and "(64, 64)" in out


def test_show_a_given_step_as_json(invoke: Invoke, store_dir: Path) -> None:
    info = parse_json(invoke("show", "train", "--step", "20", "-l", store_dir, "--json"))
    assert (info["step"], info["steps"], info["metadata"]) == (20, [10, 20, 30], {"loss": 0.05})
    tree = {row["path"]: row for row in info["tree"]}
    assert tree["state['w']"]["nbytes"] == 80_000
    assert tree["state['b']"]["shape"] == [64, 64] and tree["state['b']"]["value"] is None
    assert tree["state['step']"]["shape"] is None  # a scalar: its value, not a shape
    assert (tree["state['step']"]["type"], tree["state['step']"]["value"]) == ("int", "20")


def test_show_renders_a_flow_table(invoke: Invoke, store_dir: Path) -> None:
    result = invoke("show", "prep", "-l", store_dir)
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.stdout.splitlines()]
    assert next(cells[:2] for cells in lines if cells[:1] == ["load"]) == ["load", "done"]
    assert next(cells[:2] for cells in lines if cells[:1] == ["clean"]) == ["clean", "failed"]
    assert "position" in result.stdout and "(50%)" in result.stdout and "attempt 2" in result.stdout
    assert "error    ValueError: bad row 2" in result.stdout
    out = result.stdout
    assert out.index("clean") < out.index("state['state']")  # the steps come before the state
    info = parse_json(invoke("show", "prep", "-l", store_dir, "--json"))
    assert [(r["name"], r["status"]) for r in info["table"]] == [("load", "done"), ("clean", "failed")]
    assert info["kind"] == "flow" and info["table"][1]["error"] == "ValueError: bad row 2"


def test_show_reads_no_blobs(invoke: Invoke, store_dir: Path) -> None:
    folder = store_dir / "train" / f"{30:012d}"
    for blob in folder.glob("*.bin"):
        blob.unlink()
    result = invoke("show", "train", "-l", store_dir)
    assert result.exit_code == 0, result.output
    assert "state['w']" in result.stdout


def test_show_missing_name_or_step_is_one_clear_line(invoke: Invoke, store_dir: Path) -> None:
    result = invoke("show", "nope", "-l", store_dir)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "no checkpoint named 'nope'" in result.stderr
    assert "Traceback" not in result.output
    result = invoke("show", "train", "--step", "15", "-l", store_dir)
    assert result.exit_code == 1
    assert "has no step 15" in result.stderr and "10, 20, 30" in result.stderr


def test_show_damaged_manifest_names_the_file(invoke: Invoke, store_dir: Path) -> None:
    manifest = store_dir / "solo" / f"{7:012d}.json"
    data = bytearray(manifest.read_bytes())
    data[-10] ^= 0x01
    manifest.write_bytes(bytes(data))
    result = invoke("show", "solo", "-l", store_dir)
    assert result.exit_code == 1
    assert str(manifest) in result.stderr and "checksum mismatch" in result.stderr


@pytest.mark.parametrize(("size", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 << 20, "5.0 MiB"), (3 << 40, "3.0 TiB")])
def test_human_bytes(size: int, text: str) -> None:
    assert human_bytes(size) == text


@pytest.mark.parametrize(("seconds", "text"), [
    (1, "just now"), (42, "42 s ago"), (200, "3 min ago"), (7300, "2 h ago"),
    (86400 * 1.5, "1 day ago"), (86400 * 9, "9 days ago"), (-30, "in the future")])
def test_human_age(seconds: float, text: str) -> None:
    assert human_age(seconds) == text


def test_an_unknown_store_url_is_one_clear_line(invoke: Invoke) -> None:
    result = invoke("ls", "nosuchproto://bucket/x")
    assert result.exit_code == 2
    assert result.stderr == "error: cannot open the store 'nosuchproto://bucket/x': Protocol not known: nosuchproto\n"


def test_a_damaged_run_record_is_reported_not_fatal(invoke: Invoke, tmp_path: Path) -> None:
    store = tmp_path / "runs"
    interrupted_run(store, "odd", 4, arrays=True)
    interrupted_run(store, "fine", 2)
    journal = next((store / "odd").glob("run-*.journal"))
    journal.write_bytes(journal.read_bytes()[:8] + b"\xff" * (journal.stat().st_size - 8))
    listed = {e["name"]: e for e in parse_json(invoke("ls", store, "--json"))}
    assert (listed["odd"]["kind"], listed["odd"]["damaged"]) == ("run", 1)
    assert "no intact record" in listed["odd"]["problem"]
    assert listed["fine"]["damaged"] == 0
    result = invoke("show", "odd", "-l", store)  # its checkpoints are still there to look at
    assert result.exit_code == 0, result.output
    assert "record   damaged:" in result.stdout and "no intact record" in result.stdout


def test_a_completed_flow_is_listed_complete_with_its_steps(invoke: Invoke, tmp_path: Path) -> None:
    from safepoint.flow import Flow

    store = tmp_path / "flows"
    flow = Flow("done", location=store)
    for name in ("a", "b", "c"):
        flow.step(name=name)(lambda state, data: None)
    flow.run()
    entry = parse_json(invoke("ls", store, "--json"))[0]
    assert (entry["status"], entry["complete"], entry["progress"]) == ("complete", True, 1.0)
    assert "position 3 of 3 (100%)" in invoke("show", "done", "-l", store).stdout


def test_ls_and_show_report_the_bytes_a_step_shares(invoke: Invoke, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from safepoint import knobs

    monkeypatch.setattr(knobs, "CHUNK_BYTES", 64 << 10)
    ckpt = Checkpointer("train", location=tmp_path / "inc", incremental=True)
    big = np.zeros(4 * (64 << 10) // 8)  # four chunks, three unchanged by step 2
    big[:] = np.arange(big.size)
    ckpt.save(1, {"w": big})
    big[0] = -1.0
    ckpt.save(2, {"w": big})
    listed = {e["name"]: e for e in parse_json(invoke("ls", tmp_path / "inc", "--json"))}
    assert listed["train"]["shared"] == 3 * (64 << 10)
    shown = parse_json(invoke("show", "train", "--location", tmp_path / "inc", "--json"))
    assert shown["shared_bytes"] == 3 * (64 << 10) and shown["format_version"] == 3
    assert shown["nbytes"] > 4 * (64 << 10)  # the logical size counts shared chunks in full
    text = invoke("show", "train", "--location", tmp_path / "inc").stdout
    assert "shared with" in text and human_bytes(3 * (64 << 10)) in text
    assert "shared)" in invoke("ls", tmp_path / "inc").stdout
