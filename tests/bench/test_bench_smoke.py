"""The benchmark harness works: a quick run on tiny sizes writes complete results, modules
are discovered and selected by name, and a module that skips or fails does not stop the
others. No timing assertions: speed claims live in bench/ only."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from rich.console import Console

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench_pkg(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    monkeypatch.syspath_prepend(str(ROOT))
    import bench

    return bench


def run_bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--max-bytes", str(256 * 1024),
         "--dir", str(tmp_path / "scratch"), "--out", str(tmp_path / "latest.json"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )


def test_quick_core_run_writes_every_section_and_target(tmp_path: Path) -> None:
    done = run_bench(tmp_path, "--only", "core")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "latest.json").read_text())
    assert results["quick"] is True and results["errors"] == {}
    sections = {s["title"]: s for s in results["sections"]}
    assert {"Large state: durable save", "Large state: load", "Asynchronous save: caller blocking time",
            "Small state: durable save latency"} <= set(sections)
    save = {r["method"]: r for r in sections["Large state: durable save"]["rows"]}
    assert {"raw write, 1 file", "raw write, 8 files", "safepoint", "pickle (protocol 5)", "np.savez"} <= set(save)
    assert save["raw write, 1 file"]["ratio_to_reference"] == 1.0
    for section in results["sections"]:
        for row in section["rows"]:
            assert row["median_s"] > 0 and len(row["samples_s"]) >= 1, row
    load = {r["method"] for r in sections["Large state: load"]["rows"]}
    assert {"safepoint", "safepoint, into existing arrays", "safepoint, mmap"} <= load
    first = {r["method"] for r in sections["Large state: the first load in a fresh process"]["rows"]}
    assert {"safepoint", "pickle.load", "np.load"} <= first
    assert all(t["met"] in (True, False) for t in results["targets"])
    assert any(t["name"].startswith("small durable save ≤ 1.3× raw atomic commit") for t in results["targets"])
    assert "| method | median | best | GB/s |" in done.stdout  # the Markdown lines for the README
    assert not list((tmp_path / "scratch").glob("tmp-*")), "scratch folders were left behind"


def test_quick_torch_run_compares_with_torch_save_and_dcp(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    done = run_bench(tmp_path, "--only", "bench_torch")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "latest.json").read_text())
    rows = {r["method"] for s in results["sections"] for r in s["rows"]}
    assert {"torch.save", "safepoint", "torch.load", "safepoint restore(into=model)"} <= rows
    assert any(t["name"].startswith("torch: async save") for t in results["targets"])


def test_quick_distributed_run_compares_with_dcp_on_2_and_4_ranks(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("torch.distributed.checkpoint")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no torch.distributed with gloo")
    done = run_bench(tmp_path, "--only", "distributed")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "latest.json").read_text())
    assert results["errors"] == {} and results["skipped"] == {}
    sections = {s["title"]: s for s in results["sections"]}
    expected = {
        "Distributed: sharded durable save, {} ranks": {"safepoint", "dcp.save"},
        "Distributed: asynchronous save, caller blocking time, {} ranks": {
            "safepoint save(blocking=False)", "dcp.async_save", "dcp.async_save, cached staging"},
    }
    for world in (2, 4):
        for title, methods in expected.items():
            section = sections[title.format(world)]
            rows = {r["method"]: r for r in section["rows"]}
            assert set(rows) == methods, title
            assert rows[section["reference"]]["ratio_to_reference"] == 1.0
            assert all(r["ratio_to_reference"] > 0 and len(r["samples_s"]) == 1 for r in rows.values())
    restore = sections["Distributed: resharded restore, 4 → 2 ranks (warm page cache)"]
    assert {r["method"] for r in restore["rows"]} == {
        "safepoint restore(into=Shard)", "safepoint restore(into=DTensor)", "dcp.load into DTensor"}
    assert "checked bit-exact" in restore["description"]
    targets = {t["name"]: t for t in results["targets"]}
    judged = [t for t in targets.values() if t["met"] is not None]
    assert len(judged) == 6 and all(t["met"] in (True, False) for t in judged)
    assert "distributed restore 4 → 2 ranks: faster than dcp.load (ratio < 1)" in targets
    assert not list((tmp_path / "scratch").glob("tmp-*")), "scratch folders were left behind"


def test_unknown_module_name_is_refused_with_the_list(tmp_path: Path) -> None:
    done = run_bench(tmp_path, "--only", "nosuch")
    assert done.returncode != 0
    assert "no benchmark module 'nosuch'" in done.stderr and "core" in done.stderr


def test_discovery_and_selection(bench_pkg: types.ModuleType) -> None:
    from bench.__main__ import discover, select

    names = discover()
    assert {"core", "torch"} <= set(names)
    assert select(names, ["bench_torch", "core", "torch"]) == ["torch", "core"]
    assert select(names, None) == names


def test_a_skipping_or_failing_module_does_not_stop_the_others(bench_pkg: types.ModuleType) -> None:
    from bench.__main__ import run_modules

    def module(run: object) -> types.ModuleType:
        made = types.ModuleType("fake")
        made.run = run  # type: ignore[attr-defined]
        return made

    def skips(report: object, quick: bool) -> None:
        raise bench_pkg.Skip("needs a GPU")

    def fails(report: object, quick: bool) -> None:
        raise RuntimeError("boom")

    def works(report: bench_pkg.Report, quick: bool) -> None:
        report.section("ok", reference="a").add("a", [0.5, 0.25, 1.0])

    report = bench_pkg.Report(quick=True)
    run_modules(report, {"s": lambda: module(skips), "f": lambda: module(fails), "w": lambda: module(works)},
                Console(quiet=True))
    assert report.skipped == {"s": "needs a GPU"}
    assert list(report.errors) == ["f"] and "RuntimeError: boom" in report.errors["f"]
    (section,) = report.sections
    assert section.row("a").timing.median == 0.5 and section.row("a").timing.best == 0.25


def test_compare_interleaves_rounds_and_report_sizes(bench_pkg: types.ModuleType) -> None:
    order: list[str] = []
    cases = {name: bench_pkg.Case(lambda _, name=name: order.append(name)) for name in "abc"}
    timings = bench_pkg.compare(cases, repeat=3)
    assert order == list("abcbcacab")  # each round starts one case later
    assert all(len(t.samples) == 3 for t in timings.values())
    report = bench_pkg.Report(quick=True, max_bytes=1000)
    assert report.size(full=10**9, quick=10**6) == 1000
    assert bench_pkg.Report(quick=False).size(full=7, quick=3) == 7
    target = report.target("fast enough", 1.2, at_most=1.5)
    assert target.met is True and target.measured == "1.20×"
    assert report.target("too slow", 2.0, at_most=1.5).met is False


def test_a_section_compares_by_its_statistic(bench_pkg: types.ModuleType) -> None:
    report = bench_pkg.Report()
    by_median = report.section("m", reference="ref", nbytes=10**9)
    by_best = report.section("b", reference="ref", nbytes=10**9, statistic="best")
    for section in (by_median, by_best):
        section.add("ref", [1.0, 1.0, 1.0])
        section.add("noisy", [0.5, 3.0, 4.0])  # fast once, slow mostly
    assert by_median.ratio("noisy") == 3.0 and by_best.ratio("noisy") == 0.5
    assert by_best.gbps(by_best.row("noisy")) == 2.0
    assert report.to_json()["sections"][1]["rows"][1]["ratio_to_reference"] == 0.5
    with pytest.raises(ValueError, match="statistic"):
        report.section("x", statistic="mean")


def test_quick_growth_run_reports_every_growth_with_its_spread(tmp_path: Path) -> None:
    done = run_bench(tmp_path, "--only", "growth")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "latest.json").read_text())
    assert results["errors"] == {} and results["skipped"] == {}
    sections = {s["title"]: s for s in results["sections"]}
    for what in ("latest_step()", "latest_step() on a new Checkpointer", "restore() of the newest",
                 "restore() on a new Checkpointer", "steps(), per step",
                 "durable save of one more small step", "first durable save of a new Checkpointer"):
        rows = sections[f"Steps under one name: {what}"]["rows"]
        assert [r["method"] for r in rows] == ["10 steps", "100 steps"], what
        assert rows[0]["ratio_to_reference"] == 1.0 and rows[0]["ratio_spread"] is None
        assert rows[1]["ratio_spread"]["rounds"] == 3, what
    for title, peer in (("Tree of small leaves: durable save, per leaf", "pickle.dump+fsync"),
                        ("Tree of small leaves: restore, per leaf", "pickle.load"),
                        ("Many small arrays: durable save, per array", "safetensors save_file+fsync"),
                        ("Many small arrays: restore, per array", "safetensors load_file")):
        if peer.startswith("safetensors") and importlib.util.find_spec("safetensors") is None:
            continue  # the test extra installs it; without it the section has no peer
        rows = {r["method"]: r for r in sections[title]["rows"]}
        smallest = min(rows, key=lambda m: int(m.split(", ")[1].split()[0].replace(",", "")))
        assert rows[smallest]["ratio_to_reference"] == 1.0
        ours = [r for m, r in rows.items() if m.startswith("safepoint, ")]
        assert len(ours) == 2 and all(f"× {peer}" in r["note"] for r in ours), title
        assert sum(m.startswith(f"{peer}, ") for m in rows) == 2
        for row in rows.values():  # each method is compared with itself at the smallest size
            assert row["reference"].split(", ")[0] == row["method"].split(", ")[0]
    assert {r["method"] for r in sections["Many small arrays: durable save, per array"]["rows"]} >= {
        "safepoint, 32 arrays", "safetensors save_file+fsync, 10 arrays"}  # --max-bytes caps the count
    targets = {t["name"]: t for t in results["targets"]}
    judged = [t for t in targets.values() if t["met"] is not None]
    assert len(judged) == 10 and all(t["spread"]["rounds"] >= 2 for t in targets.values())
    assert "tree save, 1,000 leaves ≤ 1.5× pickle.dump+fsync" in targets
    assert "save of one more small step: 10 → 100 steps ≤ 1.2×" in targets
    assert "rounds: IQR [min–max]" in done.stdout
    assert not list((tmp_path / "scratch").glob("tmp-*")), "scratch folders were left behind"


def test_spreads_pair_rounds_and_reach_the_targets(bench_pkg: types.ModuleType) -> None:
    report = bench_pkg.Report()
    section = report.section("s", reference="ref")
    section.add("ref", [1.0, 2.0, 4.0, 1.0, 1.0])
    section.add("paired", [2.0, 2.0, 4.0, 3.0, 1.0])  # round by round: 2, 1, 1, 3, 1
    section.add("alone", [1.0, 3.0])  # not as many rounds: against the reference's median (1.0)
    section.add("own", [4.0, 4.0, 4.0, 4.0, 4.0], reference="paired")
    spread = section.spread("paired")
    assert spread.values == (2.0, 1.0, 1.0, 3.0, 1.0)
    assert (spread.min, spread.q1, spread.median, spread.q3, spread.max) == (1.0, 1.0, 1.0, 2.0, 3.0)
    assert spread.text() == "1.00–2.00 [1.00–3.00]×" and spread.inverted().max == 1.0
    assert section.spread("alone").values == (1.0, 3.0)
    assert section.spread("ref") is None
    assert section.ratio("own") == 2.0 and section.spread("own").values == (2.0, 2.0, 1.0, 4 / 3, 4.0)
    assert section.ratio("own", to="ref") == 4.0
    rows = {r["method"]: r for r in section.to_json()["rows"]}
    assert rows["own"]["reference"] == "paired" and rows["own"]["ratio_to_reference"] == 2.0
    assert rows["paired"]["ratio_spread"]["q3"] == 2.0 and rows["ref"]["ratio_spread"] is None
    # The ratio is that of the medians (2.0 here); the spread is that of the per-round ratios.
    assert section.ratio("paired") == 2.0
    judged = report.target("paired ≤ 1.5×", section.ratio("paired"), at_most=1.5, spread=spread)
    shown = report.target("a figure, no goal", 2.0, spread=spread)
    assert judged.met is False and shown.met is None and shown.spread_text == spread.text()
    assert report.to_json()["targets"][0]["spread"]["max"] == 3.0
    from bench.__main__ import plain_lines

    lines = plain_lines(report)
    assert "| paired ≤ 1.5× | 2.00× | 1.00–2.00 [1.00–3.00]× | no |" in lines
    assert "| paired | 2.00 s | 1.00 s |  | 2.00× | 1.00–2.00 [1.00–3.00]× |" in lines


def test_quick_runs_run_compares_a_user_written_policy_with_the_builtin(tmp_path: Path) -> None:
    done = run_bench(tmp_path, "--only", "runs")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "latest.json").read_text())
    assert results["errors"] == {} and results["skipped"] == {}
    sections = {s["title"]: s for s in results["sections"]}
    stream = sections["Stream: a resumable loop against a plain one"]
    rows = {r["method"]: r for r in stream["rows"]}
    builtin = "run.lines, every(items=1000)"
    user = "run.lines, user-written Policy = every(items=1000)"
    fast = ", durable=False"
    function = "run.lines, a function of the Tick = every(items=1000)" + fast
    assert {"plain loop", "run.lines, default policy", builtin, user, builtin + fast, user + fast,
            function} <= set(rows)
    assert rows["plain loop"]["ratio_to_reference"] == 1.0
    policies = (builtin, user, builtin + fast, user + fast, function)
    commits = {m: rows[m]["note"].split(" commits")[0] for m in policies}
    assert len(set(commits.values())) == 1, commits  # all these policies commit alike
    for method, reference in ((user, builtin), (user + fast, builtin + fast), (function, builtin + fast)):
        # the ratio to the built-in policy, with its spread
        assert f"× {reference.removeprefix('run.lines, ')} (" in rows[method]["note"], method
        assert rows[method]["ratio_spread"]["rounds"] == 2
    targets = {t["name"]: t for t in results["targets"]}
    same = targets["a user-written every(items=1000) ≤ 1.05× the built-in (durable=False: the policy's own cost)"]
    assert same["met"] in (True, False) and same["spread"]["rounds"] == 2
    assert targets["run.lines, default policy: overhead ≤ 5%"]["met"] in (True, False)
    unjudged = [t for name, t in targets.items() if "no target" in name]
    assert len(unjudged) == 3 and all(t["met"] is None and t["spread"] for t in unjudged)
    assert not list((tmp_path / "scratch").glob("tmp-*")), "scratch folders were left behind"


def test_quick_tasks_run_reports_durable_substeps_beside_the_floor_and_dbos(tmp_path: Path) -> None:
    done = run_bench(tmp_path, "--only", "tasks")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "latest.json").read_text())
    assert results["errors"] == {}
    section = next(s for s in results["sections"] if s["title"] == "Durable sub-steps: per sub-step")
    rows = {r["method"]: r for r in section["rows"]}
    assert section["reference"] == "append + fdatasync" and rows["append + fdatasync"]["ratio_to_reference"] == 1.0
    assert "B to a growing file" in rows["append + fdatasync"]["note"]
    ours = ["safepoint ctx.step, 10 sub-steps", "safepoint ctx.step, 100 sub-steps"]
    for method in [*ours, "write over preallocated zeros + fdatasync"]:
        assert rows[method]["reference"] == "append + fdatasync"
        assert rows[method]["ratio_spread"]["rounds"] == 2, method
        assert all(s > 0 for s in rows[method]["samples_s"])
    last = rows["safepoint ctx.step, last 10 of 100"]
    assert last["reference"] == ours[0] and last["ratio_spread"]["rounds"] == 2
    targets = {t["name"]: t for t in results["targets"]}
    growth = targets["sub-steps: per sub-step at 100 ÷ at 10 ≤ 1.2×"]
    floor = targets["durable sub-step (100 sub-steps) ≤ 2.0× append + fdatasync"]
    assert growth["met"] in (True, False) and floor["met"] in (True, False)
    assert growth["spread"]["rounds"] == 2 and floor["spread"]["rounds"] == 2
    dbos = "durable sub-step ÷ DBOS step on SQLite, 100 steps (no target)"
    if importlib.util.find_spec("dbos") is None:
        assert "DBOS step, 100 steps" not in rows and dbos not in targets
        assert any("dbos is not installed" in note for note in section["notes"])
    else:
        assert rows["DBOS step, 100 steps"]["ratio_spread"]["rounds"] == 2
        assert "× DBOS (" in rows[ours[1]]["note"]
        assert targets[dbos]["met"] is None and targets[dbos]["spread"]["rounds"] == 2
    assert not list((tmp_path / "scratch").glob("tmp-*")), "scratch folders were left behind"


def test_substeps_without_dbos_leave_its_rows_out(bench_pkg: types.ModuleType, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import bench_tasks

    monkeypatch.setitem(sys.modules, "dbos", None)  # import dbos raises ImportError
    report = bench_pkg.Report(quick=True, workdir=tmp_path)
    bench_tasks.bench_substeps(report)
    (section,) = report.sections
    assert not any(row.method.startswith("DBOS") for row in section.rows)
    assert section.notes == ["DBOS rows left out: dbos is not installed (pip install -r bench/requirements.txt)."]
    assert [t.met is not None for t in report.targets] == [True, False, True]
    assert not list(tmp_path.glob("tmp-*"))


def test_quick_s3_run_counts_requests_per_commit(tmp_path: Path) -> None:
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    done = run_bench(tmp_path, "--only", "s3")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "latest.json").read_text())
    assert results["errors"] == {} and results["skipped"] == {}
    targets = {t["name"].split(" (")[0]: t for t in results["targets"]}
    save = targets["S3: requests per small save of a Checkpointer"]
    assert save["measured"] == "3.00 requests" and save["met"] is None  # 1 HEAD + 2 PUT
    per_commit = targets["S3: requests per small task checkpoint, 40 commits of 20 sub-steps"]
    assert per_commit["met"] is True  # counts, not times: exact
