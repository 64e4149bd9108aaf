"""A flow fails and resumes with its returned data on every store backend."""

from __future__ import annotations

import numpy as np
import pytest

from safepoint.flow import Flow


def build(store, fail: bool, calls: list[str]) -> Flow:
    flow = Flow("backend-flow", location=store)

    @flow.step
    def make(state, data):
        calls.append("make")
        state["n"] = 50_000
        return {"x": np.arange(50_000, dtype=np.float32), "tag": b"\x00raw"}

    @flow.step
    def use(state, data):
        calls.append("use")
        if fail:
            raise RuntimeError("use fails")
        state["sum"] = float(data["make"]["x"].sum())
        state["tag"] = data["make"]["tag"]

    return flow


def test_flow_resumes_on_every_backend(store):
    calls: list[str] = []
    with pytest.raises(RuntimeError):
        build(store, True, calls).run()
    resumed = build(store, False, calls)
    assert resumed.status()[1].error == "RuntimeError: use fails"
    assert resumed.run() == {"n": 50_000, "sum": float(np.arange(50_000, dtype=np.float32).sum()),
                             "tag": b"\x00raw"}
    assert calls == ["make", "use", "use"]
