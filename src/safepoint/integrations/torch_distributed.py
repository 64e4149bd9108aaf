"""torch.distributed: its process group as a distributed checkpoint's :class:`Group`.

>>> group = TorchGroup()                       # after torch.distributed.init_process_group
>>> ckpt = Checkpointer("train", group=group)  # every rank writes its own shards

The group opens a gloo process group of its own over the same ranks (``new_group``, a
collective call: create the TorchGroup on every rank, in the same order), so that an
asynchronous save's exchange in a background thread never interleaves with the training's
own collectives, and so that NCCL jobs exchange small CPU objects too.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

from safepoint.store import Store

__all__ = ["TorchGroup"]


class TorchGroup:
    """The ranks of ``process_group`` (the default group when None). ``timeout``: seconds a
    collective step waits for a rank that neither answers nor has died (a dead rank's peers
    fail at once: its connections close)."""

    def __init__(self, process_group: Any = None, *, timeout: float = 600.0) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchGroup needs torch.distributed initialised first "
                               "(torch.distributed.init_process_group)")
        ranks = dist.get_process_group_ranks(process_group or dist.group.WORLD)
        self._group = dist.new_group(ranks=ranks, backend="gloo",
                                     timeout=datetime.timedelta(seconds=timeout))
        self.rank = dist.get_rank(self._group)
        self.size = dist.get_world_size(self._group)

    def bind(self, store: Store, name: str) -> None:
        """Nothing to bind: the ranks talk through torch.distributed."""

    def all_gather(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value, group=self._group)
        return out

    def broadcast(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, group=self._group, group_src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """Whether any rank's ``flag`` is set: one small all-reduce."""
        vote = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self._group)
        return bool(vote.item())

    def close(self) -> None:
        """The group stays open as long as torch.distributed is (destroyed with it)."""

    def __repr__(self) -> str:
        return f"TorchGroup(rank={self.rank}, size={self.size})"
