"""The processes of the reader/writer stress test (run as scripts: no fork involved).

    python reader_writer.py write STORE KEEP STOP_FILE
    python reader_writer.py read STORE COUNT
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np

from safepoint import Checkpointer


def state(step: int) -> dict[str, object]:
    return {"step": step, "w": np.full(1500, step, np.float64), "b": np.full(700, step, np.int32)}


def write(store: str, keep: int, stop: str) -> None:
    ckpt = Checkpointer("job", location=store, keep=keep)
    step = ckpt.latest_step() or 0
    while not Path(stop).exists():
        step += 1
        ckpt.save(step, state(step))
    print(json.dumps({"saved": step}))


def read(store: str, count: int) -> None:
    ckpt = Checkpointer("job", location=store)
    failures: list[str] = []
    steps = set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(count):
            try:
                restored = ckpt.restore()
                s = restored.state
                if not (s["step"] == restored.step and (s["w"] == restored.step).all()
                        and (s["b"] == restored.step).all()):
                    failures.append(f"inconsistent state at step {restored.step}")
                steps.add(restored.step)
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
    failures += [f"warning: {w.message}" for w in caught]
    print(json.dumps({"failures": failures[:20], "count": len(failures), "distinct": len(steps)}))


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        read(sys.argv[2], int(sys.argv[3]))
