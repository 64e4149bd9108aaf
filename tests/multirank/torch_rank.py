"""One rank of a torch.distributed (gloo) job for test_sharded_failures.py.

    python torch_rank.py RANK WORLD STORE INIT_FILE VICTIM

Each rank saves step 1 through ``TorchGroup``, then tries step 2 with a fault at rank 1:
its shard has another dtype, then it saves a value it cannot encode; then step 2 is saved
without fault. Then rank VICTIM is killed (SIGKILL) in the middle of writing its data of
step 3; the survivor reports what its save raised, and how soon. One JSON line per
attempt: ``{"case", "raised", "message", "seconds", ...}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch.distributed as dist
from multirank_support import NAME, outcome_of, rank_state, spoil

from safepoint import Checkpointer
from safepoint.integrations.torch_distributed import TorchGroup


def report(case: str, outcome: dict[str, Any]) -> None:
    print(json.dumps({"case": case, **outcome}), flush=True)


def main() -> None:
    rank, world, store, init, victim = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                        sys.argv[4], int(sys.argv[5]))
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    ckpt = Checkpointer(NAME, location=store, group=TorchGroup(timeout=120))
    ckpt.save(1, rank_state(1, rank, world))
    for case in ("dtype", "unsupported"):
        state = rank_state(2, rank, world)
        if rank == 1:
            spoil(case, state, ckpt, world)
        report(case, outcome_of(lambda state=state: ckpt.save(2, state)))
    report("again", outcome_of(lambda: ckpt.save(2, rank_state(2, rank, world))))
    state = rank_state(3, rank, world)
    if rank == victim:
        spoil("dies", state, ckpt, world)
    started = time.monotonic()
    try:
        ckpt.save(3, state)
        outcome: dict[str, Any] = {"raised": None}
    except Exception as exc:
        outcome = {"raised": type(exc).__name__, "message": str(exc)[:2000],
                   "isinstance_runtime_error": isinstance(exc, RuntimeError)}
    outcome["seconds"] = time.monotonic() - started
    report("die", outcome)
    os._exit(0)  # the group is broken: no orderly shutdown of it


if __name__ == "__main__":
    main()
