"""ML benchmarks: torch tensors through safepoint against ``torch.save``/``torch.load`` and
``torch.distributed.checkpoint`` (single process, no process group), on the same state.

Every save is durable: torch.save is followed by an fsync, DCP's FileSystemWriter fsyncs
its files (``sync_files=True``, its default). Loads read files just written (warm page
cache). Skipped when torch is not installed.
"""

from __future__ import annotations

import itertools
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import Case, GiB, MiB, Report, Section, Skip, compare, format_bytes
from bench.bench_core import FIRST_TOUCH, optional, raw_write
from safepoint import Checkpointer

TENSORS = 8


def make_state(torch: Any, nbytes: int) -> dict[str, Any]:
    """Half float32, half bfloat16 tensors (a mixed-precision model), ``nbytes`` in all."""
    generator = torch.Generator().manual_seed(0)
    per_tensor = max(1, nbytes // TENSORS)
    state = {}
    for i in range(TENSORS):
        dtype = torch.float32 if i % 2 == 0 else torch.bfloat16
        count = max(1, per_tensor // dtype.itemsize)
        state[f"layer{i}_weight"] = torch.rand(count, generator=generator).to(dtype)
    return state


def nbytes_of(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def make_model(torch: Any, state: dict[str, Any]) -> Any:
    """A stand-in for a live model: an ``nn.Module`` whose buffers match the state's keys."""
    module = torch.nn.Module()
    for name, tensor in state.items():
        module.register_buffer(name, torch.full_like(tensor, -1))
    return module


def check_same(torch: Any, saved: dict[str, Any], loaded: Any) -> None:
    if not isinstance(loaded, dict) or sorted(loaded) != sorted(saved):
        raise AssertionError(f"loaded keys differ from the saved ones: {type(loaded)}")
    for key, tensor in saved.items():
        if not torch.equal(tensor, loaded[key]):
            raise AssertionError(f"loaded {key} differs from what was saved")


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def run(report: Report, quick: bool) -> None:
    torch = optional("torch")
    if torch is None:
        raise Skip("torch is not installed (pip install torch==2.13.0)")
    dcp = optional("torch.distributed.checkpoint")
    state = make_state(torch, report.size(full=GiB, quick=64 * MiB))
    with report.scratch("torch") as root, warnings.catch_warnings():
        # DCP warns that it assumes a single process when no process group exists: intended.
        warnings.filterwarnings("ignore", message=".*single process.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        save = save_section(report, torch, dcp, root, state, report.pick(full=3, quick=5))
        load = load_section(report, torch, dcp, root, state, report.pick(full=7, quick=7))
        asynchronous = async_section(report, torch, dcp, root, state, report.pick(full=5, quick=5))
    targets(report, save, load, asynchronous)


def save_section(report: Report, torch: Any, dcp: Any, root: Path, state: dict[str, Any],
                 repeat: int) -> Section:
    nbytes = nbytes_of(state)
    section = report.section(
        "Torch: durable save", reference="torch.save", nbytes=nbytes,
        description=f"{format_bytes(nbytes)} in {len(state)} tensors (float32 and bfloat16); every method fsyncs.")
    counter = itertools.count()
    raw = [t.view(torch.uint8).numpy() for t in state.values()]

    def fresh(stem: str) -> Callable[[], Path]:
        return lambda: root / f"{stem}-{next(counter)}"

    def raw_file(path: Path) -> Path:
        raw_write(path, raw)
        return path

    def torch_save(path: Path) -> Path:
        with open(path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        return path

    def safepoint_save(ckpt: Checkpointer) -> Checkpointer:
        ckpt.save(0, state)
        return ckpt

    cases = {
        "torch.save": Case(torch_save, fresh("torch"), remove),
        "safepoint": Case(safepoint_save, lambda: Checkpointer(f"s{next(counter)}", location=root / "sp"),
                          Checkpointer.delete_all),
        "raw write, 1 file": Case(raw_file, fresh("raw"), remove),
    }
    if dcp is not None:
        def dcp_save(path: Path) -> Path:
            dcp.save(state, checkpoint_id=path)
            return path

        dcp.save({"x": torch.zeros(4)}, checkpoint_id=root / "dcp-warmup")  # first-call set-up
        cases["dcp.save"] = Case(dcp_save, fresh("dcp"), remove)
    else:
        section.note("torch.distributed.checkpoint is not available: no DCP row.")
    section.add_all(compare(cases, repeat=repeat), notes={"raw write, 1 file": "the disk's limit"})
    return section


def load_section(report: Report, torch: Any, dcp: Any, root: Path, state: dict[str, Any],
                 repeat: int) -> Section:
    nbytes = nbytes_of(state)
    section = report.section(
        "Torch: load", reference="torch.load", nbytes=nbytes, statistic="best",
        description=f"{format_bytes(nbytes)} in {len(state)} tensors, from a warm page cache; "
                    f"'into a model' rows end with the values in a live nn.Module's tensors. {FIRST_TOUCH}")
    torch_path = root / "load.pt"
    with open(torch_path, "wb") as f:
        torch.save(state, f)
    ckpt = Checkpointer("load", location=root / "sp-load")
    ckpt.save(0, state)
    model = make_model(torch, state)
    checked: set[str] = set()

    def check(name: str, loaded: Callable[[Any], dict[str, Any]] = lambda out: out) -> Callable[[Any], None]:
        def after(output: Any) -> None:
            if name not in checked:
                check_same(torch, state, loaded(output))
                checked.add(name)
            for tensor in model.state_dict().values():
                tensor.fill_(-1)  # the next load into the model must really fill it
        return after

    def torch_into_model(_: Any) -> Any:
        return model.load_state_dict(torch.load(torch_path, weights_only=True))

    def safepoint_into_model(_: Any) -> Any:
        return ckpt.restore(into=model)

    from_model = lambda _: model.state_dict()  # noqa: E731
    cases = {
        "torch.load": Case(lambda _: torch.load(torch_path, weights_only=True), after=check("torch")),
        "safepoint": Case(lambda _: ckpt.restore().state, after=check("safepoint")),
        "torch.load(mmap=True)": Case(lambda _: torch.load(torch_path, weights_only=True, mmap=True),
                                      after=check("torch mmap")),
        "torch.load + load_state_dict, into a model": Case(torch_into_model, after=check("torch model", from_model)),
        "safepoint restore(into=model)": Case(safepoint_into_model, after=check("sp model", from_model)),
    }
    if dcp is not None:
        dcp_path = root / "load-dcp"
        dcp.save(state, checkpoint_id=dcp_path)
        cases["dcp.load, into a model"] = Case(
            lambda _: dcp.load(model.state_dict(), checkpoint_id=dcp_path), after=check("dcp", from_model))
    section.add_all(compare(cases, repeat=repeat), notes={
        "torch.load(mmap=True)": "lazy: pages are read on first use",
        "dcp.load, into a model": "fills the given tensors in place",
    })
    return section


def async_section(report: Report, torch: Any, dcp: Any, root: Path, state: dict[str, Any],
                  repeat: int) -> Section:
    nbytes = nbytes_of(state)
    section = report.section(
        "Torch: asynchronous save, caller blocking time", reference="safepoint save (synchronous)",
        nbytes=nbytes,
        description=f"{format_bytes(nbytes)}; steady state (after a first save); the background "
                    "write is awaited outside the timing.")
    buffers = {k: t.clone() for k, t in state.items()}
    ckpt = Checkpointer("async", location=root / "sp-async", keep=1)
    steps = itertools.count()
    ckpt.save(next(steps), state, blocking=False)
    ckpt.wait()

    def copy(_: Any) -> None:
        for key, tensor in state.items():
            buffers[key].copy_(tensor)

    cases = {
        "safepoint save (synchronous)": Case(lambda _: ckpt.save(next(steps), state)),
        "safepoint save(blocking=False)": Case(
            lambda _: ckpt.save(next(steps), state, blocking=False), after=lambda _: ckpt.wait()),
        "tensor.copy_ into buffers": Case(copy),
    }
    if dcp is not None and hasattr(dcp, "async_save"):
        counter = itertools.count()

        def dcp_async(_: Any) -> tuple[Any, Path]:
            path = root / f"dcp-async-{next(counter)}"
            return dcp.async_save(state, checkpoint_id=path), path

        def dcp_finish(output: tuple[Any, Path]) -> None:
            future, path = output
            future.result()
            remove(path)

        dcp_finish(dcp_async(None))  # first-call set-up
        cases["dcp.async_save"] = Case(dcp_async, after=dcp_finish)
    section.add_all(compare(cases, repeat=repeat), notes={
        "safepoint save (synchronous)": "keep=1: includes removing the previous step",
        "tensor.copy_ into buffers": "one in-memory copy: the floor",
        "dcp.async_save": "stages a fresh CPU copy each call",
    })
    ckpt.delete_all()
    return section


def targets(report: Report, save: Section, load: Section, asynchronous: Section) -> None:
    ours = save.value("safepoint")
    peers = [r for r in save.rows if r.method in ("torch.save", "dcp.save")]
    report.verdict("torch: save faster than torch.save and dcp.save",
                   ", ".join(f"{ours / save.value(r):.2f}× {r.method}" for r in peers),
                   all(ours < save.value(r) for r in peers))
    fresh = load.ratio("safepoint", "torch.load")
    report.verdict("torch: load faster than torch.load", f"{fresh:.2f}× torch.load (best runs)", fresh < 1,
                   spread=load.spread("safepoint", to="torch.load"))
    model_peers = [r for r in load.rows if r.method.startswith(("dcp.load", "torch.load + "))]
    into = load.value("safepoint restore(into=model)")
    report.verdict("torch: load into a model faster than dcp.load and torch.load + load_state_dict",
                   ", ".join(f"{into / load.value(r):.2f}× {r.method.split(',')[0]}" for r in model_peers)
                   + " (best runs)", all(into < load.value(r) for r in model_peers))
    shorter = 1 / asynchronous.ratio("safepoint save(blocking=False)")
    blocking = asynchronous.spread("safepoint save(blocking=False)")
    report.target("torch: async save blocks ≥ 5× shorter than a synchronous save", shorter, at_least=5.0,
                  unit="× shorter", spread=blocking.inverted() if blocking else None)
