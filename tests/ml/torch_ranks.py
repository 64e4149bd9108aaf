"""One rank of a torch.distributed (gloo) job that saves or restores a sharded checkpoint:
``python torch_ranks.py <save|restore> <rank> <world> <port> <store>`` (the tests start
several at once). Plain tensors as Shards, a DTensor, and replicated values."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh
from torch.distributed.tensor import Shard as DShard

from safepoint import Checkpointer, Shard
from safepoint.integrations.torch_distributed import TorchGroup

ROWS, COLS = 97, 13


def full(seed: int) -> torch.Tensor:
    return torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(seed))


def main() -> None:
    mode, rank, world, port, store = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    ckpt = Checkpointer("model", location=store, group=TorchGroup())
    rows = [ROWS * r // world for r in range(world + 1)]
    a, b = rows[rank], rows[rank + 1]
    if mode == "save":
        state = {"plain": Shard(full(1)[a:b].clone(), (a, 0), (ROWS, COLS)),
                 "dt": distribute_tensor(full(2), mesh, [DShard(0)]),
                 "rep": distribute_tensor(full(3), mesh, [Replicate()]), "step": 11}
        ckpt.save(11, state, blocking=rank % 2 == 0).wait()
    else:  # another world size, another layout: columns
        cols = [COLS * r // world for r in range(world + 1)]
        c, d = cols[rank], cols[rank + 1]
        plain = torch.zeros(ROWS, d - c)
        dt = distribute_tensor(torch.zeros(ROWS, COLS), mesh, [DShard(1)])
        rep = distribute_tensor(torch.zeros(ROWS, COLS), mesh, [DShard(0)])
        got = ckpt.restore(into={"plain": Shard(plain, (0, c), (ROWS, COLS)), "dt": dt,
                                 "rep": rep, "step": 0})
        assert got.step == 11 and got.state["step"] == 11
        assert got.state["dt"] is dt and got.state["plain"].data is plain
        assert torch.equal(plain, full(1)[:, c:d])
        assert torch.equal(dt.full_tensor(), full(2))
        assert torch.equal(rep.full_tensor(), full(3))
    ckpt.close()
    dist.destroy_process_group()
    print(f"rank {rank} ok", flush=True)


if __name__ == "__main__":
    main()
