"""Distributed checkpoints over torch.distributed (gloo, CPU processes): plain tensors as
Shards and DTensors, saved by N ranks and restored on M in another layout, bit-exact."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

import safepoint

pytest.importorskip("torch.distributed")
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(mode: str, world: int, store: Path) -> None:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(HERE / "torch_ranks.py"), mode, str(r),
                               str(world), str(port), str(store)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for rank, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0 and f"rank {rank} ok" in out, out[-3000:]


@pytest.mark.parametrize("saved, restored", [(3, 2)])  # other pairs: the store-group tests
def test_torch_ranks_reshard_plain_tensors_and_dtensors(tmp_path: Path, saved: int,
                                                        restored: int) -> None:
    launch("save", saved, tmp_path)
    launch("restore", restored, tmp_path)
    whole = safepoint.Checkpointer("model", location=tmp_path).restore().state
    assert tuple(whole["dt"].shape) == (97, 13)
    node = safepoint.Checkpointer("model", location=tmp_path).manifest(11).body["tree"]["rep"]
    assert len(node["shards"]) == 1  # replicated on every rank: saved once
    assert safepoint.check(tmp_path).ok
