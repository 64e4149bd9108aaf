"""``safepoint.check(location)``: one consistency check of a whole store.

It knows every kind of record a store can hold: a name's committed steps (manifests, data
files, the newest-step record), an execution's log (runs, tasks, flows: records, the
checkpoint steps they refer to, segments of older writers), lease tickets, crash leftovers
and entries safepoint did not write. It returns what it found; ``fix=True`` removes what is
safe to remove (leftovers at least ``min_age`` seconds old), never damage (that is
evidence: ``safepoint rm`` removes it) and never what safepoint did not write. ``safepoint
verify`` and ``safepoint gc`` are built on it, and the test suite ends every crash, fault and
concurrency test with it (like diskcache's ``Cache.check()``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from safepoint.checkpointer.steps import (
    collect_garbage,
    committed_steps,
    latest_problem,
    list_names,
)
from safepoint.errors import CorruptCheckpoint
from safepoint.format import VerifyReport, verify_checkpoint
from safepoint.lease import FOLDER
from safepoint.run.log import read_log, segments
from safepoint.store import Location, Store, open_store


@dataclass
class Finding:
    """One thing :func:`check` found."""

    name: str
    key: str
    what: str
    """``damage``; ``leftover`` (removable); ``kept``: a leftover not removed, and why (too
    young: a save may be in progress; its manifest is damaged: evidence); ``foreign``: not
    safepoint's, left alone."""
    detail: str
    nbytes: int = 0


@dataclass
class CheckReport:
    """What :func:`check` found, and what ``fix=True`` removed."""

    location: str
    names: dict[str, str] = field(default_factory=dict)
    """Every name found, with its kind (``checkpoint``, ``run``, ``task``, ``flow``)."""
    steps: int = 0
    """Committed checkpoint steps checked."""
    records: int = 0
    """Execution records checked."""
    checked_bytes: int = 0
    checked: list[VerifyReport] = field(default_factory=list)
    """Every step and log read, each with its own problems."""
    findings: list[Finding] = field(default_factory=list)
    removed: list[Finding] = field(default_factory=list)

    @property
    def damage(self) -> list[Finding]:
        return [f for f in self.findings if f.what == "damage"]

    @property
    def leftovers(self) -> list[Finding]:
        return [f for f in self.findings if f.what == "leftover"]

    @property
    def ok(self) -> bool:
        """No damage anywhere (leftovers of crashes are not damage)."""
        return not self.damage

    @property
    def clean(self) -> bool:
        """No damage and no leftover."""
        return self.ok and not self.leftovers

    def __str__(self) -> str:
        lines = [f"{self.location}: {len(self.names)} names, {self.steps} steps, "
                 f"{self.records} records, {len(self.damage)} damaged, "
                 f"{len(self.leftovers)} leftovers"]
        lines += [f"  {f.what}: {f.detail}" for f in self.findings]
        return "\n".join(lines)


def check(
    location: Location | Store = None,
    *,
    names: Iterable[str] | None = None,
    fix: bool = False,
    data: bool = True,
    min_age: float = 0.0,
    on_bytes: Callable[[int], None] | None = None,
) -> CheckReport:
    """Check every record in the store at ``location``; see the module's documentation.

    ``names`` limits it to those names; ``data=False`` skips reading data files
    (manifests, records and sizes are still checked); ``fix=True`` removes the leftovers
    found (those ``min_age`` seconds old); ``on_bytes`` is told of each range read.
    """
    store = location if isinstance(location, Store) else open_store(location)
    report = CheckReport(store.url)
    if not store.exists(""):
        return report
    for name in list_names(store) if names is None else names:
        try:
            _check_name(store, name, report, fix=fix, data=data, min_age=min_age, on_bytes=on_bytes)
        except CorruptCheckpoint as exc:  # a name that is a link, say: one bad name
            report.names.setdefault(name, "?")
            report.findings.append(Finding(name, name, "damage", str(exc)))
            report.checked.append(VerifyReport(name, None, 0, [str(exc)]))
    return report


def _check_name(store: Store, name: str, report: CheckReport, *, fix: bool, data: bool,
                min_age: float, on_bytes: Callable[[int], None] | None) -> None:
    found = segments(store, name)
    referenced: set[int] | None = None
    log: VerifyReport | None = None
    kind = "checkpoint"
    if found:
        newest = f"{name}/{found[-1][1]}"
        info = store.stat(newest)
        size = info.size if info.kind == "file" else 0
        try:
            replay = read_log(store, name)
        except CorruptCheckpoint as exc:  # no intact record: its steps are still checked
            report.names[name] = "run"
            report.findings.append(Finding(name, newest, "damage", str(exc)))
            report.checked.append(VerifyReport(name, None, size, [str(exc)]))
            found = []
    if found:
        report.records += len(replay.records)
        state = replay.state
        kind = str((state.extra if state is not None else (replay.records[-1].extra if replay.records else {}))
                   .get("kind", "run"))
        log = VerifyReport(name, None, size, list(replay.damage))
        report.checked.append(log)
        for problem in replay.damage:
            report.findings.append(Finding(name, newest, "damage", problem))
        referenced = {ref for r in replay.live() for ref in r.refs()}
        superseded = found[:-1] if replay.records and not replay.damage else []  # else evidence
        for generation, entry in superseded:  # older writers' segments
            _leftover(store, report, Finding(name, f"{name}/{entry}", "leftover",
                                             f"{store.url}/{name}/{entry}: the log of writer "
                                             f"{generation}, superseded by a newer one"), fix)
    report.names.setdefault(name, kind)
    steps = committed_steps(store, name)
    for ref in sorted((referenced or set()) - set(steps)):
        problem = f"{store.url}/{name}: a record refers to checkpoint step {ref}, which is missing"
        report.findings.append(Finding(name, f"{name}/{ref:012d}.json", "damage", problem))
        if log is not None:
            log.problems.append(problem)
    checked: list[VerifyReport] = []
    verified: set[tuple[str, int, int, str]] = set()  # intact ranges of shared chunk files
    for step in steps:
        if referenced is not None and step not in referenced:
            continue  # an orphan: a leftover, found below
        report.steps += 1
        if data:
            result = verify_checkpoint(store, name, step, on_bytes=on_bytes, verified=verified)
            report.checked_bytes += result.checked_bytes
            checked.append(result)
            for problem in result.problems:
                report.findings.append(Finding(name, f"{name}/{step:012d}.json", "damage", problem))
    if steps:
        wrong = latest_problem(store, name)
        if wrong:
            report.findings.append(Finding(name, f"{name}/latest.json", "damage", wrong))
            if checked and checked[-1].step == steps[-1]:
                checked[-1].problems.append(wrong)
    report.checked += checked
    cleanup = collect_garbage(store, name, min_age=min_age, dry_run=not fix, referenced=referenced)
    for key, nbytes in cleanup.removed:
        why = ("the lease of a writer a newer one took over" if f"/{FOLDER}/" in key else
               "left by a save that did not finish (or no longer referred to)")
        finding = Finding(name, key, "leftover", f"{store.url}/{key}: {why}", nbytes)
        (report.removed if fix else report.findings).append(finding)
    for key, why in cleanup.kept:
        what = "foreign" if "not written by safepoint" in why or "link" in why else "kept"
        report.findings.append(Finding(name, key, what, f"{store.url}/{key}: {why}"))


def _leftover(store: Store, report: CheckReport, finding: Finding, fix: bool) -> None:
    if not fix:
        report.findings.append(finding)
        return
    with contextlib.suppress(OSError):
        store.delete(finding.key)
    report.removed.append(finding)


__all__ = ["CheckReport", "Finding", "check"]
