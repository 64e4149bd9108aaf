"""Core benchmarks: a large numpy state against the raw disk and peer formats, the blocking
time of an asynchronous save, and the latency of a small durable save.

Every save is durable (fsync'd) for every method, so that all pay for the disk. Loads read
files that were just written, so they measure reads from a warm page cache (dropping the
cache needs root), i.e. the cost of copying, checking and allocating, not of the disk.
"""

from __future__ import annotations

import importlib
import itertools
import os
import pickle
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import Case, GiB, MiB, Report, Section, compare, format_bytes, measure
from safepoint import Checkpointer
from safepoint.stateful import capture

ARRAYS = 8
State = dict[str, np.ndarray]
FIRST_TOUCH = (
    "Ratios use the best run: on this VM the first touch of freshly allocated memory sometimes "
    "costs seconds per GiB (the host backs guest pages lazily), which randomly hits whichever "
    "method allocates its output; the best run is the cost without that artefact."
)


def make_state(nbytes: int, arrays: int = ARRAYS) -> State:
    """``arrays`` float32 arrays of random values, ``nbytes`` in all."""
    rng = np.random.default_rng(0)
    count = max(1, nbytes // arrays // 4)
    return {f"layer{i}": rng.random(count, dtype=np.float32) for i in range(arrays)}


def same(a: State, b: Any) -> None:
    """Raise unless ``b`` holds exactly the arrays of ``a``."""
    if not isinstance(b, dict) or sorted(a) != sorted(b):
        raise AssertionError(f"loaded keys {sorted(b) if isinstance(b, dict) else type(b)} != saved {sorted(a)}")
    for key, value in a.items():
        if not np.array_equal(value, np.asarray(b[key])):
            raise AssertionError(f"loaded {key} differs from what was saved")


def optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception:  # not installed, or broken here: the row is skipped with a note
        return None


# ----------------------------------------------------------------- raw I/O (the limit)

def _write_all(fd: int, data: np.ndarray) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.write(fd, view[done : done + GiB])


def raw_write(path: Path, arrays: list[np.ndarray]) -> None:
    """open, write the bytes, fsync, close: what one durable file costs."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for array in arrays:
            _write_all(fd, array)
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_read(path: Path, like: State) -> State:
    """Read one file back into new arrays shaped like ``like``."""
    out = {k: np.empty_like(v) for k, v in like.items()}
    with open(path, "rb", buffering=0) as f:
        for array in out.values():
            view, done = memoryview(array).cast("B"), 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise EOFError(f"{path} is shorter than the state")
                done += got
    return out


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (its entries) by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------- peers

@dataclass
class Peer:
    """Another way to save a dict of numpy arrays; ``save`` is durable (fsync'd)."""

    name: str  # as the save row calls it
    loader: str  # as the load row calls it
    save: Callable[[Path, State], None]
    load: Callable[[Path], State]
    close: Callable[[], None] = lambda: None

    @property
    def stem(self) -> str:
        """A file-name-safe short name."""
        return self.name.split()[0].replace(".", "-")


def _pickle_save(path: Path, state: State) -> None:
    with open(path, "wb") as f:
        pickle.dump(state, f, protocol=5)
        f.flush()
        os.fsync(f.fileno())


def _pickle_load(path: Path) -> State:
    with open(path, "rb") as f:
        return pickle.load(f)


def _savez(path: Path, state: State) -> None:
    with open(path, "wb") as f:
        np.savez(f, **state)
        f.flush()
        os.fsync(f.fileno())


def _loadz(path: Path) -> State:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def peers(section: Section) -> list[Peer]:
    """The peers installed here; a note on the section for each one that is not."""
    found = [Peer("pickle (protocol 5)", "pickle.load", _pickle_save, _pickle_load),
             Peer("np.savez", "np.load", _savez, _loadz)]
    torch = optional("torch")
    if torch is not None:
        def torch_save(path: Path, state: State) -> None:
            with open(path, "wb") as f:
                torch.save({k: torch.from_numpy(v) for k, v in state.items()}, f)
                f.flush()
                os.fsync(f.fileno())

        def torch_load(path: Path) -> State:
            return {k: t.numpy() for k, t in torch.load(path, weights_only=True).items()}

        found.append(Peer("torch.save", "torch.load", torch_save, torch_load))
    else:
        section.note("torch not installed: no torch.save row.")
    st = optional("safetensors.numpy")
    if st is not None:
        def st_save(path: Path, state: State) -> None:
            st.save_file(state, str(path))
            fsync_path(path)

        found.append(Peer("safetensors", "safetensors load_file", st_save, lambda path: st.load_file(str(path))))
    else:
        section.note("safetensors not installed: no safetensors row.")
    ocp = optional("orbax.checkpoint")
    if ocp is not None:
        checkpointer = ocp.StandardCheckpointer()

        def orbax_save(path: Path, state: State) -> None:
            checkpointer.save(path.absolute(), state)
            checkpointer.wait_until_finished()

        found.append(Peer("orbax save", "orbax restore", orbax_save,
                          lambda path: checkpointer.restore(path.absolute()), checkpointer.close))
    else:
        section.note("orbax-checkpoint not installed (or broken here): no orbax row.")
    return found


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------- large state

def large_save(report: Report, root: Path, state: State, repeat: int) -> Section:
    nbytes = sum(v.nbytes for v in state.values())
    section = report.section(
        "Large state: durable save", reference="raw write, 1 file", nbytes=nbytes,
        description=f"{format_bytes(nbytes)} in {len(state)} float32 numpy arrays; every method fsyncs.")
    arrays = list(state.values())
    counter = itertools.count()
    sp_root = root / "safepoint-save"

    def fresh(stem: str) -> Callable[[], Path]:
        return lambda: root / f"{stem}-{next(counter)}"

    def raw_file(path: Path) -> Path:
        raw_write(path, arrays)
        return path

    def raw_files(folder: Path) -> Path:
        folder.mkdir()
        for i, array in enumerate(arrays):
            raw_write(folder / f"{i}.bin", [array])
        return folder

    def safepoint_save(ckpt: Checkpointer) -> Checkpointer:
        ckpt.save(0, state)
        return ckpt

    cases = {
        "raw write, 1 file": Case(raw_file, fresh("raw1"), remove),
        f"raw write, {len(arrays)} files": Case(raw_files, fresh("raw8"), remove),
        "safepoint": Case(
            safepoint_save,
            lambda: Checkpointer(f"s{next(counter)}", location=sp_root),
            Checkpointer.delete_all),
    }
    found = peers(section)
    for peer in found:
        def save(path: Path, peer: Peer = peer) -> Path:
            peer.save(path, state)
            return path

        peer.save(root / f"warmup-{peer.stem}", make_state(64 * 1024))  # first-call set-up, untimed
        remove(root / f"warmup-{peer.stem}")
        cases[peer.name] = Case(save, fresh(peer.stem), remove)
    section.add_all(compare(cases, repeat=repeat))
    for peer in found:
        peer.close()
    return section


def large_load(report: Report, root: Path, state: State, repeat: int) -> Section:
    nbytes = sum(v.nbytes for v in state.values())
    section = report.section(
        "Large state: load", reference="raw read, 1 file", nbytes=nbytes, statistic="best",
        description=f"{format_bytes(nbytes)} in {len(state)} float32 arrays, from a warm page cache "
                    f"(files just written); safepoint verifies every checksum on load. {FIRST_TOUCH}")
    raw_path = root / "load-raw"
    raw_write(raw_path, list(state.values()))
    ckpt = Checkpointer("load", location=root / "safepoint-load")
    ckpt.save(0, state)
    existing = {k: np.full_like(v, -1.0) for k, v in state.items()}  # a live state, pages touched
    checked: set[str] = set()

    def checking(name: str) -> Callable[[Any], None]:
        def after(loaded: Any) -> None:
            if name not in checked:
                same(state, loaded)
                checked.add(name)
        return after

    cases = {
        "raw read, 1 file": Case(lambda _: raw_read(raw_path, state), after=checking("raw")),
        "safepoint": Case(lambda _: ckpt.restore().state, after=checking("safepoint")),
        "safepoint, into existing arrays": Case(
            lambda _: ckpt.restore(into=existing).state, after=checking("into")),
        "safepoint, mmap": Case(lambda _: ckpt.restore(mmap=True).state, after=checking("mmap")),
    }
    found = peers(section)
    for peer in found:
        path = root / f"load-{peer.stem}"
        peer.save(path, state)
        cases[peer.loader] = Case(lambda _, peer=peer, path=path: peer.load(path), after=checking(peer.name))
    section.add_all(compare(cases, repeat=repeat), notes={
        "safepoint, into existing arrays": "restore(into=...) fills the caller's arrays",
        "safepoint, mmap": "read-only maps; checksums still read every page",
    })
    paths = {"safepoint": root / "safepoint-load"} | {peer.loader: root / f"load-{peer.stem}" for peer in found}
    for peer in found:
        peer.close()
    first_loads(report, paths, nbytes, report.pick(full=repeat, quick=1))  # a process each: slow
    return section


def first_loads(report: Report, paths: dict[str, Path], nbytes: int, repeat: int) -> Section:
    """The first load of a fresh process (``bench/first_load.py``), each method in a process of
    its own, interleaved round by round; the child times the load alone, after its imports."""
    section = report.section(
        "Large state: the first load in a fresh process", reference="safepoint", nbytes=nbytes,
        description=f"{format_bytes(nbytes)}, warm page cache; each sample is a new Python "
                    "process that imports what it needs, then times its first load (safepoint: "
                    "Checkpointer(...).restore(), the Checkpointer made in the timing); "
                    "medians, since every method allocates its output afresh here.")
    def first_load(method: str) -> float:
        child = subprocess.run([sys.executable, "-m", "bench.first_load", method, str(paths[method])],
                               capture_output=True, text=True, check=False,
                               cwd=Path(__file__).resolve().parent.parent)
        if child.returncode != 0:
            raise RuntimeError(f"first load with {method} failed: {child.stderr[-2000:]}")
        return float(child.stdout.split()[-1])

    section.add_all(compare({method: Case(lambda _, method=method: first_load(method), timed_by_run=True)
                             for method in paths}, repeat=repeat))
    peer_rows = [m for m in paths if m != "safepoint"]
    if peer_rows:
        fastest = min(peer_rows, key=lambda m: section.value(m))
        report.target(f"first restore() in a fresh process ≤ 0.9× the fastest peer ({fastest})",
                      section.value("safepoint") / section.value(fastest), at_most=0.9,
                      spread=section.spread("safepoint", to=fastest))
    return section


def large_targets(report: Report, save: Section, load: Section) -> None:
    raws = [r for r in save.rows if r.method.startswith("raw")]
    fastest_raw = min(raws, key=save.value)
    ours = save.value("safepoint")
    raw_spread = save.spread("safepoint", to=fastest_raw.method)
    report.target(f"save ≥ 0.9× the raw limit ({fastest_raw.method}), as throughput",
                  save.value(fastest_raw) / ours, at_least=0.9,
                  spread=raw_spread.inverted() if raw_spread else None)
    peer_rows = [r for r in save.rows if not r.method.startswith(("raw", "safepoint"))]
    if peer_rows:
        best = min(peer_rows, key=save.value)
        report.verdict("save faster than every peer",
                       f"{ours / save.value(best):.2f}× {best.method} (fastest peer)", ours < save.value(best),
                       spread=save.spread("safepoint", to=best.method))
    peer_loads = [r for r in load.rows if not r.method.startswith(("raw", "safepoint"))]
    if peer_loads:
        best = min(peer_loads, key=load.value)
        for method, goal in (("safepoint", "load at least as fast as the fastest peer"),
                             ("safepoint, into existing arrays", "load into existing arrays faster than the fastest peer")):
            ratio = load.value(method) / load.value(best)
            strict = "into" in method
            report.verdict(goal, f"{ratio:.2f}× {best.method} (best runs)", ratio < 1 if strict else ratio <= 1,
                           spread=load.spread(method, to=best.method))


# ------------------------------------------------------------------------ async save

def async_save(report: Report, root: Path, state: State, repeat: int) -> None:
    nbytes = sum(v.nbytes for v in state.values())
    section = report.section(
        "Asynchronous save: caller blocking time", reference="np.copyto", nbytes=nbytes,
        description=f"{format_bytes(nbytes)}, steady state (buffers allocated by a first save); "
                    "the background write is awaited outside the timing.")
    buffers = {k: np.empty_like(v) for k, v in state.items()}
    for k, v in state.items():
        np.copyto(buffers[k], v)  # touch the pages once, as a steady-state save would have

    def copy(_: Any) -> None:
        for k, v in state.items():
            np.copyto(buffers[k], v)

    ckpt = Checkpointer("async", location=root / "async", keep=1)
    forked = Checkpointer("forked", location=root / "forked", keep=1, snapshot="fork")
    steps = itertools.count()
    for each in (ckpt, forked):
        each.save(next(steps), state, blocking=False)
        each.wait()
    fork_row = "safepoint save(blocking=False), snapshot='fork'"
    cases = {
        "np.copyto": Case(copy),
        "safepoint save(blocking=False)": Case(
            lambda _: ckpt.save(next(steps), state, blocking=False), after=lambda _: ckpt.wait()),
        fork_row: Case(
            lambda _: forked.save(next(steps), state, blocking=False), after=lambda _: forked.wait()),
        "safepoint save (synchronous)": Case(lambda _: ckpt.save(next(steps), state)),
    }
    section.add_all(compare(cases, repeat=repeat), notes={
        "np.copyto": "one copy of the state into preallocated buffers",
        "safepoint save(blocking=False)": "snapshot='copy' (the default): into reused buffers",
        fork_row: "a forked process writes and commits; the caller waits for fork() only",
        "safepoint save (synchronous)": "keep=1: includes removing the previous step",
    })
    report.target("async save blocks ≤ 1.5× one np.copyto", section.ratio("safepoint save(blocking=False)"),
                  at_most=1.5, spread=section.spread("safepoint save(blocking=False)"))
    if nbytes < GiB:
        section.note("The target for the fork snapshot is set for 1 GiB: a fork() costs a few ms "
                     "whatever the state's size (the whole process's page tables; more with "
                     "torch imported), so on a small state it is not below 0.2× a copy.")
    report.target("fork snapshot: blocking ≤ 0.2× one np.copyto", section.ratio(fork_row),
                  at_most=0.2, spread=section.spread(fork_row))

    total = report.section(
        "Asynchronous save: time until committed", reference="safepoint save (synchronous)",
        nbytes=nbytes, description=f"{format_bytes(nbytes)}: save(blocking=False) then wait(), "
                                   "what the background write costs in all.")
    total.add_all(compare({
        "safepoint save (synchronous)": Case(lambda _: ckpt.save(next(steps), state)),
        "snapshot='copy': save + wait": Case(
            lambda _: ckpt.save(next(steps), state, blocking=False).wait()),
        "snapshot='fork': save + wait": Case(
            lambda _: forked.save(next(steps), state, blocking=False).wait()),
    }, repeat=repeat), notes={"snapshot='fork': save + wait": "one thread writes (the child "
                                                             "runs no thread pool)"})

    def rewrite(_: Any) -> None:  # the caller's next training step writes every page
        for k, v in state.items():
            np.copyto(v, buffers[k])

    cow = report.section(
        "Asynchronous save: the caller rewriting its state right after", nbytes=nbytes,
        reference="nothing in flight",
        description="np.copyto over every array of the state (same values): with a fork "
                    "snapshot in flight each first write to a page copies it (copy-on-write).")
    cow.add_all(compare({
        "nothing in flight": Case(rewrite),
        "a fork snapshot in flight": Case(
            rewrite, before=lambda: forked.save(next(steps), state, blocking=False),
            after=lambda _: forked.wait()),
    }, repeat=repeat))
    ckpt.delete_all()
    forked.delete_all()


# ------------------------------------------------------------------------ small state

SMALL_STATE = {
    "step": 123456, "epoch": 7, "loss": 0.0123, "lr": 3e-4, "run": "exp-42",
    "done": False, "seed": 1234, "best": 0.0101, "tags": ["a", "b"], "offset": 9876543210,
}


def raw_commit(folder: Path, data: bytes, counter: Iterator[int]) -> None:
    """The durable atomic commit a save cannot beat: temp file, fsync, rename, fsync dir."""
    tmp = folder / f".manifest.json.{next(counter)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, folder / "manifest.json")
    fsync_path(folder)


def small_save(report: Report, root: Path, repeat: int) -> Section:
    section = report.section(
        "Small state: durable save latency", reference="raw atomic commit",
        description="a dict of 10 fields; raw: write 200 bytes to a temp file, fsync, rename, "
                    "fsync the directory.")
    folder = root / "raw-commit"
    folder.mkdir()
    counter = itertools.count()
    payload = b"x" * 200
    steps = itertools.count()
    plain = Checkpointer("small", location=root / "small")
    kept = Checkpointer("small", location=root / "small-keep3", keep=3)
    loose = Checkpointer("small", location=root / "small-nodurable", durable=False)
    cases = {
        "raw atomic commit": Case(lambda _: raw_commit(folder, payload, counter)),
        "safepoint": Case(lambda _: plain.save(next(steps), SMALL_STATE)),
        "safepoint, keep=3": Case(lambda _: kept.save(next(steps), SMALL_STATE)),
        "safepoint, durable=False": Case(lambda _: loose.save(next(steps), SMALL_STATE)),
    }
    section.add_all(compare(cases, repeat=repeat), notes={
        "safepoint": f"keep=None: {repeat} steps accumulate",
        "safepoint, keep=3": "includes removing the oldest step",
        "safepoint, durable=False": "no fsync (opt-out)",
    })
    report.target("small durable save ≤ 1.3× raw atomic commit", section.ratio("safepoint"), at_most=1.3,
                  spread=section.spread("safepoint"))
    return section


_TRACED = ("fsync", "listdir", "stat", "open", "close", "write", "mkdir", "replace", "unlink", "rmdir")


@contextmanager
def traced_os(calls: dict[str, list[float]]) -> Iterator[None]:
    """Count and time the ``os`` functions the local store uses, while inside."""
    originals = {name: getattr(os, name) for name in _TRACED}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def traced(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                calls.setdefault(name, []).append(time.perf_counter() - start)
        return traced

    for name, fn in originals.items():
        setattr(os, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(os, name, fn)


def small_save_breakdown(report: Report, root: Path, saves: int) -> None:
    """Where a small durable save spends its time: system calls by kind, per save, plus the
    two Python steps that grow with the state and with the number of steps."""
    ckpt = Checkpointer("profile", location=root / "profile")
    for step in range(5):  # a few steps already there, as in a real run
        ckpt.save(step, SMALL_STATE)
    calls: dict[str, list[float]] = {}
    start = time.perf_counter()
    with traced_os(calls):
        for step in range(5, 5 + saves):
            ckpt.save(step, SMALL_STATE)
    total = (time.perf_counter() - start) / saves
    section = report.section(
        "Small state: where a save's time goes", reference="whole save",
        description=f"Checkpointer.save (keep=None, 5 to {5 + saves} steps present), per save, over "
                    f"{saves} saves; ratio = share of the whole save. The os rows add up with the "
                    "'everything else' row; the last two rows overlap them.")
    section.add("whole save", total)
    traced = 0.0
    for name, times in sorted(calls.items(), key=lambda kv: -sum(kv[1])):
        per_save = sum(times) / saves
        traced += per_save
        section.add(f"os.{name}", per_save, note=f"{len(times) / saves:.1f} calls per save")
    section.add("everything else (Python)", max(total - traced, 0.0),
                note="capture, encode, manifest JSON, path handling")
    section.add("capture(state)", measure(lambda: capture(SMALL_STATE), repeat=saves),
                note="state-tree walk; once per save")
    section.add("ckpt.steps()", measure(ckpt.steps, repeat=saves),
                note="list + one stat per step; twice per save (step check, retention)")


def small_save_growth(report: Report, root: Path, many: int, repeat: int) -> None:
    """Save latency with few and with many steps already committed (keep=None)."""
    section = report.section(
        "Small state: save latency against steps present", reference="5 steps present",
        description="keep=None; a save lists every committed step (a stat each) twice.")
    few = Checkpointer("few", location=root / "growth")
    lots = Checkpointer("lots", location=root / "growth")
    for step in range(5):
        few.save(step, SMALL_STATE)
    for step in range(many):
        lots.save(step, SMALL_STATE)
    counters = {"few": itertools.count(5), "lots": itertools.count(many)}
    section.add_all(compare({
        "5 steps present": Case(lambda _: few.save(next(counters["few"]), SMALL_STATE)),
        f"{many} steps present": Case(lambda _: lots.save(next(counters["lots"]), SMALL_STATE)),
    }, repeat=repeat))


# ---------------------------------------------------------------------------- entry

def run(report: Report, quick: bool) -> None:
    nbytes = report.size(full=GiB, quick=64 * MiB)
    state = make_state(nbytes)
    with report.scratch("core") as root:
        save = large_save(report, root, state, report.pick(full=3, quick=5))
        load = large_load(report, root, state, report.pick(full=7, quick=7))
        large_targets(report, save, load)
        async_save(report, root, state, report.pick(full=5, quick=3))
        del state
        small_save(report, root, report.pick(full=40, quick=10))
        small_save_breakdown(report, root, report.pick(full=40, quick=10))
        small_save_growth(report, root, report.pick(full=1000, quick=100), report.pick(full=20, quick=5))
