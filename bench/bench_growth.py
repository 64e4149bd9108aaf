"""Cost growth: how what safepoint does costs as a name's history, a tree or a state grows.

Each figure is the cost per unit of work (per call, per leaf, per array) at the largest size
divided by that at the smallest, measured side by side: every size of one operation is timed
in the same rounds (interleaved, :func:`bench.compare`), and the spread printed with it is
that of the per-round ratios (round i of the largest size against round i of the smallest).

1. **Steps under one name** (10 → 10,000 committed steps, no retention): ``latest_step()``,
   ``restore()`` of the newest, a durable ``save`` of one more small step, each on the
   ``Checkpointer`` that has been used all along and on a new one (what a resumed process
   does first), and ``steps()`` per step (linear by nature). The history is built with
   ``durable=False`` saves (then ``os.sync()``); the timed saves are durable, each after an
   untimed ``os.sync()``. A small history that the timed saves have grown by more than 10%
   is rebuilt between rounds (untimed), so that "10 steps" stays about 10.
2. **A tree of small leaves** (100 → 100,000 ints, floats and short strings in nested dicts
   and lists): durable save and restore per leaf, side by side with ``pickle.dump`` + fsync
   and ``pickle.load`` of the same tree.
3. **Many small arrays** (100 → 10,000 float32 arrays of 8 KiB): durable save and restore
   per array, side by side with safetensors (``save_file`` + fsync of the file, and
   ``load_file``) of the same arrays.

Every save is durable (fsync'd) unless said otherwise; loads read files just written (a warm
page cache). Each save of a tree or of arrays goes to a new name (pickle and safetensors: a
new file), removed after its round, untimed.

    python -m bench --only growth
"""

from __future__ import annotations

import itertools
import os
import pickle
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import Case, KiB, Report, Section, Timing, compare
from bench.bench_core import SMALL_STATE, fsync_path, optional, remove, same
from safepoint import Checkpointer

GROWTH_TARGET = 1.2  # largest ÷ smallest, per call, for the O(1) operations
ARRAY_BYTES = 8 * KiB


def per_unit(timing: Timing, units: float) -> tuple[float, ...]:
    """A timing's samples divided by the units of work each sample did."""
    return tuple(s / units for s in timing.samples)


def sizes_text(sizes: Sequence[int]) -> str:
    return f"{sizes[0]:,} → {sizes[-1]:,}"


def calls(count: int) -> str:
    return f"{count} call" if count == 1 else f"{count} calls"


def growth_target(report: Report, name: str, section: Section, largest: str, *,
                  at_most: float | None = None) -> None:
    """Record ``largest``'s ratio to its reference row (the smallest size), with its spread;
    judged against ``at_most`` when given, else reported only."""
    report.target(name, section.ratio(largest), at_most=at_most, spread=section.spread(largest))


# ------------------------------------------------------------ steps under one name

class History:
    """One name with ``size`` committed small steps, and the durable Checkpointer that has
    been used on it all along (its first save, with its one-off clean-up, is done)."""

    def __init__(self, location: Path, size: int) -> None:
        self.location, self.size = location, size
        self.name = f"steps{size}"
        self.ckpt = Checkpointer(self.name, location=location)
        self.opened: list[Checkpointer] = []  # new Checkpointers made for a measurement
        self.rebuild()

    def one_writer(self) -> None:
        """Close the Checkpointers of earlier measurements: one writer per name (a closed
        Checkpointer takes the name's lease again at its next save)."""
        for ckpt in self.opened:
            ckpt.close()
        self.opened.clear()
        self.ckpt.close()

    def rebuild(self) -> None:
        """Exactly ``size`` steps again: filler saves without fsync, the newest durable by
        the long-lived Checkpointer; then everything is flushed, so that no timed fsync
        pays for the filler's metadata."""
        self.one_writer()
        self.ckpt.delete_all()
        filler = Checkpointer(self.name, location=self.location, durable=False)
        for step in range(self.size - 1):
            filler.save(step, SMALL_STATE)
        filler.close()
        self.ckpt.save(self.size - 1, SMALL_STATE)
        self.newest = self.size - 1
        os.sync()
        self.ckpt.latest_step()

    def before_save(self) -> None:
        """Before a timed save: rebuild when saves have grown the history by over 10%, and
        flush the disk, so that every size's save starts from the same clean journal (not
        only the sizes that were just rebuilt)."""
        if self.newest + 1 > self.size * 1.1:
            self.rebuild()
        self.one_writer()
        os.sync()

    def fresh(self) -> Checkpointer:
        ckpt = Checkpointer(self.name, location=self.location)
        self.opened.append(ckpt)
        return ckpt

    def save_next(self, ckpt: Checkpointer) -> None:
        self.newest += 1
        ckpt.save(self.newest, SMALL_STATE)

    def check_newest(self, step: Any) -> None:
        if step != self.newest:
            raise AssertionError(f"{self.name}: latest step {step}, expected {self.newest}")

    def check_restored(self, restored: Any) -> None:
        self.check_newest(restored.step)
        if restored.state != SMALL_STATE:
            raise AssertionError(f"{self.name}: restored state differs from what was saved")


def steps_section(report: Report, histories: Sequence[History], title: str, description: str,
                  make: Callable[[History], Case], batch: int, repeat: int,
                  units: Callable[[History], float] = lambda h: 1.0) -> Section:
    """Time ``make(history)`` for every history in the same rounds; one row per size, per
    unit of work (a sample does ``batch`` calls, each of ``units(history)`` units)."""
    rows = {f"{h.size:,} steps": h for h in histories}
    timings = compare({label: make(h) for label, h in rows.items()}, repeat=repeat)
    section = report.section(title, reference=next(iter(rows)), description=description)
    for label, history in rows.items():
        section.add(label, per_unit(timings[label], batch * units(history)))
    return section


def steps_growth(report: Report, root: Path, sizes: Sequence[int], repeat: int, batch: int) -> None:
    location = root / "steps"
    histories = [History(location, n) for n in sizes]
    largest = f"{sizes[-1]:,} steps"
    span = f"{sizes_text(sizes)} steps"
    per_call = f"per call; a sample is {calls(batch)}; × ref: against {sizes[0]:,} steps."

    def checking_all(check: Callable[[Any], None]) -> Callable[[list[Any]], None]:
        def after(outputs: list[Any]) -> None:
            for output in outputs:
                check(output)
        return after

    def on_each(method: Callable[[Checkpointer], Any], check: Callable[[History], Callable[[Any], None]]
                ) -> Callable[[History], Case]:
        """``batch`` calls on the long-lived Checkpointer."""
        def make(h: History) -> Case:
            return Case(lambda _: [method(h.ckpt) for _ in range(batch)], after=checking_all(check(h)))
        return make

    def on_new(method: Callable[[Checkpointer], Any], check: Callable[[History], Callable[[Any], None]]
               ) -> Callable[[History], Case]:
        """One call on each of ``batch`` new Checkpointers (made untimed)."""
        def make(h: History) -> Case:
            return Case(lambda ckpts: [method(c) for c in ckpts],
                        before=lambda: [h.fresh() for _ in range(batch)], after=checking_all(check(h)))
        return make

    figures = [
        ("latest_step()", "the long-lived Checkpointer (one stat when nothing changed)",
         on_each(Checkpointer.latest_step, lambda h: h.check_newest)),
        ("latest_step() on a new Checkpointer", "what a resumed process does first",
         on_new(Checkpointer.latest_step, lambda h: h.check_newest)),
        ("restore() of the newest", "the long-lived Checkpointer",
         on_each(lambda c: c.restore(), lambda h: h.check_restored)),
        ("restore() on a new Checkpointer", "what a resumed process does first",
         on_new(lambda c: c.restore(), lambda h: h.check_restored)),
    ]
    for what, how, make in figures:
        section = steps_section(report, histories, f"Steps under one name: {what}",
                                f"{how}; {per_call}", make, batch, repeat)
        growth_target(report, f"{what}: {span} ≤ {GROWTH_TARGET}×", section, largest,
                      at_most=GROWTH_TARGET)

    listing_batch = max(1, batch // 10)

    def listing(h: History) -> Case:
        def after(out: list[list[int]]) -> None:
            for steps in out:
                if len(steps) != h.newest + 1 or steps[-1] != h.newest:
                    raise AssertionError(f"{h.name}: steps() gave {len(steps)} steps, expected {h.newest + 1}")
        return Case(lambda _: [h.ckpt.steps() for _ in range(listing_batch)], after=after)

    section = steps_section(
        report, histories, "Steps under one name: steps(), per step",
        f"one listing of the name's folder: linear by nature, so per step; a sample is "
        f"{calls(listing_batch)}; × ref: per step against {sizes[0]:,} steps.",
        listing, listing_batch, repeat, units=lambda h: h.newest + 1)
    growth_target(report, f"steps(), per step: {span} (linear by nature; no target)", section, largest)

    # Saves last: they add steps (a small history is rebuilt between rounds, untimed).
    def steady(h: History) -> Case:
        return Case(lambda _: h.save_next(h.ckpt), before=h.before_save)

    section = steps_section(
        report, histories, "Steps under one name: durable save of one more small step",
        f"the long-lived Checkpointer (its first save done), keep=None, a dict of 10 fields; one "
        f"save per sample, after an untimed os.sync(); × ref: against {sizes[0]:,} steps.", steady, 1, repeat)
    growth_target(report, f"save of one more small step: {span} ≤ {GROWTH_TARGET}×", section, largest,
                  at_most=GROWTH_TARGET)

    def first(h: History) -> Case:
        def before() -> Checkpointer:
            h.before_save()
            return h.fresh()
        return Case(lambda ckpt: h.save_next(ckpt), before=before)

    first_repeat = max(3, repeat // 2)
    section = steps_section(
        report, histories, "Steps under one name: first durable save of a new Checkpointer",
        "a resumed process's first save, which also looks for old leftovers of crashed saves; "
        f"one save per sample, after an untimed os.sync(); × ref: against {sizes[0]:,} steps.", first, 1,
        first_repeat)
    growth_target(report, f"first save after opening (a resumed run): {span} ≤ {GROWTH_TARGET}×", section,
                  largest, at_most=GROWTH_TARGET)
    for history in histories:
        history.one_writer()
        history.ckpt.delete_all()


# ---------------------------------------------------------- side by side with a peer

def side_by_side(report: Report, title: str, description: str, unit: str, sizes: Sequence[int],
                 cases: Mapping[str, Callable[[int], Case]], repeat: int, nbytes: int | None = None
                 ) -> tuple[Section, Callable[[str, int], str]]:
    """Every method at every size in the same rounds; rows per unit of work, each compared
    with the same method at the smallest size. The first method is ours, the second the
    peer: our rows' notes give the ratio to the peer at the same size, with its spread."""
    def label(method: str, n: int) -> str:
        return f"{method}, {n:,} {unit}"

    timings = compare({label(m, n): make(n) for n in sizes for m, make in cases.items()}, repeat=repeat)
    section = report.section(title, description=description, nbytes=nbytes)
    ours, peer = list(cases)[:2]
    for n in sizes:
        for method in cases:
            section.add(label(method, n), per_unit(timings[label(method, n)], n),
                        reference=label(method, sizes[0]))
        mine, theirs = label(ours, n), label(peer, n)
        spread = section.spread(mine, to=theirs)
        section.row(mine).note = (f"{section.ratio(mine, to=theirs):.2f}× {peer}"
                                  + (f" ({spread.text()})" if spread else ""))
    return section, label


def peer_target(report: Report, section: Section, name: str, ours: str, theirs: str, at_most: float) -> None:
    report.target(name, section.ratio(ours, to=theirs), at_most=at_most, spread=section.spread(ours, to=theirs))


# ------------------------------------------------------------ a tree of small leaves

def make_tree(leaves: int) -> dict[str, Any]:
    """``leaves`` small leaves (ints, floats, short strings) in nested dicts and lists: groups
    of 10 leaves, 100 groups to a block."""
    if leaves % 10:
        raise ValueError("leaves must be a multiple of 10")
    groups = leaves // 10

    def group(i: int) -> dict[str, Any]:
        return {"id": i, "loss": i * 0.5 + 0.25, "tag": f"t{i % 97}",
                "hist": [i, i / 3, f"h{i}", -i, 1e-3 * i, "x"], "cfg": {"lr": i * 7}}

    return {f"block{b}": {f"item{j}": group(b * 100 + j) for j in range(min(100, groups - b * 100))}
            for b in range((groups + 99) // 100)}


def count_leaves(tree: Any) -> int:
    if isinstance(tree, dict):
        return sum(count_leaves(v) for v in tree.values())
    if isinstance(tree, list):
        return sum(count_leaves(v) for v in tree)
    return 1


def pickle_save(path: Path, state: Any) -> Path:
    with open(path, "wb") as f:
        pickle.dump(state, f, protocol=5)
        f.flush()
        os.fsync(f.fileno())
    return path


def pickle_load(path: Path) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)


def tree_growth(report: Report, root: Path, sizes: Sequence[int], repeat: int) -> None:
    trees = {n: make_tree(n) for n in sizes}
    for n, tree in trees.items():
        assert count_leaves(tree) == n, (n, count_leaves(tree))
    location, files = root / "trees", root / "tree-files"
    files.mkdir()
    counter = itertools.count()
    Checkpointer("warmup", location=location).save(0, trees[sizes[0]])  # the store marker, imports
    pickle_save(files / "warmup", trees[sizes[0]])

    def sp_save(n: int) -> Case:
        def run(ckpt: Checkpointer) -> Checkpointer:
            ckpt.save(0, trees[n])
            return ckpt
        return Case(run, lambda: Checkpointer(f"tree{n}-{next(counter)}", location=location),
                    Checkpointer.delete_all)

    def pk_save(n: int) -> Case:
        return Case(lambda path: pickle_save(path, trees[n]), lambda: files / f"tree{n}-{next(counter)}", remove)

    largest, span = sizes[-1], sizes_text(sizes)
    per_leaf = (f"ints, floats and short strings in nested dicts and lists, {span} leaves; per leaf; "
                "× ref: per leaf against the same method at the smallest tree")
    save, label = side_by_side(
        report, "Tree of small leaves: durable save, per leaf",
        f"{per_leaf}; every save fsyncs (pickle: the file; safepoint: its commit).", "leaves", sizes,
        {"safepoint": sp_save, "pickle.dump+fsync": pk_save}, repeat)

    readers = {n: Checkpointer(f"tree{n}", location=location) for n in sizes}
    for n, ckpt in readers.items():
        ckpt.save(0, trees[n])
        pickle_save(files / f"tree{n}", trees[n])
    checked: set[str] = set()

    def checking(key: str, n: int) -> Callable[[Any], None]:
        def after(loaded: Any) -> None:
            if key not in checked:
                if loaded != trees[n]:
                    raise AssertionError(f"{key}: the loaded tree differs from the saved one")
                checked.add(key)
        return after

    load, _ = side_by_side(
        report, "Tree of small leaves: restore, per leaf", f"{per_leaf}; from a warm page cache.", "leaves",
        sizes, {"safepoint": lambda n: Case(lambda _: readers[n].restore().state, after=checking(f"sp{n}", n)),
                "pickle.load": lambda n: Case(lambda _: pickle_load(files / f"tree{n}"),
                                              after=checking(f"pk{n}", n))}, repeat)

    peer_target(report, save, f"tree save, {largest:,} leaves ≤ 1.5× pickle.dump+fsync",
                label("safepoint", largest), label("pickle.dump+fsync", largest), 1.5)
    peer_target(report, load, f"tree restore, {largest:,} leaves ≤ 2× pickle.load",
                label("safepoint", largest), label("pickle.load", largest), 2.0)
    linear = "linearity; no target"
    for section, op, methods in ((save, "save", ("safepoint", "pickle.dump+fsync")),
                                 (load, "restore", ("safepoint", "pickle.load"))):
        for method in methods:
            growth_target(report, f"tree {op} per leaf, {method}: {span} leaves ({linear})", section,
                          label(method, largest))
        if len(sizes) > 2:  # the top decade, where fixed costs no longer hide a growth
            ours = label(methods[0], largest)
            below = label(methods[0], sizes[-2])
            report.target(f"tree {op} per leaf, {methods[0]}: {sizes[-2]:,} → {largest:,} leaves ({linear})",
                          section.ratio(ours, to=below), spread=section.spread(ours, to=below))
    for ckpt in readers.values():
        ckpt.delete_all()


# -------------------------------------------------------------------- many small arrays

def make_arrays(count: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(count)
    return {f"a{i:05d}": rng.random(ARRAY_BYTES // 4, dtype=np.float32) for i in range(count)}


def array_growth(report: Report, root: Path, sizes: Sequence[int], repeat: int) -> None:
    st = optional("safetensors.numpy")
    largest, span = sizes[-1], sizes_text(sizes)
    if st is None:
        for op in ("save", "load"):
            report.target(f"arrays {op}, {largest:,} × 8 KiB ≤ 1.0× safetensors", "safetensors not installed")
        return
    states = {n: make_arrays(n) for n in sizes}
    location, files = root / "arrays", root / "array-files"
    files.mkdir()
    counter = itertools.count()

    def st_save(path: Path, state: dict[str, np.ndarray]) -> Path:
        st.save_file(state, str(path))
        fsync_path(path)
        return path

    Checkpointer("warmup", location=location).save(0, states[sizes[0]])
    st_save(files / "warmup", states[sizes[0]])

    def sp_save(n: int) -> Case:
        def run(ckpt: Checkpointer) -> Checkpointer:
            ckpt.save(0, states[n])
            return ckpt
        return Case(run, lambda: Checkpointer(f"arrays{n}-{next(counter)}", location=location),
                    Checkpointer.delete_all)

    def peer_save(n: int) -> Case:
        return Case(lambda path: st_save(path, states[n]), lambda: files / f"arrays{n}-{next(counter)}", remove)

    per_array = (f"{span} float32 arrays of 8 KiB in a flat dict; per array (GB/s: of the "
                 "array bytes); × ref: per array against the same method at the smallest count")
    save, label = side_by_side(
        report, "Many small arrays: durable save, per array",
        f"{per_array}; every save fsyncs (safetensors: save_file, then fsync of the file).", "arrays", sizes,
        {"safepoint": sp_save, "safetensors save_file+fsync": peer_save}, repeat, nbytes=ARRAY_BYTES)

    readers = {n: Checkpointer(f"arrays{n}", location=location) for n in sizes}
    for n, ckpt in readers.items():
        ckpt.save(0, states[n])
        st_save(files / f"arrays{n}", states[n])
    checked: set[str] = set()

    def checking(key: str, n: int) -> Callable[[Any], None]:
        def after(loaded: Any) -> None:
            if key not in checked:
                same(states[n], loaded)
                checked.add(key)
        return after

    load, _ = side_by_side(
        report, "Many small arrays: restore, per array", f"{per_array}; from a warm page cache.", "arrays",
        sizes, {"safepoint": lambda n: Case(lambda _: readers[n].restore().state, after=checking(f"sp{n}", n)),
                "safetensors load_file": lambda n: Case(lambda _: st.load_file(str(files / f"arrays{n}")),
                                                        after=checking(f"st{n}", n))},
        repeat, nbytes=ARRAY_BYTES)

    peer_target(report, save, f"arrays save, {largest:,} × 8 KiB ≤ 1.0× safetensors save_file+fsync",
                label("safepoint", largest), label("safetensors save_file+fsync", largest), 1.0)
    peer_target(report, load, f"arrays restore, {largest:,} × 8 KiB ≤ 1.0× safetensors load_file",
                label("safepoint", largest), label("safetensors load_file", largest), 1.0)
    for section, op in ((save, "save"), (load, "restore")):
        growth_target(report, f"arrays {op} per array, safepoint: {span} arrays (linearity; no target)",
                      section, label("safepoint", largest))
    for ckpt in readers.values():
        ckpt.delete_all()


# ---------------------------------------------------------------------------- entry

def array_counts(report: Report) -> list[int]:
    """100, 1,000, 10,000 arrays (quick: 10, 100), at most ``--max-bytes`` of them."""
    counts = report.pick(full=(100, 1000, 10_000), quick=(10, 100))
    cap = max(2, report.size(full=counts[-1] * ARRAY_BYTES, quick=counts[-1] * ARRAY_BYTES) // ARRAY_BYTES)
    chosen = sorted({min(count, cap) for count in counts})
    return chosen if len(chosen) > 1 else [max(1, cap // 10), cap]


def run(report: Report, quick: bool) -> None:
    with report.scratch("growth") as root:
        steps_growth(report, root, report.pick(full=(10, 100, 1000, 10_000), quick=(10, 100)),
                     repeat=report.pick(full=30, quick=3), batch=report.pick(full=50, quick=10))
        tree_growth(report, root, report.pick(full=(100, 1000, 10_000, 100_000), quick=(100, 1000)),
                    repeat=report.pick(full=15, quick=3))
        array_growth(report, root, array_counts(report), repeat=report.pick(full=15, quick=3))


if __name__ == "__main__":
    from bench.__main__ import main

    sys.exit(main(["--only", "growth", *sys.argv[1:]]))
