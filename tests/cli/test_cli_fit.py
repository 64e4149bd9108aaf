"""Every command at 80 columns (nothing wider, sizes and step numbers whole) and with
``--json`` (parseable, the documented keys), on a store with long names and long steps."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from cli_support import NARROW, Invoke, fits, interrupted_run, parse_json

from safepoint import Checkpointer
from safepoint.cli.tables import Column, fit
from safepoint.tasks import run_task, task

LONG = "a-rather-long-checkpoint-name-that-never-fits-in-one-cell"
SIZE = re.compile(r"\b\d+(\.\d)? (B|KiB|MiB|GiB|TiB)\b")


class Stop(Exception):
    pass


@task
def nightly(ctx: object, n: int) -> int:
    ctx.step("load", lambda: np.arange(5000))  # type: ignore[attr-defined]
    raise Stop  # after its first step, whose result is checkpoint step 1000000001


@pytest.fixture
def wide(tmp_path: Path) -> Path:
    """``train`` with steps 1, 2 and 1000000003 (a 2 MiB array, a list of 1,000 ints), a
    long name, a failed task whose checkpoint is step 1000000001, and an interrupted run."""
    root = tmp_path / "wide"
    train = Checkpointer("train", location=root)
    for step in (1, 2, 1_000_000_003):
        train.save(step, {"w": np.zeros(1 << 18), "numbers": list(range(1000)),
                          "config": {"lr": 0.1, "name": "x" * 60}})
    train.close()
    Checkpointer(LONG, location=root).save(5, {"x": 1})
    with pytest.raises(Stop):
        run_task(nightly, 3, job_id="nightly", location=root)
    interrupted_run(root, "sums", 4)
    return root


def sizes_whole(text: str, expected: int) -> None:
    """At least ``expected`` sizes in ``text``, each whole (a number and its unit)."""
    assert len(SIZE.findall(text)) >= expected, text
    assert not re.search(r"\d [KMGT]\s*$|\bKi\s*$", text, re.MULTILINE), text


def test_ls_fits_80_columns(invoke: Invoke, wide: Path) -> None:
    result = invoke("ls", "-l", wide, env=NARROW)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert fits(out), out
    assert "1000000003" in out and "train" in out and "nightly" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("name "))
    folded = "".join(line.split()[0] for line in lines[header + 2:] if line.strip())
    assert LONG in folded  # the long name folds onto several lines, whole
    assert lines[header].split() == ["name", "kind", "status", "steps", "latest", "progress",
                                     "age", "size"]  # all of them, 10-digit steps and all
    sizes_whole(out, 4)
    narrow = invoke("ls", "-l", wide, env={"COLUMNS": "60"}).stdout
    assert fits(narrow, 60) and "1000000003" in narrow
    assert ("(age, size left out to fit 60 columns; --json has everything)"
            in " ".join(narrow.split()))


def test_ls_at_120_columns_shows_every_column(invoke: Invoke, wide: Path) -> None:
    out = invoke("ls", wide, env={"COLUMNS": "120"}).stdout
    assert fits(out, 120) and "left out" not in out
    header = next(line for line in out.splitlines() if line.startswith("name "))
    assert header.split() == ["name", "kind", "status", "steps", "latest", "progress", "age",
                              "size"]
    sizes_whole(out, 4)


def test_show_fits_and_summarizes_long_containers(invoke: Invoke, wide: Path) -> None:
    result = invoke("show", "train", "-l", wide, env=NARROW)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert fits(out), out
    assert "train step 1000000003 (checkpoint)" in out
    assert "list of 1,000 int" in out and "state['numbers'][5]" not in out
    assert len(out.splitlines()) < 20
    sizes_whole(out, 2)
    assert "2.0 MiB" in out
    full = invoke("show", "train", "--all", "-l", wide, env=NARROW).stdout
    assert "state['numbers'][999]" in full and fits(full)


def test_show_json_tree_rows(invoke: Invoke, wide: Path) -> None:
    info = parse_json(invoke("show", "train", "-l", wide, "--json"))
    rows = {r["path"]: r for r in info["tree"]}
    keys = {"path", "type", "dtype", "shape", "value", "nbytes", "items", "item_types"}
    assert all(set(r) == keys for r in info["tree"])
    assert rows["state['w']"] == {"path": "state['w']", "type": "ndarray", "dtype": "float64",
                                  "shape": [1 << 18], "value": None, "nbytes": 8 << 18,
                                  "items": None, "item_types": None}
    assert rows["state['numbers']"]["items"] == 1000
    assert rows["state['numbers']"]["item_types"] == ["int"]
    assert rows["state['config']['lr']"]["value"] == "0.1"
    assert rows["state['config']['lr']"]["shape"] is None
    full = parse_json(invoke("show", "train", "--all", "-l", wide, "--json"))
    assert len(full["tree"]) == 1 + 1000 + 2


@pytest.mark.parametrize("name", ["nightly", "sums", LONG])
def test_show_of_each_kind_fits(invoke: Invoke, wide: Path, name: str) -> None:
    result = invoke("show", name, "-l", wide, env=NARROW)
    assert result.exit_code == 0, result.output
    assert fits(result.stdout), result.stdout
    info = parse_json(invoke("show", name, "-l", wide, "--json"))
    assert info["name"] == name


def test_show_a_run_shows_its_state_and_progress(invoke: Invoke, wide: Path) -> None:
    out = " ".join(invoke("show", "sums", "-l", wide, env=NARROW).stdout.split())
    assert "position 4 of 10 (40%)" in out
    assert "status idle: no writer" in out


def test_verify_fits(invoke: Invoke, wide: Path) -> None:
    result = invoke("verify", "-l", wide, env=NARROW)
    assert result.exit_code == 0, result.output
    assert fits(result.stdout), result.stdout
    assert "1000000003" in result.stdout and "1000000001" in result.stdout
    sizes_whole(result.stdout, 5)
    data = parse_json(invoke("verify", "-l", wide, "--json"))
    assert data["ok"] is True
    assert set(data["results"][0]) == {"name", "step", "ok", "checked_bytes", "problems"}


def test_gc_and_rm_fit_and_print_json(invoke: Invoke, wide: Path) -> None:
    leftover = wide / LONG / f"{9:012d}"
    leftover.mkdir()
    (leftover / "0123456789ab-0.bin").write_bytes(b"x" * 3000)
    result = invoke("gc", "-l", wide, env=NARROW)
    assert result.exit_code == 0, result.output
    assert fits(result.stdout), result.stdout
    text = "".join(result.stdout.split())  # lines fold inside long keys too
    assert "".join(f"kept {LONG}/000000000009/0123456789ab-0.bin (2.9 KiB): younger than 300 s: "
                   "a save may be in progress".split()) in text
    assert "1kept(2.9KiB):youngerthan300s" in text and "--min-age0" in text
    report = parse_json(invoke("gc", "-l", wide, "--json"))
    assert report["kept"] == [{"key": f"{LONG}/000000000009/0123456789ab-0.bin", "nbytes": 3000, "what": "kept",
                               "reason": "younger than 300 s: a save may be in progress"}]
    result = invoke("rm", LONG, "-l", wide, env=NARROW)
    assert result.exit_code == 0 and fits(result.stdout), result.stdout
    removed = parse_json(invoke("rm", "train", "--step", 1, "-l", wide, "--json"))
    assert removed == {"location": str(wide), "name": "train", "step": 1, "steps": 1, "kept": []}
    removed = parse_json(invoke("rm", "train", "-l", wide, "--json"))
    assert (removed["name"], removed["step"], removed["steps"]) == ("train", None, 2)


def test_help_of_every_command_fits(invoke: Invoke) -> None:
    for command in ("", "ls", "show", "verify", "rm", "gc", "watch", "diff", "export", "run",
                    "demo"):
        result = invoke(*([command] if command else []), "--help", env=NARROW)
        assert result.exit_code == 0, result.output
        assert fits(result.stdout), result.stdout


def test_fit_leaves_columns_out_by_priority_and_never_cuts_one() -> None:
    columns = [Column("name", wrap=True, min_width=6), Column("a", drop=2),
               Column("b", drop=1), Column("c")]
    rows = [["n" * 30, "x" * 20, "y" * 20, "z" * 20]]
    table, left_out = fit(None, columns, rows, 50)
    assert left_out == ["b"]  # b goes first; a stays, and name folds
    assert [c.header for c in table.columns] == ["name", "a", "c"]
    table, left_out = fit(None, columns, rows, 30)
    assert left_out == ["a", "b"]


DOCS = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
SCHEMAS = {
    "ls": {"name", "kind", "status", "steps", "latest_step", "progress", "complete", "position",
           "total", "attempt", "owner", "updated", "nbytes", "error", "message", "damaged",
           "problem", "shared"},
    "show step": {"name", "location", "kind", "step", "steps", "created", "nbytes",
                  "shared_bytes", "format_version", "metadata", "extra", "pickled", "run_damage", "tree"},
    "show execution": {"name", "location", "kind", "steps", "run", "table", "tree", "damage"},
    "run": {"name", "position", "total", "progress", "attempt", "complete", "updated", "nbytes",
            "loop", "kind", "liveness", "owner", "message", "error", "steps"},
    "watch": {"location", "time", "names"},
    "watch name": {"age", "rate", "rate_unit", "eta"},
    "verify": {"ok", "location", "results"},
    "gc": {"location", "count", "nbytes", "removed", "kept"},
    "rm": {"location", "name", "step", "steps", "kept"},
}


def test_json_schemas_are_stable_and_documented(invoke: Invoke, wide: Path) -> None:
    found = {
        "ls": set(parse_json(invoke("ls", wide, "--json"))[0]),
        "show step": set(parse_json(invoke("show", "train", "-l", wide, "--json"))),
        "show execution": set(execution := parse_json(invoke("show", "sums", "-l", wide,
                                                                "--json"))),
        "run": set(execution["run"]),
        "watch": set(watched := parse_json(invoke("watch", wide, "--once", "--json"))),
        "watch name": set(watched["names"][0]) - SCHEMAS["ls"],
        "verify": set(parse_json(invoke("verify", "-l", wide, "--json"))),
        "gc": set(parse_json(invoke("gc", "-l", wide, "--json"))),
        "rm": set(parse_json(invoke("rm", "sums", "-l", wide, "--json"))),
    }
    assert found == SCHEMAS
    for keys in SCHEMAS.values():
        for key in keys:
            assert f"`{key}`" in DOCS, f"{key} is not documented in docs/cli.md"
