"""Preemption of a distributed job: a signal at ONE rank makes every rank save the same step
and stop.

Each rank is a process running the toy training loop of ``preempt_rank.py`` with
``Checkpointer(..., group=..., handle_preemption=True, save_interval_steps=10)``:
``if ckpt.should_save(step): ckpt.save(step, state)`` and ``if ckpt.preempted: break``. The
test reads the ranks' output and, once the rank it picked has printed that it reached step
N, sends that rank SIGTERM; the job is then relaunched, restores the checkpoint (each rank
into its own blocks, checking the values), trains on, and this time another rank gets
SIGUSR1. After each launch:

- every rank exited with status 0 and said it was preempted at the same step S >= N, and
  none trained past S;
- every rank saved the same steps: the policy's (every 10th, as the coordinator decides)
  and S; S is the newest committed step;
- the relaunch restored S on every rank with the values of step S.

At the end every committed step restores (in one process) with its expected values, and
``safepoint.check`` is clean, also after ``gc``. With ``TorchGroup`` (gloo; torch tensors)
and with ``StoreGroup`` (numpy arrays, no communication library).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
from multirank_support import assert_clean_after_gc

from safepoint import Checkpointer

HERE = Path(__file__).resolve().parent
SRC = str(HERE.parent.parent / "src")
NAME = "train"
WAIT = 90.0
AHEAD = 12  # the signal goes after the picked rank printed step start + AHEAD
EVERY = 10  # preempt_rank.py's policy: save_interval_steps
ENV = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


class Rank:
    """One rank's process, its output lines read by a thread."""

    def __init__(self, args: list[str], stderr: Path) -> None:
        self.stderr_path = stderr
        with stderr.open("w") as err:
            self.proc = subprocess.Popen([sys.executable, str(HERE / "preempt_rank.py"), *args],
                                         stdout=subprocess.PIPE, stderr=err, text=True, env=ENV)
        self.lines: list[dict[str, Any]] = []
        self.reached: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for text in self.proc.stdout:
            line = json.loads(text)
            with self._lock:
                self.lines.append(line)
                if "at" in line:
                    self.reached.setdefault(line["at"], threading.Event()).set()

    def wait_for_step(self, step: int) -> None:
        with self._lock:
            event = self.reached.setdefault(step, threading.Event())
        if not event.wait(WAIT):
            self.proc.kill()
            pytest.fail(f"the rank never printed step {step}: {self.stderr()}")

    def finish(self) -> int:
        try:
            code = self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"a rank did not exit {WAIT} s after the preemption: {self.stderr()}")
        self._reader.join(WAIT)
        return code

    def stderr(self) -> str:
        return self.stderr_path.read_text()[-4000:]

    def values(self, key: str) -> list[Any]:
        return [line[key] for line in self.lines if key in line]


def launch(tmp: Path, store: Path, group: str, lib: str, world: int, signum: int, target: int,
           start: int) -> tuple[int, list[int]]:
    """Run the job until ``target`` is sent ``signum`` after step ``start + AHEAD``; check what
    every rank said; returns the step saved at the preemption and the steps saved."""
    run = str(tmp / f"init-{uuid.uuid4().hex}") if group == "torch" else uuid.uuid4().hex
    ranks = [Rank(["train", str(r), str(world), str(store), group, lib, run],
                  tmp / f"rank-{r}-{uuid.uuid4().hex[:6]}.err") for r in range(world)]
    try:
        signal_after = start + AHEAD
        ranks[target].wait_for_step(signal_after)
        ranks[target].proc.send_signal(signum)
        codes = [rank.finish() for rank in ranks]
    finally:
        for rank in ranks:
            if rank.proc.poll() is None:
                rank.proc.kill()
                rank.proc.wait()
    for r, (rank, code) in enumerate(zip(ranks, codes, strict=True)):
        assert code == 0, f"rank {r} exited {code}: {rank.stderr()}"
        assert "Traceback" not in rank.stderr(), rank.stderr()
    if start:  # a relaunch: every rank restored the step the last launch stopped at
        for r, rank in enumerate(ranks):
            assert rank.values("restored") == [start - 1], (r, rank.lines[:3])
    preempted = [rank.values("preempted") for rank in ranks]
    (stopped,) = {tuple(p) for p in preempted}  # every rank: one preemption, the same step
    assert len(stopped) == 1, preempted
    step = stopped[0]
    assert step >= signal_after, (step, signal_after)
    saved = [rank.values("saved") for rank in ranks]
    assert all(s == saved[0] for s in saved), saved  # the same saves on every rank
    # the policy's steps (asked of the coordinator, its answer every rank's), and the stop
    policy = {s for s in range(start, step + 1) if s % EVERY == 0}
    assert saved[0] == sorted(policy | {step}), (saved[0], start, step)
    for r, rank in enumerate(ranks):
        steps = rank.values("at")
        assert steps == list(range(start, step + 1)), (r, steps[:3], steps[-3:])
    assert Checkpointer(NAME, location=store).latest_step() == step
    return step, saved[0]


CASES = [  # group, lib, world, (signal, rank) of each launch
    pytest.param("torch", "torch", 2, [(signal.SIGTERM, 1), (signal.SIGUSR1, 0)], id="torch-2"),
    pytest.param("torch", "torch", 3, [(signal.SIGUSR1, 2)], id="torch-3"),
    pytest.param("store", "numpy", 2, [(signal.SIGTERM, 0), (signal.SIGUSR1, 1)], id="store-2"),
    pytest.param("store", "numpy", 3, [(signal.SIGTERM, 2), (signal.SIGUSR1, 1)], id="store-3"),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("group", "lib", "world", "signals"), CASES)
def test_a_signal_at_one_rank_makes_every_rank_save_the_same_step(
        group: str, lib: str, world: int, signals: list[tuple[int, int]], tmp_path: Path) -> None:
    if lib == "torch" and find_spec("torch") is None:
        pytest.skip("needs torch")
    store = tmp_path / "store"
    start, all_saved = 0, []
    for signum, target in signals:
        step, saved = launch(tmp_path, store, group, lib, world, signum, target, start)
        all_saved += saved
        start = step + 1
    assert Checkpointer(NAME, location=store).steps() == sorted(all_saved)
    out = subprocess.run([sys.executable, str(HERE / "preempt_rank.py"), "verify", str(store),
                          str(world)], capture_output=True, text=True, env=ENV, timeout=WAIT)
    assert out.returncode == 0, out.stderr[-4000:]
    checked = [json.loads(line) for line in out.stdout.splitlines()]
    assert [c["step"] for c in checked] == sorted(all_saved)
    assert all(c["ok"] for c in checked), checked
    assert_clean_after_gc(store, NAME)
