"""One rank of a toy training job for test_preemption.py, or the check of what it saved.

    python preempt_rank.py train RANK WORLD STORE GROUP LIB RUN     (GROUP: torch | store)
    python preempt_rank.py verify STORE WORLD

``train``: restore the newest checkpoint if there is one (collectively, into this rank's
own blocks, checking the values restored), then train until preempted: every step updates
the rank's block of two global arrays (``m += 1; w += m``, exact in float64, so that step
``s`` holds ``m = s + 1`` and ``w = w0 + (s + 1)(s + 2) / 2`` whatever the library), prints
``{"at": s}``, and runs ``if ckpt.should_save(s): ckpt.save(s, state)`` and ``if
ckpt.preempted: break``, with ``handle_preemption=True`` and a policy of every
``EVERY`` steps. ``LIB`` is torch (tensors) or numpy (arrays); ``RUN`` names the launch
(the init file of gloo's rendezvous, or the StoreGroup's run id).

``verify``: restore every committed step in one process (no group) and check its values.
Every line printed is JSON.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np

from safepoint import Checkpointer, PerRank, Shard, StoreGroup

NAME = "train"
N = 1000  # elements of each global array per rank
EVERY = 10  # the policy: a save every EVERY steps (besides preemption)
LIMIT = 60.0  # seconds: a rank never preempted stops by itself (and says so)


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def expected(step: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """The global w and m after ``step``."""
    w0 = np.arange(world * N, dtype=np.float64)
    return w0 + (step + 1) * (step + 2) / 2, np.full(world * N, step + 1, dtype=np.float64)


def as_numpy(value: Any) -> np.ndarray:
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def state_of(step: int, rank: int, world: int, w: Any, m: Any) -> dict[str, Any]:
    return {"w": Shard(w, (rank * N,), (world * N,)), "m": Shard(m, (rank * N,), (world * N,)),
            "step": step, "mine": PerRank({"rank": rank, "step": step})}


def train(rank: int, world: int, store: str, kind: str, lib: str, run: str) -> None:
    if lib == "torch":
        import torch

        torch.set_num_threads(1)
        xp: Any = torch
        f64: Any = torch.float64
    else:
        xp, f64 = np, np.float64
    if kind == "torch":
        import torch.distributed as dist

        from safepoint.integrations.torch_distributed import TorchGroup

        dist.init_process_group("gloo", init_method=f"file://{run}", rank=rank, world_size=world)
        group: Any = TorchGroup(timeout=60)
    else:
        group = StoreGroup(rank, world, run, timeout=60, poll=0.001)
    ckpt = Checkpointer(NAME, location=store, group=group, handle_preemption=True,
                        save_interval_steps=EVERY)
    w = xp.arange(rank * N, (rank + 1) * N, dtype=f64)
    m = xp.zeros(N, dtype=f64)
    start = 0
    if ckpt.latest_step() is not None:
        into = state_of(0, rank, world, xp.zeros(N, dtype=f64), xp.zeros(N, dtype=f64))
        restored = ckpt.restore(into=into)
        step = restored.step
        assert restored.state["w"] is into["w"] and restored.state["m"] is into["m"]
        w, m = into["w"].data, into["m"].data
        w_all, m_all = expected(step, world)
        block = slice(rank * N, (rank + 1) * N)
        assert as_numpy(w).tobytes() == w_all[block].tobytes(), "w restored wrong"
        assert as_numpy(m).tobytes() == m_all[block].tobytes(), "m restored wrong"
        assert restored.state["step"] == step
        mine = restored.state["mine"]
        mine = mine.value if isinstance(mine, PerRank) else mine
        assert mine == {"rank": rank, "step": step}, mine
        say(restored=step)
        start = step + 1
    deadline = time.monotonic() + LIMIT
    step = start
    while time.monotonic() < deadline:
        m += 1
        w += m
        say(at=step)
        if ckpt.should_save(step):
            ckpt.save(step, state_of(step, rank, world, w, m))
            say(saved=step)
        if ckpt.preempted:
            say(preempted=step)
            break
        step += 1
        time.sleep(0.002)
    else:
        say(ran_out=step)
        sys.exit(2)
    ckpt.close()
    if kind == "torch":
        dist.destroy_process_group()


def verify(store: str, world: int) -> None:
    ckpt = Checkpointer(NAME, location=store)
    for step in ckpt.steps():
        state = ckpt.restore(step=step).state
        w_all, m_all = expected(step, world)
        ok = (as_numpy(state["w"]).tobytes() == w_all.tobytes()
              and as_numpy(state["m"]).tobytes() == m_all.tobytes()
              and state["step"] == step
              and state["mine"] == [{"rank": r, "step": step} for r in range(world)])
        say(step=step, ok=ok)


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7])
    else:
        verify(sys.argv[2], int(sys.argv[3]))
