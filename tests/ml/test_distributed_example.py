"""examples/distributed_train.py: 4 ranks of data-parallel torch training (gloo), stopped or
killed, resumed on 2 ranks or on 4: the samples of the epoch are exactly the uninterrupted
run's, and a resume on the same world size ends with bit-identical parameters."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import safepoint

pytest.importorskip("torch.distributed")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "distributed_train.py"
SAMPLES = 240


def launch(store: Path, ranks: int, *extra: str, background: bool = False) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), "--ranks", str(ranks), "--store",
                             str(store), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    if not background:
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, out[-4000:]
    return proc


def seen(store: Path, world: int, *, up_to: int | None = None, after: int = 0) -> Counter[int]:
    """The samples every rank of a ``world``-rank launch logged, for steps in (after, up_to]."""
    samples: Counter[int] = Counter()
    for path in store.glob(f"seen-{world}-*.txt"):
        for line in path.read_text().splitlines():
            step, *ids = map(int, line.split())
            if after < step and (up_to is None or step <= up_to):
                samples.update(ids)
    return samples


def first_step(store: Path, world: int) -> int | None:
    steps = [int(line.split()[0]) for path in store.glob(f"seen-{world}-*.txt")
             for line in path.read_text().splitlines()]
    return min(steps, default=None)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    store = tmp_path_factory.mktemp("uninterrupted")
    launch(store, 4)
    assert seen(store, 4) == Counter(range(SAMPLES))
    return np.load(store / "final.npy")


def test_stopped_then_resumed_on_4_and_on_2_ranks(tmp_path: Path, uninterrupted: np.ndarray) -> None:
    same, other = tmp_path / "same", tmp_path / "other"
    launch(same, 4, "--stop-at", "6")
    shutil.copytree(same, other)
    launch(same, 4)  # the same world size: bit-identical to the uninterrupted run
    assert np.array_equal(np.load(same / "final.npy"), uninterrupted)
    launch(other, 2)  # another world size: every sample of the epoch exactly once
    assert first_step(other, 2) == 7
    assert seen(other, 4, up_to=6) + seen(other, 2) == Counter(range(SAMPLES))
    for store in (same, other):
        assert safepoint.check(store).ok


def test_killed_at_a_random_instant_then_resumed_on_2_ranks(tmp_path: Path) -> None:
    proc = launch(tmp_path, 4, "--every", "3", "--pause", "0.1", background=True)
    reader = safepoint.Checkpointer("train", location=tmp_path)
    deadline = time.monotonic() + 240
    while (reader.latest_step() or 0) < 6:  # a checkpoint to resume from, then a kill anywhere
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-4000:]
        time.sleep(0.05)
    time.sleep(random.uniform(0, 0.5))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    resumed_from = reader.latest_step()
    assert resumed_from is not None and resumed_from >= 6
    launch(tmp_path, 2)
    if resumed_from < 15:  # 15 steps make the 4-rank epoch: the kill landed before its end
        assert first_step(tmp_path, 2) == resumed_from + 1
    assert seen(tmp_path, 4, up_to=resumed_from) + seen(tmp_path, 2) == Counter(range(SAMPLES))
    safepoint.Checkpointer("train", location=tmp_path).gc()
    assert safepoint.check(tmp_path).ok
