"""Incremental saves against full saves of the same state, side by side in one run.

A state of 8 float32 arrays (1 GiB; 128 MiB with ``--quick``) is saved again and again,
durably, by six Checkpointers (keep=1, so every save also removes the one before it): a
full save, incremental saves after nothing, 5% of the chunks, or every chunk changed
(one value per changed chunk, changed before each timed save, untimed), and
``incremental="auto"`` after 5% or every chunk changed (timed once it has chosen). Reported: the save
time and the bytes written, each as a ratio to the full save, with spreads over the
rounds. A save deletes the data of the step removed a save before on a thread of its own,
as it does in a training loop while the next steps compute; that is awaited outside the
timing, so that it never falls into another case's time. Then the storage that keep=10
steps use when 5% of the chunks change per step, against one full step.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from bench import Case, GiB, MiB, Report, Spread, compare
from bench.bench_core import make_state
from safepoint import Checkpointer, knobs
from safepoint.format.chunks import digest, quick_digest
from safepoint.store import Store

FULL = "full save"
NOTHING = "incremental, nothing changed"
SOME = "incremental, 5% of chunks changed"
ALL = "incremental, every chunk changed"
AUTO_SOME = "auto, 5% of chunks changed"
AUTO_ALL = "auto, every chunk changed"
HASH = "BLAKE3 of every chunk, one thread"
QUICK = "XXH3 of every chunk, one thread"


def count_writes(store: Store, tally: list[int]) -> None:
    """Add the bytes of every data file ``store`` writes to ``tally[0]``."""
    original = store.write_blob

    def write_blob(key: str, parts: Any, *, durable: bool) -> None:
        parts = list(parts)
        tally[0] += sum(memoryview(p).nbytes for p in parts)
        original(key, parts, durable=durable)

    store.write_blob = write_blob  # type: ignore[method-assign]


def change(state: dict[str, np.ndarray], fraction: float, rng: np.random.Generator) -> None:
    """Change one value in ``fraction`` of all the chunks of ``state`` (at least one)."""
    places = []
    for array in state.values():
        per_chunk = knobs.CHUNK_BYTES // array.itemsize
        places += [(array, start, min(start + per_chunk, array.size))
                   for start in range(0, array.size, per_chunk)]
    count = max(1, round(len(places) * fraction))
    for index in rng.choice(len(places), size=count, replace=False):
        array, start, stop = places[int(index)]
        array[rng.integers(start, stop)] += 1.0


def hash_all(state: dict[str, np.ndarray], quick: bool = False) -> None:
    """The content hash (BLAKE3) of every chunk on one thread: what an incremental save
    adds to the work where chunks changed; ``quick``: their XXH3, what it adds where none
    did."""
    for array in state.values():
        data = memoryview(array).cast("B")
        for at in range(0, data.nbytes, knobs.CHUNK_BYTES):
            chunk = data[at : at + knobs.CHUNK_BYTES]
            quick_digest(chunk, 1) if quick else digest(chunk)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(report: Report, quick: bool) -> None:
    nbytes = report.size(full=GiB, quick=256 * MiB)  # at least 64 chunks: 5% is 3 of them
    repeat = report.pick(full=9, quick=5)
    base = make_state(nbytes)
    rng = np.random.default_rng(1)
    with report.scratch("incremental") as root:
        section = report.section(
            "Incremental save: durable, 8 arrays", reference=FULL, nbytes=nbytes,
            description=f"{nbytes // MiB} MiB in 8 float32 arrays, chunks of "
                        f"{knobs.CHUNK_BYTES // MiB} MiB (BLAKE3); keep=1.")
        written: dict[str, list[int]] = {}
        cases: dict[str, Case] = {}
        opened: list[Checkpointer] = []  # closed before the scratch folder goes
        for label, fraction in ((FULL, 1.0), (NOTHING, 0.0), (SOME, 0.05), (ALL, 1.0),
                                (AUTO_SOME, 0.05), (AUTO_ALL, 1.0)):
            state = {k: v.copy() for k, v in base.items()}
            auto = label.startswith("auto")
            mode: Any = "auto" if auto else label != FULL
            ckpt = Checkpointer(label.replace(" ", "-").replace(",", "").replace("%", ""),
                                location=root, keep=1, incremental=mode)
            opened.append(ckpt)
            tally = [0]
            count_writes(ckpt.store, tally)
            steps = itertools.count()
            # untimed: the first save; "auto" saves twice in full, measuring, and where it
            # then saves incrementally, the first such save writes every chunk; where every
            # chunk changes, the first changed save still takes BLAKE3s (a place is known
            # to be rewritten at every save from the second): the rounds time saves after it
            for warm in range(3 if auto else 2 if label == ALL else 1):
                if warm:
                    change(state, fraction, rng)
                ckpt.save(next(steps), state)
            ckpt.wait()
            written[label] = []

            def before(state: dict[str, np.ndarray] = state, fraction: float = fraction,
                       tally: list[int] = tally) -> None:
                if fraction:
                    change(state, fraction, rng)
                tally[0] = 0

            def save(_: Any, ckpt: Checkpointer = ckpt, state: dict[str, np.ndarray] = state,
                     steps: Any = steps) -> None:
                ckpt.save(next(steps), state)

            def after(_: Any, label: str = label, tally: list[int] = tally,
                      ckpt: Checkpointer = ckpt) -> None:
                ckpt.wait()  # the old step's data, deleted in the background: not in another case's time
                written[label].append(tally[0])

            cases[label] = Case(save, before, after)
        cases[HASH] = Case(lambda _: hash_all(base))
        cases[QUICK] = Case(lambda _: hash_all(base, quick=True))
        section.add_all(compare(cases, repeat=repeat), notes={
            FULL: "incremental=False", ALL: "hashing on the writing threads",
            AUTO_SOME: "incremental after the 2nd save", AUTO_ALL: "full saves, XXH3 beside",
            HASH: "no save: the floor of an incremental save on one core",
            QUICK: "no save: the floor of one in which nothing changed"})
        full = written[FULL]
        for label, goal in ((NOTHING, 0.1), (SOME, 0.1), (ALL, 1.1), (AUTO_SOME, 0.1),
                            (AUTO_ALL, 1.1)):
            ratios = Spread.of([w / f for w, f in zip(written[label], full, strict=True)])
            report.target(f"bytes written, {label.removeprefix('incremental, ')} ≤ {goal}× full",
                          ratios.median, at_most=goal, spread=ratios)
        for label, goal in ((NOTHING, 0.1), (SOME, 0.25), (ALL, 1.1),  # the targets
                            (AUTO_SOME, 0.25), (AUTO_ALL, 1.1)):
            report.target(f"save time, {label.removeprefix('incremental, ')} ≤ {goal}× full",
                          section.ratio(label), at_most=goal, spread=section.spread(label))

        # asynchronous saves: the caller is blocked for the copy only, hashing is background
        blocked = report.section(
            "Incremental save(blocking=False): caller blocking time", reference="full, async",
            nbytes=nbytes, description="5% of the chunks changed before each save; the "
                                       "background write is awaited outside the timing.")
        async_cases = {}
        for label, incremental in (("full, async", False), ("incremental, async", True)):
            state = {k: v.copy() for k, v in base.items()}
            ckpt = Checkpointer(f"async-{incremental}", location=root, keep=1,
                                incremental=incremental)
            opened.append(ckpt)
            steps = itertools.count()
            ckpt.save(next(steps), state, blocking=False)  # buffers allocated: untimed
            ckpt.wait()
            async_cases[label] = Case(
                lambda _, ckpt=ckpt, state=state, steps=steps: ckpt.save(
                    next(steps), state, blocking=False),
                lambda state=state: change(state, 0.05, rng),
                lambda _, ckpt=ckpt: ckpt.wait())
        blocked.add_all(compare(async_cases, repeat=repeat))
        report.target("incremental save(blocking=False) blocks ≤ 1.2× a full one",
                      blocked.ratio("incremental, async"), at_most=1.2,
                      spread=blocked.spread("incremental, async"))

        # storage: keep=10 steps, 5% of the chunks changed per step
        state = {k: v.copy() for k, v in base.items()}
        ckpt = Checkpointer("kept", location=root, keep=10, incremental=True)
        for step in range(15):
            change(state, 0.05, rng)
            ckpt.save(step, state)
        ckpt.gc()  # the chunks of the step removed last (deferred for readers)
        one = Checkpointer("one", location=root)
        one.save(0, state)
        used, single = folder_bytes(root / "kept"), folder_bytes(root / "one")
        for each in (*opened, ckpt, one):
            each.close()
        report.target("storage of keep=10 steps, 5% changed per step ≤ 1.6× one full step",
                      used / single, at_most=1.6)
