"""One execution written by successive writers (lease generations): each new writer's
segment stands alone, its checkpoints never collide with an older writer's, and what a
killed writer left is cleaned up by the next one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from run_helpers import Boom

import safepoint
from safepoint.policy import manual
from safepoint.run.log import read_log
from safepoint.store import open_store


def _segments(root: Path, name: str) -> list[str]:
    return sorted(p.name for p in (root / name).glob("run-*.journal"))


def test_a_writer_whose_first_record_is_a_step_keeps_the_state(store: Path) -> None:
    """A new writer's segment replaces the older ones: it must hold the newest state even
    when its first record is a durable step, not a checkpoint of the state."""
    calls: list[str] = []
    with pytest.raises(Boom), safepoint.resume("job", location=store, policy=manual()) as run:
        run.state["x"] = 1
        run.step("a", calls.append, "a")
        run.checkpoint()
        raise Boom
    with pytest.raises(Boom), safepoint.resume("job", location=store, policy=manual()) as run:
        run.step("a", calls.append, "a")  # recorded: not called
        run.step("b", calls.append, "b")  # this writer's first record
        raise Boom
    assert _segments(store, "job") == ["run-00000002.journal"]  # the first one is gone
    with safepoint.resume("job", location=store, policy=manual()) as run:
        assert run.state == {"x": 1}
        run.step("a", calls.append, "a")
        run.step("b", calls.append, "b")
        run.step("c", calls.append, "c")
    assert calls == ["a", "b", "c"]
    report = safepoint.check(store)
    assert report.ok and report.clean, report.findings


def test_each_writer_numbers_its_checkpoints_apart(store: Path) -> None:
    """A state with a large array is a checkpoint step; a stale writer woken after a
    takeover must never write (or roll back) a step number the newer writer uses."""
    seen: list[int] = []
    for attempt in (1, 2):
        with pytest.raises(Boom), safepoint.resume("arrays", location=store, policy=manual()) as run:
            run.state["w"] = np.full(50_000, float(attempt))
            run.checkpoint()
            tree = read_log(open_store(store), "arrays").state.tree  # type: ignore[union-attr]
            seen.append(tree["checkpoint"])
            raise Boom
    assert seen[0] // 10**9 == 1 and seen[1] // 10**9 == 2
    report = safepoint.check(store)
    assert report.ok and report.clean, report.findings


def test_a_checkpoint_no_record_refers_to_is_removed_by_the_next_writer(store: Path) -> None:
    """A writer killed between saving a large state and committing its record leaves an
    orphan checkpoint: the next writer removes it at its first commit."""
    with pytest.raises(Boom), safepoint.resume("orphan", location=store, policy=manual()) as run:
        run.state["w"] = np.zeros(50_000)
        run.checkpoint()
        raise Boom
    orphan = safepoint.Checkpointer("orphan", location=store)
    orphan.save(5 * 10**9, {"w": np.ones(10)})  # what a killed writer could leave
    orphan.close()
    assert not safepoint.check(store).clean
    with safepoint.resume("orphan", location=store, policy=manual(), keep_completed=True) as run:
        run.checkpoint()
    assert 5 * 10**9 not in safepoint.Checkpointer("orphan", location=store).steps()
    report = safepoint.check(store)
    assert report.ok and report.clean, report.findings


def test_check_of_an_interrupted_run_with_arrays_is_ok(store: Path) -> None:
    """Superseded records may refer to checkpoints deleted on purpose: not damage."""
    with pytest.raises(Boom), safepoint.resume("big", location=store,
                                               policy=safepoint.every(items=1)) as run:
        for i in run.range(6):
            run.state["w"] = np.full(20_000, float(i))
            if i == 4:
                raise Boom
    report = safepoint.check(store)
    assert report.ok and report.clean, report.findings
    with safepoint.resume("big", location=store) as run:
        assert float(run.state["w"][0]) == 3.0
