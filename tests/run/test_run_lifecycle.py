"""A run's lifecycle: fresh start, resume after an error, attempts, completion, notes."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
from run_helpers import Boom, saved

import safepoint.run as runs
from safepoint.errors import SafepointError, UnsupportedType
from safepoint.policy import every, manual
from safepoint.store import open_store


def count_until(store: Path, stop_at: int | None, n: int = 100, **options: object) -> runs.Run:
    """Add up range(n) in run "job"; raise Boom at item ``stop_at``."""
    with runs.resume("job", location=store, **options) as run:
        run.state.setdefault("total", 0)
        for i in run.range(n):
            if i == stop_at:
                raise Boom(i)
            run.state["total"] += i
    return run


def test_a_fresh_run_starts_empty(store: Path) -> None:
    with runs.resume("job", location=store) as run:
        assert (run.state, run.resumed, run.attempt, run.position, run.complete) == ({}, False, 1, 0, False)


def test_an_error_keeps_the_last_checkpoint_and_a_rerun_continues_from_it(store: Path) -> None:
    with pytest.raises(Boom) as raised:
        count_until(store, 37, policy=every(items=10))
    notes = "\n".join(getattr(raised.value, "__notes__", []))
    assert "last checkpoint is at item 30" in notes and "safepoint rm job" in notes
    record = saved(store, "job")
    assert record is not None and record.record.position == 30
    assert record.state == {"total": sum(range(30))}
    seen = []
    with runs.resume("job", location=store, policy=every(items=10)) as run:
        assert run.resumed and run.attempt == 2 and run.position == 30
        for i in run.range(100):
            seen.append(i)
            run.state["total"] += i
    assert seen == list(range(30, 100))
    assert run.state["total"] == sum(range(100))


def test_the_attempt_counts_resumes_even_without_progress(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(Boom):
        count_until(store, 5, policy=every(items=1))
    for attempt in (2, 3):
        with pytest.raises(Boom), runs.resume("job", location=store) as run:
            assert run.attempt == attempt
            raise Boom
    assert runs.describe_run(open_store(store), "job").attempt == 3
    monkeypatch.setenv("SAFEPOINT_ATTEMPT", "9")  # a supervisor that counted more
    with pytest.raises(Boom), runs.resume("job", location=store) as run:
        assert run.attempt == 9
        raise Boom


def test_a_completed_run_is_removed_and_the_next_one_starts_fresh(store: Path) -> None:
    run = count_until(store, None, policy=every(items=7))
    assert run.complete and run.state["total"] == sum(range(100))
    assert open_store(store).list("") == []  # nothing of the run is left
    with runs.resume("job", location=store) as again:
        assert not again.resumed and again.state == {}


def test_keep_completed_keeps_the_final_state_and_skips_the_loops(store: Path) -> None:
    count_until(store, None, keep_completed=True)
    with runs.resume("job", location=store, keep_completed=True) as run:
        assert run.complete and run.resumed
        assert run.state == {"total": sum(range(100))}
        assert list(run.range(100)) == [] and list(run.iterate([1, 2])) == []
    info = runs.describe_run(open_store(store), "job")
    assert info.complete and info.position == 100 and info.progress == 1.0
    with runs.resume("job", location=store) as fresh:  # keep_completed=False: start over
        assert not fresh.resumed and fresh.state == {}


def test_a_half_updated_state_is_never_saved(store: Path) -> None:
    with pytest.raises(Boom), runs.resume("job", location=store, policy=every(items=1)) as run:
        for i in run.range(10):
            run.state["a"] = run.state.get("a", 0) + i
            if i == 6:
                raise Boom  # the item stops between its two updates
            run.state["b"] = run.state.get("b", 0) + i
    record = saved(store, "job")
    assert record.record.position == 6
    assert record.state == {"a": sum(range(6)), "b": sum(range(6))}


def test_several_loops_resume_in_the_loop_that_was_interrupted(store: Path) -> None:
    def job(fail: bool) -> list[tuple[str, int]]:
        seen = []
        with runs.resume("job", location=store, policy=every(items=1)) as run:
            for i in run.range(5):
                seen.append(("first", i))
            for i in run.iterate(list(range(5))):
                if fail and i == 3:
                    raise Boom
                seen.append(("second", i))
        return seen

    with pytest.raises(Boom):
        job(fail=True)
    assert job(fail=False) == [("second", 3), ("second", 4)]


def test_a_finished_loop_is_committed_when_it_ends(store: Path) -> None:
    with pytest.raises(Boom), runs.resume("job", location=store, policy=manual()) as run:
        run.state["n"] = 0
        for _ in run.range(10):
            run.state["n"] += 1
        raise Boom  # after the loop: its end was committed
    record = saved(store, "job")
    assert record.state == {"n": 10} and record.record.finished and record.record.position == 10


def test_position_is_the_index_of_the_item_in_progress(store: Path) -> None:
    with pytest.raises(Boom), runs.resume("job", location=store, policy=every(items=4)) as run:
        for i in run.range(10, 30):
            assert run.position == i - 10
            if i == 25:
                raise Boom
    with runs.resume("job", location=store) as run:
        assert run.position == 12  # before the loop: where it will resume
        assert next(iter(run.range(10, 30))) == 22
        assert run.position == 12
    with runs.resume("job", location=store) as run:
        assert list(run.range(3)) == [0, 1, 2] and run.position == 3


def test_a_checkpoint_in_a_loop_body_counts_the_item_as_done(store: Path) -> None:
    with pytest.raises(Boom), runs.resume("job", location=store, policy=manual()) as run:
        for i in run.iterate("abcdefgh"):
            run.state[i] = True
            if i == "c":
                run.checkpoint()
            if i == "f":
                raise Boom
    record = saved(store, "job")
    assert record.record.position == 3 and sorted(record.state) == ["a", "b", "c"]


def test_nested_loops_resume_at_the_exact_inner_item(store: Path) -> None:
    seen: list[tuple[int, int]] = []
    for stop in [(1, 2), (2, 0), None]:
        with pytest.raises(Boom) if stop else contextlib.nullcontext(), \
                runs.resume("job", location=store, policy=every(items=1)) as run:
            for epoch in run.range(3):
                for batch in run.iterate("abcd"):
                    if (epoch, "abcd".index(batch)) == stop:
                        raise Boom
                    seen.append((epoch, "abcd".index(batch)))
    assert seen == [(e, b) for e in range(3) for b in range(4)]


@pytest.mark.parametrize("how", ["checkpoint", "maybe_checkpoint"])
def test_a_checkpoint_after_an_inner_loop_counts_the_outer_item_done(store: Path, how: str) -> None:
    """The checkpoint at the end of outer item 0 must not carry the finished inner loop of
    item 0 into item 1 (it did: a resume skipped item 1's inner loop)."""
    seen: list[tuple[int, int]] = []
    for stop in [1, None]:
        with pytest.raises(Boom) if stop else contextlib.nullcontext(), \
                runs.resume("job", location=store, policy=every(items=1)) as run:
            for epoch in run.range(3):
                if epoch == stop:
                    raise Boom
                seen += [(epoch, batch) for batch in run.range(2)]
                getattr(run, how)()
    assert seen == [(e, b) for e in range(3) for b in range(2)]


def test_a_resume_removes_the_checkpoint_a_writer_left_without_its_record(
        store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer stopped between a large state's checkpoint and the record referring to it
    (here its append fails; a kill there is swept in tests/flow/test_flow_crash_points.py)
    leaves that checkpoint behind: the next writer removes it."""
    from safepoint import check
    from safepoint.run.log import RunLog

    big = np.arange(10_000, dtype=np.float64)
    with pytest.raises(Boom), runs.resume("job", location=store, policy=manual()) as run:
        run.state["rows"] = big
        run.checkpoint()
        run.state["rows"] = big * 2

        def fail(*args: object, **kwargs: object) -> None:
            raise Boom

        monkeypatch.setattr(RunLog, "append", fail)
        run.checkpoint()
    monkeypatch.undo()
    left = check(store)
    steps = {f.key for f in left.leftovers if not f.key.endswith(".json")}  # numbered per writer
    assert left.ok and len(steps) == 1 and {f.key for f in left.leftovers} >= {
        *steps, f"{next(iter(steps))}.json"}
    with runs.resume("job", location=store, policy=manual(), keep_completed=True) as run:
        assert np.array_equal(run.state["rows"], big)
        run.state["rows"] = 0  # a small state: the next record takes number 3, inline
        run.checkpoint()
    report = check(store)
    assert report.ok and report.clean, report.findings

    with runs.resume("job", location=store) as run:
        for i in run.range(10):
            if i == 2:
                break
        assert list(run.range(3)) == [0, 1, 2]


def test_loops_need_the_with_block(store: Path) -> None:
    run = runs.resume("job", location=store)
    with pytest.raises(SafepointError, match=r"inside `with safepoint\.resume"):
        run.range(3)
    with run:
        pass
    with pytest.raises(SafepointError, match="inside `with"):
        run.checkpoint()


def test_a_state_that_cannot_be_stored_is_named_at_the_first_checkpoint(store: Path) -> None:
    with pytest.raises(UnsupportedType, match=r"state\['lock'\]"), runs.resume("job", location=store) as run:
        run.state["lock"] = object()
        run.checkpoint()


def test_bad_arguments_are_refused_clearly(store: Path) -> None:
    with pytest.raises(ValueError, match="commit must be"):
        runs.resume("job", location=store, commit="later")
    with pytest.raises(SafepointError, match="invalid name"):
        runs.resume("../escape", location=store)
    with pytest.raises(ValueError, match="mode must be"), runs.resume("job", location=store) as run:
        run.open_output(store.parent / "out.txt", "a")


def test_large_arrays_go_to_a_full_checkpoint_and_the_journal_takes_over_again(store: Path) -> None:
    big = np.arange(100_000, dtype=np.float64)
    with pytest.raises(Boom), runs.resume("job", location=store, policy=every(items=1)) as run:
        run.state["weights"] = big
        for i in run.range(4):
            run.state["weights"] = run.state["weights"] + 1
            if i == 2:
                raise Boom
    assert any(entry.isdigit() for entry in open_store(store).list("job"))  # a step folder
    record = saved(store, "job")
    np.testing.assert_array_equal(record.state["weights"], big + 2)
    with pytest.raises(Boom), runs.resume("job", location=store) as run:
        assert run.attempt == 2 and run.position == 2
        run.state = {"small": 1}
        run.checkpoint()  # a journal commit, newer than the full checkpoint
        raise Boom
    assert [e for e in open_store(store).list("job") if e.isdigit()] == []  # superseded, deleted
    with pytest.raises(Boom), runs.resume("job", location=store) as run:
        assert run.state == {"small": 1} and run.attempt == 3 and run.position == 2
        raise Boom


def test_a_run_on_an_object_store_resumes_too(tmp_path: Path) -> None:
    location = f"memory://safepoint-run-tests/{tmp_path.name}"
    try:
        with pytest.raises(Boom):
            count_until(location, 55, policy=every(items=10))
        info = runs.describe_run(open_store(location), "job")
        assert info.position == 50 and info.attempt == 1
        run = count_until(location, None)
        assert run.state["total"] == sum(range(100)) and run.attempt == 2
        assert open_store(location).list("job") == []
    finally:
        open_store(location).delete("")


def test_describe_run(store: Path) -> None:
    assert runs.describe_run(open_store(store), "job") is None
    with pytest.raises(Boom):
        count_until(store, 75, policy=every(items=25))
    info = runs.describe_run(open_store(store), "job")
    assert (info.kind, info.position, info.total, info.progress, info.attempt, info.complete) == (
        "run", 75, 100, 0.75, 1, False)
    assert info.nbytes == (store / "job" / "run-00000001.journal").stat().st_size
    assert info.updated > 0 and info.liveness == "idle" and info.owner["pid"] == os.getpid()


def test_a_failure_while_opening_leaves_no_handler_behind(store: Path) -> None:
    import signal

    from safepoint.errors import LeaseHeld
    from safepoint.lease import Lease

    with pytest.raises(Boom), runs.resume("job", location=store) as run:
        run.checkpoint()
        raise Boom
    before = signal.getsignal(signal.SIGINT)
    other = Lease.acquire(open_store(store), "job", kind="other writer")  # a live writer
    entered = []
    try:
        with pytest.raises(LeaseHeld, match="other writer pid"), runs.resume("job", location=store):
            entered.append(True)  # never: one writer per name
    finally:
        other.release()
    assert entered == [] and signal.getsignal(signal.SIGINT) is before
