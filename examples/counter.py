"""The classic counter: 50 items, half a second each. Press Ctrl+C, then run it again: it
continues at the next item, with its total intact.

    python examples/counter.py          # Ctrl+C at any moment, then run it again

The checkpoint lives in $SAFEPOINT_DIR (default ./.safepoint) under the name "counter";
COUNTER_DELAY sets the seconds per item.
"""

import os
import time

import safepoint

DELAY = float(os.environ.get("COUNTER_DELAY", "0.5"))

with safepoint.resume("counter") as run:
    if run.resumed:
        print(f"resuming at item {run.position} (attempt {run.attempt})")
    run.state.setdefault("total", 0)
    for i in run.range(50):
        time.sleep(DELAY)  # the work of one item
        run.state["total"] += i
        print(f"item {i:2d}   total {run.state['total']}")
print(f"done: total {run.state['total']}")
