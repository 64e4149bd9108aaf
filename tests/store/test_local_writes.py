"""A local write lands whole however the kernel splits it: short ``writev`` calls that stop
inside a buffer or between two, buffers larger than one call may carry, and more buffers
than one call takes."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

import safepoint.store.local as local
from safepoint.store import LocalStore


@pytest.mark.parametrize("seed", range(5))
def test_short_and_capped_writes_land_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            seed: int) -> None:
    rng = random.Random(seed)
    monkeypatch.setattr(local, "_MAX_WRITE", 700)  # one call carries at most 700 bytes of a buffer
    monkeypatch.setattr(local, "_IOV_MAX", 7)  # and at most 7 buffers
    writev = os.writev
    calls = []

    def short(fd: int, buffers: list[memoryview]) -> int:
        assert len(buffers) <= 7 and all(b.nbytes <= 700 for b in buffers)
        total = sum(b.nbytes for b in buffers)
        keep = rng.randint(1, total)  # stop anywhere, inside a buffer or at its end
        out, left = [], keep
        for b in buffers:
            if left <= 0:
                break
            out.append(b[:left])
            left -= b.nbytes
        calls.append(keep)
        return writev(fd, out)

    monkeypatch.setattr(local.os, "writev", short)
    parts = [rng.randbytes(rng.choice([0, 1, 5, 699, 700, 701, 2500])) for _ in range(40)]
    store = LocalStore(tmp_path)
    store.write_blob("n/blob.bin", parts, durable=False)
    assert (tmp_path / "n" / "blob.bin").read_bytes() == b"".join(parts)
    assert len(calls) > 1
