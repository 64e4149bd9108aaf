"""``python -m bench``: run every ``bench/bench_*.py`` module, print tables, write JSON.

    python -m bench                      # everything, full sizes (1 GiB states)
    python -m bench --quick              # small sizes, few repeats: a smoke run
    python -m bench --only core --only torch
    python -m bench --only growth        # cost against steps, leaves and arrays

Each ratio is printed with its spread over the rounds: the interquartile range and, in
brackets, the min–max of the per-round ratios (round i of a row against round i of its
reference).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench import RESULTS, Report, Row, Section, Skip, format_seconds

PREFIX = "bench_"


def discover() -> list[str]:
    """Short names (``core`` for ``bench_core.py``) of the benchmark modules, sorted."""
    here = [str(Path(__file__).resolve().parent)]
    return sorted(m.name[len(PREFIX):] for m in pkgutil.iter_modules(here) if m.name.startswith(PREFIX))


def select(available: Sequence[str], only: Sequence[str] | None) -> list[str]:
    """The modules to run; ``only`` entries may be ``core`` or ``bench_core``."""
    if not only:
        return list(available)
    chosen = []
    for name in only:
        short = name.removeprefix(PREFIX).removesuffix(".py")
        if short not in available:
            raise SystemExit(f"no benchmark module {name!r}; available: {', '.join(available)}")
        if short not in chosen:
            chosen.append(short)
    return chosen


def run_modules(report: Report, modules: dict[str, Callable[[], ModuleType]], console: Console) -> None:
    """Run each module's ``run(report, quick)``; record a :class:`Skip` or an error by name
    and go on with the next one."""
    for name, load in modules.items():
        console.rule(f"[bold]{name}")
        started = time.perf_counter()
        try:
            load().run(report, report.quick)
        except Skip as exc:
            report.skipped[name] = str(exc)
            console.print(f"[yellow]skipped {name}: {exc}")
        except Exception:
            report.errors[name] = traceback.format_exc()
            console.print(f"[red]{name} failed:\n{report.errors[name]}")
        else:
            console.print(f"[dim]{name} done in {time.perf_counter() - started:.1f} s")


def _ratio(section: Section, row: Row) -> str:
    ratio = section.ratio_to_reference(row)
    return "" if ratio is None else f"{ratio:.2f}×"


def _spread(section: Section, row: Row) -> str:
    spread = section.spread(row)
    return "" if spread is None else spread.text()


SPREAD_HEADER = "rounds: IQR [min–max]"


def section_table(section: Section) -> Table:
    caption = " ".join([section.description, *section.notes]).strip() or None
    table = Table(title=section.title, caption=caption, title_justify="left", caption_justify="left")
    table.add_column("method")
    table.add_column("median", justify="right")
    table.add_column("best", justify="right")
    table.add_column(f"GB/s ({section.statistic})", justify="right")
    table.add_column(f"× {section.reference or 'ref'} ({section.statistic})", justify="right")
    table.add_column(escape(SPREAD_HEADER), justify="right")
    table.add_column("note")
    for row in section.rows:
        gbps = section.gbps(row)
        table.add_row(row.method, format_seconds(row.timing.median), format_seconds(row.timing.best),
                      f"{gbps:.2f}" if gbps else "", _ratio(section, row), escape(_spread(section, row)), row.note)
    return table


def targets_table(report: Report) -> Table:
    table = Table(title="Targets", title_justify="left")
    table.add_column("target")
    table.add_column("measured", justify="right")
    table.add_column(escape(SPREAD_HEADER), justify="right")
    table.add_column("met?")
    for t in report.targets:
        table.add_row(t.name, t.measured, escape(t.spread_text),
                      {True: "[green]yes", False: "[red]no", None: "n/a"}[t.met])
    return table


def plain_lines(report: Report) -> list[str]:
    """The figures as Markdown, to paste into the README."""
    lines: list[str] = []
    for section in report.sections:
        lines += ["", f"**{section.title}**" + (f" ({section.description})" if section.description else ""), ""]
        lines += [f"| method | median | best | GB/s | × {section.reference or 'ref'} ({section.statistic}) "
                  f"| {SPREAD_HEADER} |",
                  "|---|---:|---:|---:|---:|---:|"]
        for row in section.rows:
            gbps = section.gbps(row)
            lines.append(f"| {row.method} | {format_seconds(row.timing.median)} | {format_seconds(row.timing.best)} | "
                         f"{f'{gbps:.2f}' if gbps else ''} | {_ratio(section, row)} | {_spread(section, row)} |")
    if report.targets:
        lines += ["", f"| target | measured | {SPREAD_HEADER} | met? |", "|---|---:|---:|---|"]
        lines += [f"| {t.name} | {t.measured} | {t.spread_text} | {({True: 'yes', False: 'no', None: 'n/a'})[t.met]} |"
                  for t in report.targets]
    return lines


def environment() -> dict[str, object]:
    import numpy

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "numpy": numpy.__version__,
        "page_cache": "warm: loads read files just written (dropping the cache needs root)",
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run only this module (core for bench_core.py); repeatable")
    parser.add_argument("--list", action="store_true", help="list the benchmark modules and exit")
    parser.add_argument("--max-bytes", type=int, metavar="N", help="cap every state size at N bytes")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json", help="where to write the JSON results")
    parser.add_argument("--dir", type=Path, default=RESULTS,
                        help="where scratch folders go (keep it on a real disk, not tmpfs)")
    args = parser.parse_args(argv)

    available = discover()
    if args.list:
        print("\n".join(available))
        return 0
    chosen = select(available, args.only)
    console = Console(width=max(Console().width, 120))
    report = Report(quick=args.quick, max_bytes=args.max_bytes, workdir=args.dir)
    run_modules(report, {n: lambda n=n: importlib.import_module(f"bench.{PREFIX}{n}") for n in chosen}, console)

    console.rule("[bold]results")
    for section in report.sections:
        console.print(section_table(section))
    if report.targets:
        console.print(targets_table(report))
    for name, why in report.skipped.items():
        console.print(f"[yellow]skipped {name}: {why}")
    console.print("\n".join(plain_lines(report)), markup=False, highlight=False)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": environment(), **report.to_json()}, indent=2) + "\n")
    console.print(f"\nwrote {args.out}")
    if report.errors:
        console.print(f"[red]failed: {', '.join(report.errors)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
