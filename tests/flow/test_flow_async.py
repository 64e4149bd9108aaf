"""Flows with ``async def`` steps, loaders and savers, run with ``await flow.arun()``."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from safepoint import Checkpointer
from safepoint.flow import Flow


def async_flow(tmp_path, calls: list[str], fail: list[bool]) -> Flow:
    flow = Flow("aflow", location=tmp_path)

    async def load_fetch(state):
        await asyncio.sleep(0)
        calls.append("load_fetch")
        return {"url": "https://example.invalid/data"}

    async def save_fetch(state, data):
        await asyncio.sleep(0)
        calls.append("save_fetch")

    @flow.step(load=load_fetch, save=save_fetch)
    async def fetch(state, data):
        await asyncio.sleep(0)
        calls.append(f"fetch {data['url']}")
        state["fetched"] = 4
        return np.arange(state["fetched"] * 1000.0)

    @flow.step
    def summarize(state, data):  # a plain step in an async flow
        calls.append("summarize")
        state["total"] = float(data["fetch"].sum())

    @flow.step
    async def publish(state, data):
        await asyncio.sleep(0)
        calls.append(f"publish {sorted(state)}")
        if fail[0]:
            raise ConnectionError("server down")
        state["published"] = True

    return flow


def test_async_steps_run_fail_and_resume_with_arun(tmp_path):
    calls, fail = [], [True]
    with pytest.raises(ConnectionError, match="server down"):
        asyncio.run(async_flow(tmp_path, calls, fail).arun())
    assert calls == ["load_fetch", "fetch https://example.invalid/data", "save_fetch",
                     "summarize", "publish ['fetched', 'total']"]

    calls.clear()
    fail[0] = False
    flow = async_flow(tmp_path, calls, fail)
    assert [row.status for row in flow.status()] == ["done", "done", "failed"]
    assert flow.status()[2].error == "ConnectionError: server down"
    final = asyncio.run(flow.arun())
    assert calls == ["publish ['fetched', 'total']"]
    assert final == {"fetched": 4, "total": float(np.arange(4000.0).sum()), "published": True}


def test_plain_run_refuses_async_steps_before_running_anything(tmp_path):
    calls: list[str] = []
    flow = async_flow(tmp_path, calls, [False])
    with pytest.raises(TypeError, match=r"step 'fetch' is async \(its function, loader, saver\).*await flow.arun"):
        flow.run()
    assert calls == [] and Checkpointer("aflow", location=tmp_path).steps() == []


def test_arun_runs_plain_flows_too(tmp_path):
    flow = Flow("plain", location=tmp_path)
    flow.step(name="one")(lambda state, data: state.update(one=1))
    assert asyncio.run(flow.arun({"zero": 0})) == {"zero": 0, "one": 1}


def test_a_cancelled_async_step_is_recorded_and_resumable(tmp_path):
    flow = Flow("cancel", location=tmp_path)
    started = asyncio.Event()

    @flow.step
    async def slow(state, data):
        started.set()
        await asyncio.sleep(60)

    async def main() -> None:
        task = asyncio.create_task(flow.arun())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert flow.status()[0].status == "failed"
    assert flow.status()[0].error.startswith("CancelledError")
