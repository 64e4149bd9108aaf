"""Data-parallel training on CPU ranks (torch gloo) that survives being killed and resumes
on another number of ranks.

    python examples/distributed_train.py --ranks 4 --store /tmp/ckpt      # kill it any time
    python examples/distributed_train.py --ranks 2 --store /tmp/ckpt      # resumes, 2 ranks

Every rank holds the model (gradients are averaged across ranks), the optimizer, the
data iterator and the RNGs; all of it is replicated, so rank 0 saves it once, and the
embedding table is row-sharded across the ranks (each rank saves its rows). A checkpoint
every ``--every`` steps, all ranks at once (``Checkpointer(group=TorchGroup())``); SIGTERM
or SIGUSR1 at any rank makes every rank save the same step and stop. Resumed on another
world size, the data iterator continues the epoch from its global cursor: across all ranks
no sample is skipped and none is seen twice, and the embedding rows land on their new
owners. Each rank logs the samples of every step to ``<store>/seen-<world>-<rank>.txt``.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from safepoint import Checkpointer, GlobalRNG, Shard
from safepoint.data import BatchIterator
from safepoint.integrations.torch_distributed import TorchGroup

SAMPLES, FEATURES, BATCH = 240, 8, 4
VOCAB, DIM = 64, 8


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """The same small regression problem on every rank and every launch."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(SAMPLES, FEATURES, generator=generator)
    return x, x @ torch.linspace(-1, 1, FEATURES) + 0.1 * torch.randn(SAMPLES, generator=generator)


def average_gradients(net: torch.nn.Module, world: int) -> None:
    """Data parallelism: the mean of every rank's gradients, in one all-reduce of one flat
    buffer (a fixed layout, so that the sums are bit-for-bit the same in every launch;
    DDP's buckets are laid out anew after each start)."""
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    at = 0
    for g in grads:
        g.copy_(flat[at : at + g.numel()].view_as(g))
        at += g.numel()


def rows_of(rank: int, world: int) -> tuple[int, int]:
    return VOCAB * rank // world, VOCAB * (rank + 1) // world


def train(rank: int, world: int, port: int, store: str, every: int, stop_at: int | None,
          pause: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same RNG on every rank: replicated, saved once
    net = torch.nn.Sequential(torch.nn.Linear(FEATURES + DIM, 16), torch.nn.Dropout(0.1),
                              torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    first, last = rows_of(rank, world)
    embedding = torch.zeros(last - first, DIM)  # this rank's rows of a (VOCAB, DIM) table
    batches = BatchIterator(np.arange(SAMPLES), BATCH, shuffle=True, seed=7, epochs=1,
                            rank=rank, world_size=world)
    ckpt = Checkpointer("train", location=store, group=TorchGroup(), keep=2,
                        save_interval_steps=every, handle_preemption=True)
    state = {"model": net, "optimizer": optimizer, "data": batches, "rng": GlobalRNG(),
             "embedding": Shard(embedding, (first, 0), (VOCAB, DIM)), "step": 0}
    if ckpt.latest_step() is not None:
        state = ckpt.restore(into=state).state  # every rank: its own rows, the rest replicated
    step = state["step"]
    x, y = dataset()
    log = (Path(store) / f"seen-{world}-{rank}.txt").open("a")
    for ids in batches:
        step += 1
        rows = torch.as_tensor(ids) % VOCAB
        local = [r - first for r in rows.tolist() if first <= r < last]
        embedding[local] += 0.01  # a sharded state that every step changes
        features = torch.cat([x[ids], torch.ones(len(ids), DIM) * embedding.sum()], dim=1)
        loss = torch.nn.functional.mse_loss(net(features).squeeze(1), y[ids])
        optimizer.zero_grad()
        loss.backward()
        average_gradients(net, world)
        optimizer.step()
        time.sleep(pause)  # a heavier step
        log.write(f"{step} {' '.join(map(str, ids.tolist()))}\n")
        log.flush()
        state["step"] = step
        if ckpt.should_save(step) or step == stop_at:
            ckpt.save(step, state)
        if ckpt.preempted or step == stop_at:
            break
    else:
        if rank == 0:  # the epoch is done: the final parameters, for comparison
            params = torch.cat([p.detach().flatten() for p in net.parameters()])
            np.save(Path(store) / "final.npy", params.numpy())
    ckpt.close()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--store", default=".safepoint")
    parser.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    parser.add_argument("--stop-at", type=int, default=None, help="save at this step and stop")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds of extra work per step")
    args = parser.parse_args()
    Path(args.store).mkdir(parents=True, exist_ok=True)
    mp.start_processes(train, args=(args.ranks, free_port(), args.store, args.every, args.stop_at,
                                      args.pause),
                       nprocs=args.ranks, start_method="spawn")


if __name__ == "__main__":
    main()
