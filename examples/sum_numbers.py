"""Sum a file of numbers as a resumable stream: kill it at any moment (even kill -9) and
run it again; it seeks to where its last checkpoint was and the sum comes out exact.

    python examples/sum_numbers.py numbers.txt
"""

import sys

import safepoint

path = sys.argv[1] if len(sys.argv) > 1 else "numbers.txt"
with safepoint.resume("sum-numbers") as run:
    run.state.setdefault("total", 0)
    for line in run.lines(path):  # the byte offset and the total are committed together
        run.state["total"] += int(line)
print(run.state["total"])
