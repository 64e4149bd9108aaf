"""``safepoint diff`` and ``safepoint export``: tables at 80 columns, --json, one-line errors."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from cli_support import NARROW, Invoke, fits, one_line_error, parse_json, weights

from safepoint import Checkpointer


@pytest.fixture
def changed(tmp_path: Path) -> Path:
    """``m``: step 1, then step 2 with one array changed, one removed, one added, and a
    scalar and a long-named leaf changed."""
    root = tmp_path / "store"
    ckpt = Checkpointer("m", location=root)
    a = weights(1)
    a["old"] = np.zeros(4, np.int16)
    a["a_rather_long_key_name_for_the_table"] = {"inner_layer_weights": np.zeros(3000)}
    ckpt.save(1, a)
    b = weights(1)
    b["w"] = b["w"].copy()
    b["w"][17] += 1.25
    b["step"] = 2
    b["new"] = np.ones((2, 2))
    b["a_rather_long_key_name_for_the_table"] = {"inner_layer_weights": np.full(3000, 0.5)}
    ckpt.save(2, b)
    return root


# ============================================================================== diff


def test_diff_prints_a_table_that_fits_80_columns(invoke: Invoke, changed: Path) -> None:
    result = invoke("diff", "m", 1, 2, "-l", changed, env=NARROW)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert fits(out), out
    assert out.startswith("m step 1 -> step 2 in ")
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.strip().startswith("state[")}
    assert rows["state['w']"][1:] == ["data", "float32", "(20000,)", "1.25"]
    assert rows["state['step']"][1:] == ["value", "1", "->", "2", "1"]
    assert rows["state['old']"][1:] == ["removed", "int16", "(4,)"]
    assert rows["state['new']"][1:] == ["added", "float64", "(2,", "2)"]
    assert "inner_layer_weights" in out.replace("\n", "").replace(" ", "")
    assert "1 added, 1 removed, 3 changed, 2 unchanged" in out


def test_diff_exit_status_is_0_when_nothing_differs(invoke: Invoke, changed: Path) -> None:
    result = invoke("diff", "m", 2, 2, "-l", changed, env=NARROW)
    assert result.exit_code == 0, result.output
    assert "no differences (6 leaves, all the same)" in result.stdout
    assert fits(result.stdout)


def test_diff_json(invoke: Invoke, changed: Path) -> None:
    result = invoke("diff", "m", 1, 2, "-l", changed, "--json", env=NARROW)
    assert result.exit_code == 0, result.output
    info = parse_json(result)
    assert (info["name"], info["a"], info["b"], info["values"], info["identical"]) == (
        "m", 1, 2, True, False)
    assert info["counts"] == {"added": 1, "removed": 1, "changed": 3, "unchanged": 2}
    leaves = {leaf["path"]: leaf for leaf in info["leaves"]}
    assert leaves["state['w']"]["max_abs_diff"] == 1.25
    assert leaves["state['w']"]["a"] == {"type": "ndarray", "dtype": "float32", "shape": [20000],
                                         "value": None, "nbytes": 80000}
    assert leaves["state['new']"]["a"] is None and leaves["state['new']"]["status"] == "added"
    assert leaves["state['a_rather_long_key_name_for_the_table']['inner_layer_weights']"][
        "max_abs_diff"] == 0.5


def test_diff_no_values_reads_manifests_only(invoke: Invoke, changed: Path) -> None:
    for data in (changed / "m").glob("*/*.bin"):
        data.unlink()
    result = invoke("diff", "m", 1, 2, "-l", changed, "--no-values", env=NARROW)
    assert result.exit_code == 0, result.output
    assert "(values not compared: --no-values)" in result.stdout and fits(result.stdout)
    info = parse_json(invoke("diff", "m", 1, 2, "-l", changed, "--no-values", "--json"))
    assert info["values"] is False
    assert all(leaf["max_abs_diff"] is None for leaf in info["leaves"])
    one_line_error(invoke("diff", "m", 1, 2, "-l", changed), "data file is missing")


def test_diff_errors_are_one_line(invoke: Invoke, changed: Path, tmp_path: Path) -> None:
    one_line_error(invoke("diff", "nope", 1, 2, "-l", changed), "no checkpoint named 'nope'")
    one_line_error(invoke("diff", "m", 1, 7, "-l", changed), "has no step 7", "its steps are 1, 2")
    one_line_error(invoke("diff", "../x", 1, 2, "-l", changed))
    one_line_error(invoke("diff", "m", 1, 2, "-l", "nosuchproto://b/x"), "cannot open the store",
                   status=2)
    assert not (tmp_path / "default").exists()  # nothing created by a failed look-up


def test_diff_uses_the_default_store(invoke: Invoke, tmp_path: Path) -> None:
    ckpt = Checkpointer("here", location=tmp_path / "default")
    ckpt.save(1, {"x": 1})
    ckpt.save(2, {"x": 5})
    info = parse_json(invoke("diff", "here", 1, 2, "--json"))
    assert info["leaves"][0]["max_abs_diff"] == 4


# ============================================================================ export


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pt"])
def test_export_shows_what_it_wrote_at_80_columns(invoke: Invoke, changed: Path, tmp_path: Path,
                                                  suffix: str) -> None:
    if suffix == ".pt":
        pytest.importorskip("torch")
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    target = tmp_path / f"out{suffix}"
    result = invoke("export", "m", "--to", target, "-l", changed, env=NARROW)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert fits(out), out
    assert target.exists()
    flat = "".join(out.split())
    assert f"exportedmstep2to{''.join(str(target).split())}" in flat
    assert "78.1KiB" in flat  # state['w']: 20,000 float32
    if suffix == ".pt":
        assert "state['w']" in out
    else:
        assert "a_rather_long_key_name" in out and "ights " in out  # folded, not cut
    if suffix == ".npz":
        expected = np.arange(20_000, dtype=np.float32)
        expected[17] += 1.25
        assert np.load(target)["w"].tobytes() == expected.tobytes()


def test_export_json(invoke: Invoke, changed: Path, tmp_path: Path) -> None:
    target = tmp_path / "out.npz"
    result = invoke("export", "m", "-s", 1, "--to", target, "-l", changed, "--json", env=NARROW)
    assert result.exit_code == 0, result.output
    info = parse_json(result)
    assert (info["name"], info["step"], info["format"], info["path"]) == (
        "m", 1, "npz", str(target))
    assert info["size"] == target.stat().st_size
    entries = {e["key"]: e for e in info["entries"]}
    assert entries["old"] == {"path": "state['old']", "key": "old", "kind": "array",
                              "type": "ndarray", "dtype": "int16", "shape": [4], "nbytes": 8}
    assert entries["note"]["dtype"].startswith("<U") or entries["note"]["dtype"].startswith("str")
    assert info["skipped"] == []


def test_export_format_option_and_force(invoke: Invoke, changed: Path, tmp_path: Path) -> None:
    target = tmp_path / "weights.bin"
    result = invoke("export", "m", "--to", target, "--format", "npz", "-l", changed)
    assert result.exit_code == 0, result.output
    assert "w" in np.load(target)
    one_line_error(invoke("export", "m", "--to", target, "--format", "npz", "-l", changed),
                   "exists; pass --force")
    assert invoke("export", "m", "--to", target, "-f", "npz", "--force", "-l", changed).exit_code == 0


def test_export_errors_are_one_line(invoke: Invoke, changed: Path, tmp_path: Path) -> None:
    one_line_error(invoke("export", "m", "--to", tmp_path / "x.bin", "-l", changed),
                   "cannot tell the export format")
    one_line_error(invoke("export", "m", "--to", tmp_path / "x.npz", "-f", "zip", "-l", changed),
                   "unknown export format 'zip'")
    one_line_error(invoke("export", "m", "--to", tmp_path / "no" / "x.npz", "-l", changed),
                   "does not exist")
    one_line_error(invoke("export", "m", "-s", 9, "--to", tmp_path / "x.npz", "-l", changed),
                   "has no step 9")
    one_line_error(invoke("export", "nope", "--to", tmp_path / "x.npz", "-l", changed),
                   "no checkpoint named 'nope'")
    assert not list(tmp_path.glob("*x*"))


def test_export_refuses_a_leaf_in_one_line_and_can_skip_it(invoke: Invoke, tmp_path: Path) -> None:
    root = tmp_path / "s"
    Checkpointer("t", location=root).save(1, {"w": np.zeros(3), "best": None})
    target = tmp_path / "out.npz"
    one_line_error(invoke("export", "t", "--to", target, "-l", root, env=NARROW),
                   "state['best']: an .npz file", "--skip-unsupported")
    assert not target.exists()
    result = invoke("export", "t", "--to", target, "-l", root, "--skip-unsupported", env=NARROW)
    assert result.exit_code == 0, result.output
    assert fits(result.stdout)
    assert "skipped state['best']" in result.stdout
    assert list(np.load(target)) == ["w"]
    info = parse_json(invoke("export", "t", "--to", target, "-l", root, "--skip-unsupported",
                             "--force", "--json"))
    assert [s["path"] for s in info["skipped"]] == ["state['best']"]


def test_export_warns_in_one_line_when_the_newest_step_is_damaged(
        invoke: Invoke, tmp_path: Path) -> None:
    root = tmp_path / "s"
    ckpt = Checkpointer("t", location=root)
    ckpt.save(1, {"w": np.zeros(5000)})
    ckpt.save(2, {"w": np.ones(5000)})
    for data in (root / "t" / "000000000002").glob("*.bin"):
        data.write_bytes(b"\0" * data.stat().st_size)
    target = tmp_path / "out.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may escape as a Python warning
        result = invoke("export", "t", "--to", target, "-l", root, env=NARROW)
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("warning: skipping damaged checkpoint 't' step 2")
    assert result.stderr.count("\n") == 1
    assert "exported t step 1" in " ".join(result.stdout.split())
    assert np.load(target)["w"].tolist() == [0.0] * 5000


def test_help_fits_80_columns(invoke: Invoke) -> None:
    for command in ("diff", "export"):
        result = invoke(command, "--help", env=NARROW)
        assert result.exit_code == 0, result.output
        assert fits(result.stdout), result.stdout


# ====================================================================== the docs


DOC = Path(__file__).resolve().parents[2] / "docs" / "export.md"


def test_the_examples_in_docs_export_md_hold(invoke: Invoke, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("safetensors")  # the second example exports to .safetensors
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    monkeypatch.chdir(tmp_path)
    exec(blocks[0], {})  # the store of the examples, in $SAFEPOINT_DIR
    console = re.findall(r"```console\n(.*?)```", text, re.S)

    def table(text: str) -> list[str]:  # header, rule and rows, spaces at the end cut
        lines = [line.rstrip() for line in text.splitlines()]
        start = next(i for i, line in enumerate(lines) if line.startswith(("path ", "key ")))
        end = lines.index("", start)
        return lines[start:end] + [line for line in lines if " added, " in line]

    result = invoke("diff", "train", 100, 200, env=NARROW)
    assert table(result.stdout) == table(console[0])
    result = invoke("export", "train", "--to", tmp_path / "weights.safetensors", env=NARROW)
    assert table(result.stdout) == table(console[1])
    scope: dict[str, object] = {}
    exec(blocks[1].replace("d.changed[0].changes, d.changed[0].max_abs_diff",
                           "got = d.changed[0].changes, d.changed[0].max_abs_diff")
         .replace("d.changed[0].a.dtype, d.changed[0].a.shape",
                  "got_a = d.changed[0].a.dtype, d.changed[0].a.shape"), scope)
    assert scope["got"] == (("data",), 0.1250000074505806)
    assert scope["got_a"] == ("float32", (256, 128))
    assert invoke("diff", "train", 200, 200).stdout.splitlines()[-1] == \
        "no differences (6 leaves, all the same)"
