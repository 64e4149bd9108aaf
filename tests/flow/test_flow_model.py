"""Random sequences of runs, failures and restarts agree with a simple model of a flow."""

from __future__ import annotations

import itertools
import tempfile

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from safepoint.flow import Flow

_names = itertools.count()


def build(location: str, name: str, count: int, fail_at: int | None, calls: list[int]) -> Flow:
    """A new Flow object (as a new process would build it) of ``count`` steps: step ``i``
    appends ``i`` to ``state["trail"]``, checks the data step ``i-1`` returned, returns its
    own, and raises after changing the state when ``i == fail_at``."""
    flow = Flow(name, location=location, durable=False)
    for index in range(count):
        def body(state, data, index=index):
            calls.append(index)
            if index > 0:
                assert np.array_equal(data[f"s{index - 1}"], np.full(600, index - 1))
            state["trail"] = [*state["trail"], index]
            if index == fail_at:
                raise RuntimeError(f"step {index} fails")
            return np.full(600, index)
        flow.step(name=f"s{index}")(body)
    return flow


runs = st.lists(st.tuples(st.one_of(st.none(), st.integers(0, 4)),    # failing step
                          st.one_of(st.none(), st.integers(0, 4))),    # start_at
                min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(count=st.integers(1, 5), plan=runs)
def test_runs_follow_the_model(count, plan):
    name = f"model{next(_names)}"
    frontier = 0  # the model: how many steps, from the first, are done
    with tempfile.TemporaryDirectory() as location:
        for fail_at, start_at in plan:
            fail_at = None if fail_at is None or fail_at >= count else fail_at
            calls: list[int] = []
            flow = build(location, name, count, fail_at, calls)
            if start_at is not None and start_at >= min(count, frontier + 1):
                start_at = None
            start = start_at if start_at is not None else (0 if frontier == count else frontier)
            if fail_at is not None and fail_at >= start:
                try:
                    flow.run({"trail": []}, start_at=start_at)
                except RuntimeError:
                    pass
                else:
                    raise AssertionError("the failing step did not fail the run")
                assert calls == list(range(start, fail_at + 1))
                frontier = fail_at
                assert [r.status for r in flow.status()] == (
                    ["done"] * fail_at + ["failed"] + ["pending"] * (count - fail_at - 1))
                assert flow.state_before(fail_at) == {"trail": list(range(fail_at))}
            else:
                final = flow.run({"trail": []}, start_at=start_at)
                assert calls == list(range(start, count))
                assert final == {"trail": list(range(count))}  # no step's effect twice
                frontier = count
