"""The processes of the reader/writer stress test (run as scripts: no fork involved).

    python reader_writer.py write STORE KEEP SAVES EVERY SYNC_DIR
    python reader_writer.py read STORE NAME SYNC_DIR

The writer saves steps 1..SAVES as fast as it can, and after every EVERY-th save waits
until each reader has restored that step: so every reader provably races retention across
the whole run, whatever the scheduler does. The readers restore until the writer is done.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from safepoint import Checkpointer

WAIT_S = 120.0  # a reader that has not seen a step by then is stuck or dead


def state(step: int) -> dict[str, object]:
    return {"step": step, "w": np.full(1500, step, np.float64), "b": np.full(700, step, np.int32)}


def _seen(sync: Path, name: str) -> int:
    try:
        return int((sync / f"seen-{name}").read_text())
    except (FileNotFoundError, ValueError):
        return -1


def write(store: str, keep: int, saves: int, every: int, sync_dir: str) -> None:
    sync = Path(sync_dir)
    readers = [p.name.removeprefix("reader-") for p in sync.glob("reader-*")]
    ckpt = Checkpointer("job", location=store, keep=keep)
    for step in range(1, saves + 1):
        ckpt.save(step, state(step))
        if step % every:
            continue
        deadline = time.monotonic() + WAIT_S
        while any(_seen(sync, r) < step for r in readers):
            if time.monotonic() > deadline:
                late = [r for r in readers if _seen(sync, r) < step]
                sys.exit(f"readers {late} never restored step {step} within {WAIT_S:.0f} s")
            time.sleep(0.001)
    (sync / "done").touch()
    print(json.dumps({"saved": saves}))


def read(store: str, name: str, sync_dir: str) -> None:
    sync = Path(sync_dir)
    ckpt = Checkpointer("job", location=store)
    failures: list[str] = []
    steps: set[int] = set()
    restores, newest = 0, -1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        while not (sync / "done").exists():
            restores += 1
            try:
                restored = ckpt.restore()
                s = restored.state
                if not (s["step"] == restored.step and (s["w"] == restored.step).all()
                        and (s["b"] == restored.step).all()):
                    failures.append(f"inconsistent state at step {restored.step}")
                steps.add(restored.step)
                if restored.step > newest:
                    newest = restored.step
                    tmp = sync / f".seen-{name}"
                    tmp.write_text(str(newest))
                    os.replace(tmp, sync / f"seen-{name}")
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
    failures += [f"warning: {w.message}" for w in caught]
    print(json.dumps({"failures": failures[:20], "count": len(failures), "distinct": len(steps),
                      "restores": restores}))


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        read(sys.argv[2], sys.argv[3], sys.argv[4])
