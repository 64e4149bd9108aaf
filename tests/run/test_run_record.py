"""The record envelope of executions: encoding, validation, and reading back."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from run_helpers import Boom

import safepoint.run as runs
from safepoint.errors import CorruptCheckpoint
from safepoint.format import prepare
from safepoint.policy import every
from safepoint.run.record import Frame, Record, reachable
from safepoint.run.run import _flat_node
from safepoint.store import open_store
from safepoint.store.journal import Journal

JOURNAL = "run-00000001.journal"  # the first writer's log

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5), st.binary(max_size=3),
    st.lists(st.integers(), max_size=2),
)


@given(st.dictionaries(st.text(max_size=3), scalars, max_size=6))
def test_the_fast_encoding_of_a_flat_state_is_the_formats_own(state: dict[str, Any]) -> None:
    fast = _flat_node(state)
    if fast is not None:
        assert json.dumps(fast, allow_nan=False) == json.dumps(prepare(state).node, allow_nan=False)
        assert fast is not state


def test_the_fast_encoding_leaves_special_values_to_the_format() -> None:
    for value in (math.nan, math.inf, 2**64, b"x", [1], {"a": 1}):
        assert _flat_node({"v": value}) is None
    assert _flat_node({"$": 1}) is None and _flat_node({1: 2}) is None
    assert _flat_node({"a": 1, "b": 2.5, "c": "x", "d": None, "e": True}) == {
        "a": 1, "b": 2.5, "c": "x", "d": None, "e": True}


def test_a_record_round_trips_and_a_malformed_one_is_refused() -> None:
    record = Record("state", seq=3, attempt=2, time=1.5, outputs={"/x": 5}, tree={"node": {"n": 1}},
                    frames=[Frame(1, 10, 20, 0.5, {"kind": "range"})])
    assert Record.from_json(record.to_json(), "here") == record
    body = json.loads(record.to_json())
    for change, message in [(lambda b: b["frames"][0].update(position=-1), "bad loop frame"),
                            (lambda b: b.update(kind="other"), "unknown kind"),
                            (lambda b: b.update(tree={"x": 1}), "bad tree reference"),
                            (lambda b: b.update(surprise=1), "malformed record"),
                            (lambda b: b.update(version=99), "another version"),
                            (lambda b: b.update(format="x"), "not a safepoint record")]:
        changed = json.loads(record.to_json())
        change(changed)
        with pytest.raises(CorruptCheckpoint, match=message):
            Record.from_json(json.dumps(changed).encode(), "here")
    assert body["format"] == "safepoint-record"


OUTER_AT_2 = [Frame(0, 2), Frame(1, 3)]  # outer item 2 in progress, in its second inner loop


@pytest.mark.parametrize(("scope", "frames", "expected"), [
    ("", [], True),  # the top level is always replayed
    ("0:5", [], True),  # before the first loop: every item is ahead
    ("0:2", [Frame(0, 3)], False),  # items before the position are done
    ("0:3", [Frame(0, 3)], True),  # the next item
    ("0:7", [Frame(0, 3)], True),  # an item past it: an earlier attempt may have run it
    ("0:1", [Frame(0, 3, finished=True)], False),  # a finished loop
    ("1:0", [Frame(0, 3, finished=True)], True),  # the loop after it
    ("0:2", OUTER_AT_2, True),  # the outer item in progress
    ("0:1/0:9", OUTER_AT_2, False),  # inside an outer item that is done
    ("0:2/0:0", OUTER_AT_2, False),  # the first inner loop of the item in progress ended
    ("0:2/1:2", OUTER_AT_2, False),
    ("0:2/1:3", OUTER_AT_2, True),
    ("0:2/2:0", OUTER_AT_2, True),  # a later inner loop
    ("0:3/0:0", OUTER_AT_2, True),  # the next outer item
    ("0:2/1:3/0:4", OUTER_AT_2, True),  # deeper than the frames: in an item not done
])
def test_a_step_is_reachable_unless_a_resume_is_past_it(scope: str, frames: list[Frame],
                                                         expected: bool) -> None:
    assert reachable(scope, frames) is expected


def test_a_damaged_newest_record_falls_back_to_the_one_before(store: Path) -> None:
    with pytest.raises(Boom), runs.resume("job", location=store, policy=every(items=5)) as run:
        run.state["n"] = 0
        for _ in run.range(12):
            run.state["n"] += 1
        raise Boom
    path = store / "job" / JOURNAL
    data = bytearray(path.read_bytes())
    end = len(data.rstrip(b"\0"))
    data[end - 2] ^= 0xFF  # the newest record (the loop's end) is damaged
    path.write_bytes(bytes(data))
    with runs.resume("job", location=store) as run:
        assert run.position == 10 and run.state == {"n": 10}


def test_a_record_that_is_not_a_runs_is_refused(store: Path) -> None:
    journal = Journal(open_store(store), f"job/{JOURNAL}")  # type: ignore[arg-type]
    journal.open()
    journal.append(b'{"format": "something else"}')
    journal.close()
    with pytest.raises(CorruptCheckpoint, match="not a safepoint record"), runs.resume("job", location=store):
        pass
