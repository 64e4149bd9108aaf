"""safepoint's benchmark harness: side-by-side timings in one run, reported as ratios.

This machine is shared and noisy, so absolute figures wander from run to run; ratios taken
in the same run, with the cases interleaved round by round, are what we compare.

The convention for benchmark modules: every ``bench/bench_<name>.py`` defines::

    def run(report: Report, quick: bool) -> None:
        section = report.section("Small save", reference="raw commit", nbytes=200)
        timings = compare({"raw commit": Case(raw), "safepoint": Case(save)},
                          repeat=report.pick(full=50, quick=10))
        section.add_all(timings)
        report.target("small save ≤ 2× raw commit", section.ratio("safepoint"), at_most=2.0)

``python -m bench`` runs every such module (``--only NAME`` picks some, ``--quick`` makes a
fast smoke run), prints a table per section and a targets table, and writes
``bench/results/latest.json``. Every ratio comes with its spread over the rounds
(:class:`Spread`: the interquartile range and the min–max of the per-round ratios, a row's
round *i* against its reference's round *i*), so one lucky or unlucky round is visible as
such; pass ``spread=section.spread(...)`` to :meth:`Report.target` to show it there too. A module raises :class:`Skip` when something it needs is
missing (torch, say); an error in one module is reported and the others still run.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
RESULTS = Path(__file__).resolve().parent / "results"
"""Where results and scratch folders go: ignored by git, on the same disk as the repo."""


class Skip(Exception):
    """Raised by a benchmark module (or case) that cannot run here; the message says why."""


@dataclass(frozen=True)
class Timing:
    """Repeated measurements of one case, in seconds."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        return min(self.samples)


def _quantile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile of sorted values, interpolated linearly (numpy's default)."""
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Spread:
    """How a figure varies over the rounds: quantiles of its per-round values (usually
    ratios, one per round)."""

    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("a spread needs at least one value")

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(tuple(float(v) for v in values))

    @property
    def rounds(self) -> int:
        return len(self.values)

    def quantile(self, q: float) -> float:
        return _quantile(sorted(self.values), q)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    @property
    def q1(self) -> float:
        return self.quantile(0.25)

    @property
    def median(self) -> float:
        return self.quantile(0.5)

    @property
    def q3(self) -> float:
        return self.quantile(0.75)

    def inverted(self) -> Spread:
        """The spread of 1/value (a time ratio read as a speed-up, say)."""
        return Spread(tuple(1 / v if v else float("inf") for v in self.values))

    def scaled(self, factor: float) -> Spread:
        return Spread(tuple(v * factor for v in self.values))

    def text(self, unit: str = "×", digits: int = 2) -> str:
        """``q1–q3 [min–max]``, e.g. ``1.02–1.10 [0.95–1.31]×``; one round: just the value."""
        if self.rounds == 1:
            return f"{self.values[0]:.{digits}f}{unit} (1 round)"
        return (f"{self.q1:.{digits}f}–{self.q3:.{digits}f} "
                f"[{self.min:.{digits}f}–{self.max:.{digits}f}]{unit}")

    def to_json(self) -> dict[str, float | int]:
        return {"rounds": self.rounds, "min": self.min, "q1": self.q1, "median": self.median,
                "q3": self.q3, "max": self.max}


@dataclass
class Case:
    """One thing to time. ``before()`` (untimed) prepares the input of ``run`` (timed; it
    receives what ``before`` returned, or None); ``after(output)`` (untimed) checks or frees
    what ``run`` returned and removes files it wrote."""

    run: Callable[[Any], Any]
    before: Callable[[], Any] | None = None
    after: Callable[[Any], None] | None = None
    timed_by_run: bool = False
    """``run`` returns the seconds to record (it times itself, e.g. in a child process)."""

    def sample(self) -> float:
        """One timed call of ``run``, with the cyclic garbage collector paused meanwhile (a
        full collection costs ~0.2 s once torch and jax are imported)."""
        given = self.before() if self.before is not None else None
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            start = time.perf_counter()
            output = self.run(given)
            elapsed = time.perf_counter() - start
        finally:
            if was_enabled:
                gc.enable()
        if self.after is not None:
            self.after(output)
        return float(output) if self.timed_by_run else elapsed


def compare(cases: Mapping[str, Case], *, repeat: int) -> dict[str, Timing]:
    """Time every case ``repeat`` times, interleaved round by round (each round starts one
    case later), so that all cases see the same noise instead of one case getting a quiet
    minute and another a busy one."""
    names = list(cases)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeat):
        shift = round_ % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            samples[name].append(cases[name].sample())
    return {name: Timing(tuple(s)) for name, s in samples.items()}


def measure(fn: Callable[[], Any], *, repeat: int) -> Timing:
    """Time ``fn()`` alone ``repeat`` times."""
    return compare({"fn": Case(lambda _: fn())}, repeat=repeat)["fn"]


@dataclass
class Row:
    method: str
    timing: Timing
    nbytes: int | None = None
    note: str = ""
    reference: str | None = None  # the row this one is compared with; None: the section's


@dataclass
class Section:
    """One table: rows timed side by side, each compared with the ``reference`` row."""

    title: str
    reference: str | None = None
    nbytes: int | None = None  # bytes each row moves, for GB/s (a row may override it)
    description: str = ""
    statistic: str = "median"  # what ratios and GB/s use: "median" or "best" (of the samples)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, method: str, timing: Timing | float | Sequence[float], *,
            nbytes: int | None = None, note: str = "", reference: str | None = None) -> Row:
        """Add a row; ``timing`` may be a :class:`Timing`, one duration, or samples.
        ``reference``: the row this one's ratio is taken against (default: the section's)."""
        if isinstance(timing, (int, float)):
            timing = Timing((float(timing),))
        elif not isinstance(timing, Timing):
            timing = Timing(tuple(float(t) for t in timing))
        row = Row(method, timing, self.nbytes if nbytes is None else nbytes, note, reference)
        self.rows.append(row)
        return row

    def add_all(self, timings: Mapping[str, Timing], notes: Mapping[str, str] | None = None) -> None:
        for method, timing in timings.items():
            self.add(method, timing, note=(notes or {}).get(method, ""))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def row(self, method: str) -> Row:
        for row in self.rows:
            if row.method == method:
                return row
        raise KeyError(f"section {self.title!r} has no row {method!r} (rows: {[r.method for r in self.rows]})")

    def has(self, method: str) -> bool:
        return any(row.method == method for row in self.rows)

    def value(self, row: Row | str) -> float:
        """The time this section compares by: the median or the best of a row's samples."""
        timing = (self.row(row) if isinstance(row, str) else row).timing
        return timing.best if self.statistic == "best" else timing.median

    def reference_of(self, row: Row) -> str | None:
        """The row ``row`` is compared with: its own reference, else the section's."""
        return row.reference or self.reference

    def ratio(self, method: str, to: str | None = None) -> float:
        """Time of ``method`` divided by that of ``to`` (default: the row's reference)."""
        other = to or self.reference_of(self.row(method))
        if other is None:
            raise KeyError(f"section {self.title!r} has no reference row")
        return self.value(method) / self.value(other)

    def ratio_to_reference(self, row: Row) -> float | None:
        other = self.reference_of(row)
        if not other or not self.has(other):
            return None
        return self.value(row) / self.value(other)

    def spread(self, method: Row | str, to: str | None = None) -> Spread | None:
        """The per-round ratios of ``method`` to ``to`` (default: its reference). Rows with as
        many samples as the reference are paired round by round (rows timed by one
        :func:`compare`); otherwise each sample is divided by the reference's statistic.
        None without a reference, for the reference itself, or with a single sample."""
        row = self.row(method) if isinstance(method, str) else method
        other = to or self.reference_of(row)
        if not other or not self.has(other) or other == row.method or len(row.timing.samples) < 2:
            return None
        theirs = self.row(other).timing.samples
        if len(theirs) == len(row.timing.samples):
            return Spread(tuple(a / b for a, b in zip(row.timing.samples, theirs, strict=True)))
        return Spread(tuple(a / self.value(other) for a in row.timing.samples))

    def gbps(self, row: Row) -> float | None:
        if not row.nbytes:
            return None
        return row.nbytes / self.value(row) / 1e9

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "description": self.description,
            "reference": self.reference,
            "statistic": self.statistic,
            "notes": self.notes,
            "rows": [
                {
                    "method": r.method,
                    "median_s": r.timing.median,
                    "best_s": r.timing.best,
                    "samples_s": list(r.timing.samples),
                    "nbytes": r.nbytes,
                    "gb_per_s": self.gbps(r),
                    "reference": self.reference_of(r),
                    "ratio_to_reference": self.ratio_to_reference(r),
                    "ratio_spread": (lambda sp: sp.to_json() if sp else None)(self.spread(r)),
                    "note": r.note,
                }
                for r in self.rows
            ],
        }


@dataclass
class Target:
    """A performance goal: what was measured, and whether the goal is met."""

    name: str
    measured: str
    met: bool | None  # None: not judged (no goal given, or it could not be measured here)
    spread: Spread | None = None  # how the measured figure varied over the rounds
    unit: str = "×"

    @property
    def spread_text(self) -> str:
        return self.spread.text(self.unit) if self.spread is not None else ""


@dataclass
class Report:
    """Everything one ``python -m bench`` run measured.

    ``quick`` picks small sizes and few repeats; ``max_bytes`` caps every size handed out
    by :meth:`size` (tests use it for tiny runs); ``workdir`` holds scratch folders.
    """

    quick: bool = False
    max_bytes: int | None = None
    workdir: Path = RESULTS
    sections: list[Section] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def pick(self, *, full: Any, quick: Any) -> Any:
        """``quick`` in a quick run, else ``full`` (repeat counts, item counts)."""
        return quick if self.quick else full

    def size(self, *, full: int, quick: int) -> int:
        """A byte size for this run: :meth:`pick`, capped by ``max_bytes``."""
        chosen = self.pick(full=full, quick=quick)
        return chosen if self.max_bytes is None else min(chosen, self.max_bytes)

    def section(self, title: str, *, reference: str | None = None, nbytes: int | None = None,
                description: str = "", statistic: str = "median") -> Section:
        """A new table; ``statistic`` ("median" or "best") is what its ratios compare."""
        if statistic not in ("median", "best"):
            raise ValueError(f"statistic must be 'median' or 'best', not {statistic!r}")
        section = Section(title, reference=reference, nbytes=nbytes, description=description,
                          statistic=statistic)
        self.sections.append(section)
        return section

    def target(self, name: str, measured: float | str, *, at_most: float | None = None,
               at_least: float | None = None, unit: str = "×", spread: Spread | None = None) -> Target:
        """Record a goal. With ``at_most``/``at_least`` the number ``measured`` is checked;
        with neither (or a string) the figure is reported, not judged. ``spread``: how the
        figure varied over the rounds (e.g. ``section.spread(method)``), in ``unit``."""
        if isinstance(measured, str):
            target = Target(name, measured, None, spread, unit)
        else:
            judged = at_most is not None or at_least is not None
            met = ((at_most is None or measured <= at_most) and (at_least is None or measured >= at_least)
                   if judged else None)
            target = Target(name, f"{measured:.2f}{unit}", met, spread, unit)
        self.targets.append(target)
        return target

    def verdict(self, name: str, measured: str, met: bool | None, *, spread: Spread | None = None,
                unit: str = "×") -> Target:
        """Record a goal judged by the caller (e.g. 'faster than every peer')."""
        target = Target(name, measured, met, spread, unit)
        self.targets.append(target)
        return target

    @contextlib.contextmanager
    def scratch(self, label: str) -> Iterator[Path]:
        """A fresh folder on the repo's disk (not tmpfs), removed afterwards."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f"tmp-{label}-", dir=self.workdir))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
            settle()

    def to_json(self) -> dict[str, Any]:
        return {
            "quick": self.quick,
            "max_bytes": self.max_bytes,
            "sections": [s.to_json() for s in self.sections],
            "targets": [{"name": t.name, "measured": t.measured, "met": t.met,
                         "spread": t.spread.to_json() if t.spread else None, "unit": t.unit}
                        for t in self.targets],
            "skipped": self.skipped,
            "errors": self.errors,
        }


def settle() -> None:
    """Flush the page cache's dirty pages (and a removal's discards) to the disk now, so
    that their writeback does not fall into the next measurement: after a module has
    written gigabytes, the first few fsyncs of the next one waited on it."""
    os.sync()


def format_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    if seconds >= 1e-4:
        return f"{seconds * 1e6:.0f} µs"
    if seconds >= 1e-5:
        return f"{seconds * 1e6:.1f} µs"
    if seconds >= 1e-6:
        return f"{seconds * 1e6:.2f} µs"
    return f"{seconds * 1e9:.0f} ns"


def format_bytes(nbytes: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{nbytes} B"
