"""torchdata's ``StatefulDataLoader`` in a safepoint state tree resumes exactly.

A shuffled loader over a small map-style dataset (23 items in batches of 4: six batches an
epoch, the last one short) runs for three epochs. Saved with ``Checkpointer.save`` at a
batch inside an epoch, at the last batch of an epoch, or between two epochs, and restored
with ``Checkpointer.restore(into=...)`` into a fresh loader built with another seed, the
batches before the save and after the restore are exactly those of an uninterrupted run,
with no worker processes and with two.

A second pair of tests runs the loop in a child process (this file run as a script). The
child saves at a chosen batch, reports it, takes two more batches (past an epoch boundary)
and blocks; only then is its process group (the child and its data-loader workers)
SIGKILLed, so the kill lands at that known place, never at random. A new process restores
from the checkpoint and must replay the two lost batches and the rest of the run.

The order is shuffled by torchdata's stateful ``RandomSampler`` with a seeded generator of
its own. ``shuffle=True, generator=g`` works as well with workers; without workers
torchdata 0.11.0 resumes the current epoch exactly but shuffles the later epochs
differently (see the xfail test at the end, and docs/ml.md).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torchdata.stateful_dataloader")

import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler

from safepoint import Checkpointer

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")

EPOCHS = 3
BATCHES_PER_EPOCH = 6  # 23 items in batches of 4
SEED = 7
NAME = "loader"


class Items(torch.utils.data.Dataset):
    """Item ``i`` is ``i``: a batch tells exactly which indices it holds."""

    def __len__(self) -> int:
        return 23

    def __getitem__(self, index: int) -> int:
        return index


def make_loader(num_workers: int, seed: int = SEED, *, sampler: bool = True) -> StatefulDataLoader:
    """A shuffled loader; ``sampler=False`` shuffles with ``shuffle=True, generator=g``."""
    generator = torch.Generator().manual_seed(seed)
    items = Items()
    if sampler:
        return StatefulDataLoader(
            items, batch_size=4, sampler=RandomSampler(items, generator=generator),
            num_workers=num_workers,
        )  # fmt: skip
    return StatefulDataLoader(
        items, batch_size=4, shuffle=True, generator=generator, num_workers=num_workers
    )


def new_tree(loader: StatefulDataLoader) -> dict[str, Any]:
    return {"loader": loader, "epoch": 0, "seen": 0}


Stop = Callable[[dict[str, Any], str], bool]


def train(
    tree: dict[str, Any], emit: Callable[[list[int]], None], stop: Stop | None = None
) -> None:
    """The loop of ``EPOCHS`` epochs from where ``tree`` stands; ``emit`` gets each batch.

    ``stop(tree, "batch")`` is asked after every batch and ``stop(tree, "epoch")`` after
    every finished epoch; when it answers True the loop returns there.
    """
    while tree["epoch"] < EPOCHS:
        for batch in tree["loader"]:
            emit(batch.tolist())
            tree["seen"] += 1
            if stop is not None and stop(tree, "batch"):
                return
        tree["epoch"] += 1
        if stop is not None and stop(tree, "epoch"):
            return


def uninterrupted(num_workers: int, *, sampler: bool = True) -> list[list[int]]:
    batches: list[list[int]] = []
    train(new_tree(make_loader(num_workers, sampler=sampler)), batches.append)
    return batches


def assert_same_state(saved: Any, live: Any, path: str = "state") -> None:
    """``saved`` (read back from a checkpoint) equals ``live`` in types and values."""
    assert type(saved) is type(live), f"{path}: {type(saved).__name__} != {type(live).__name__}"
    if isinstance(live, dict):
        assert saved.keys() == live.keys(), path
        for key in live:
            assert_same_state(saved[key], live[key], f"{path}[{key!r}]")
    elif isinstance(live, torch.Tensor):
        assert saved.dtype == live.dtype and torch.equal(saved, live), path
    else:
        assert saved == live, path


def interrupted(
    tmp_path: Path, num_workers: int, save_at: tuple[str, int], *, sampler: bool = True
) -> list[list[int]]:
    """Run until ``save_at`` (``("batch", n)`` after n batches, ``("epoch", e)`` after e
    epochs), save, restore into a fresh loader and run to the end: all batches seen."""
    checkpointer = Checkpointer(NAME, location=tmp_path / "store")
    batches: list[list[int]] = []
    tree = new_tree(make_loader(num_workers, sampler=sampler))

    def save_here(tree: dict[str, Any], at: str) -> bool:
        count = tree["epoch"] if at == "epoch" else tree["seen"]
        if (at, count) != save_at:
            return False
        checkpointer.save(tree["seen"], tree)
        return True

    train(tree, batches.append, save_here)
    assert len(batches) < EPOCHS * BATCHES_PER_EPOCH
    assert_same_state(checkpointer.restore().state["loader"], tree["loader"].state_dict())

    fresh = make_loader(num_workers, seed=SEED + 1, sampler=sampler)  # the checkpoint decides
    restored = checkpointer.restore(into=new_tree(fresh))
    assert restored.step == len(batches)
    assert restored.state["loader"] is fresh
    train(restored.state, batches.append)
    return batches


SAVE_POINTS = [
    ("batch", 3),  # inside epoch 0
    ("batch", BATCHES_PER_EPOCH),  # at the last batch of epoch 0, inside its loop
    ("epoch", 1),  # between epochs 0 and 1, after the loop ended
    ("batch", BATCHES_PER_EPOCH + 2),  # inside epoch 1
    ("batch", EPOCHS * BATCHES_PER_EPOCH - 1),  # one batch before the end
]


@pytest.mark.parametrize("save_at", SAVE_POINTS, ids=lambda p: f"{p[0]}{p[1]}")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_restored_loader_yields_the_rest_of_the_uninterrupted_run(
    tmp_path: Path, num_workers: int, save_at: tuple[str, int]
) -> None:
    full = uninterrupted(num_workers)
    assert len(full) == EPOCHS * BATCHES_PER_EPOCH
    assert sorted(i for batch in full[:BATCHES_PER_EPOCH] for i in batch) == list(range(23))
    assert full[:BATCHES_PER_EPOCH] != full[BATCHES_PER_EPOCH : 2 * BATCHES_PER_EPOCH]
    assert interrupted(tmp_path, num_workers, save_at) == full


@pytest.mark.parametrize("save_at", SAVE_POINTS[:3], ids=lambda p: f"{p[0]}{p[1]}")
def test_shuffle_with_the_loaders_generator_resumes_with_workers(
    tmp_path: Path, save_at: tuple[str, int]
) -> None:
    full = uninterrupted(2, sampler=False)
    assert interrupted(tmp_path, 2, save_at, sampler=False) == full


@pytest.mark.xfail(
    strict=True,
    reason="torchdata 0.11.0: with num_workers=0, a loader restored mid-epoch leaves its "
    "generator one _base_seed draw behind, so the epochs after the restored one are "
    "shuffled differently; give the sampler its own generator instead",
)
def test_shuffle_with_the_loaders_generator_without_workers(tmp_path: Path) -> None:
    full = uninterrupted(0, sampler=False)
    resumed = interrupted(tmp_path, 0, ("batch", 3), sampler=False)
    assert resumed[:BATCHES_PER_EPOCH] == full[:BATCHES_PER_EPOCH]  # the current epoch is exact
    assert resumed == full


# ---------------------------------------------------------------- killed in a child process

SAVE_AT = BATCHES_PER_EPOCH - 1  # the child saves here, then takes two batches into epoch 1
LOST = 2


def child(mode: str, location: str, num_workers: int) -> None:
    """``run``: save after batch ``SAVE_AT``, print ``saved``, take ``LOST`` more batches,
    print ``waiting`` and block until killed. ``resume``: restore and run to the end."""
    checkpointer = Checkpointer(NAME, location=location)
    tree = new_tree(make_loader(num_workers))
    if mode == "resume":
        tree = checkpointer.restore(into=tree).state
        print(f"resumed {tree['seen']}", flush=True)

    def emit(batch: list[int]) -> None:
        print("batch " + ",".join(map(str, batch)), flush=True)

    def stop(tree: dict[str, Any], at: str) -> bool:
        if mode == "run" and at == "batch" and tree["seen"] == SAVE_AT:
            checkpointer.save(tree["seen"], tree)
            print(f"saved {tree['seen']}", flush=True)
        if mode == "run" and at == "batch" and tree["seen"] == SAVE_AT + LOST:
            print("waiting", flush=True)
            sys.stdin.readline()  # the parent kills the process here
            raise SystemExit("not killed")
        return False

    train(tree, emit, stop)
    print("done", flush=True)


def batches_in(lines: list[str]) -> list[list[int]]:
    return [
        [int(i) for i in line.split()[1].split(",")] for line in lines if line.startswith("batch ")
    ]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_sigkilled_after_a_checkpoint_resumes_in_a_new_process(
    tmp_path: Path, num_workers: int
) -> None:
    location = tmp_path / "store"
    command = [sys.executable, __file__, str(location), str(num_workers)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "run.err", "w") as errors:
        process = subprocess.Popen(
            [*command[:2], "run", *command[2:]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=errors, text=True, env=env, start_new_session=True,
        )  # fmt: skip
        lines: list[str] = []
        try:
            for line in process.stdout:
                lines.append(line.strip())
                if lines[-1] == "waiting":
                    break
            else:
                pytest.fail(f"the child ended early: {lines}\n{(tmp_path / 'run.err').read_text()}")
            os.killpg(process.pid, signal.SIGKILL)  # the child and its workers
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
            process.stdout.close()
            process.stdin.close()
    assert process.returncode == -signal.SIGKILL
    saved = lines.index(f"saved {SAVE_AT}")
    before, lost = batches_in(lines[:saved]), batches_in(lines[saved:])
    assert len(before) == SAVE_AT and len(lost) == LOST
    assert Checkpointer(NAME, location=location).latest_step() == SAVE_AT

    rerun = subprocess.run(
        [*command[:2], "resume", *command[2:]], capture_output=True, text=True, env=env,
        timeout=120,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    out = rerun.stdout.splitlines()
    assert out[0] == f"resumed {SAVE_AT}" and out[-1] == "done"
    resumed = batches_in(out)
    assert resumed[:LOST] == lost  # the batches the kill lost come again
    assert before + resumed == uninterrupted(num_workers)


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2], int(sys.argv[3]))
