"""Checkpointable data iterators: a resumed iterator yields exactly the remaining batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import safepoint
from safepoint.data import BatchIterator, Resumable
from safepoint.errors import StateMismatch
from safepoint.stateful import Stateful, capture, restore_into


def _plain(batches: list[Any]) -> list[Any]:
    """Batches as JSON-comparable lists (numpy batches become lists)."""
    return [b.tolist() if isinstance(b, np.ndarray) else list(b) for b in batches]


def _resumed_run(options: dict[str, Any], k: int, *, through_json: bool = True) -> list[Any]:
    """The first k batches of one iterator, then the rest from a fresh one restored after k."""
    first = BatchIterator(**options)
    head = list(islice(first, k))
    state = first.state_dict()
    if through_json:
        state = json.loads(json.dumps(state))
    second = BatchIterator(**options)
    second.load_state_dict(state)
    return _plain(head) + _plain(list(second))


# A dataset of 23 items: with shuffle, rank 1 of 3 sees 7 items per epoch (2 are dropped).
CASES = [
    {"dataset": list(range(23)), "batch_size": 4},
    {"dataset": list(range(23)), "batch_size": 4, "drop_last": True},
    {"dataset": list(range(23)), "batch_size": 4, "shuffle": True, "seed": 5},
    {"dataset": list(range(23)), "batch_size": 4, "shuffle": True, "drop_last": True},
    {"dataset": np.arange(46).reshape(23, 2), "batch_size": 3, "shuffle": True, "seed": 9},
    {"dataset": list(range(23)), "batch_size": 2, "shuffle": True, "rank": 1, "world_size": 3},
    {"dataset": list(range(23)), "batch_size": 3, "drop_last": True, "rank": 1, "world_size": 3},
]


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
def test_resume_equals_uninterrupted_run(case: dict[str, Any]) -> None:
    options = {**case, "epochs": 3}
    expected = _plain(list(BatchIterator(**options)))
    per_epoch = len(BatchIterator(**options))
    total = len(expected)
    assert total == 3 * per_epoch
    ks = {0, 1, per_epoch // 2, per_epoch, per_epoch + 1, 2 * per_epoch, total - 1, total}
    for k in sorted(ks):
        assert _resumed_run(options, k) == expected, f"resumed after {k} batches"


def test_resume_in_a_new_process(tmp_path: Path) -> None:
    options = {"batch_size": 2, "shuffle": True, "seed": 3, "rank": 1, "world_size": 3}
    options["epochs"] = 2
    expected = _plain(list(BatchIterator(list(range(23)), **options)))
    iterator = BatchIterator(list(range(23)), **options)
    k = len(iterator) + 1  # one batch into the second epoch
    head = _plain(list(islice(iterator, k)))
    state_file, out_file = tmp_path / "state.json", tmp_path / "rest.json"
    state_file.write_text(json.dumps(iterator.state_dict()))
    script = textwrap.dedent(
        """
        import json, sys
        from safepoint.data import BatchIterator
        iterator = BatchIterator(list(range(23)), **json.loads(sys.argv[1]))
        with open(sys.argv[2]) as f:
            iterator.load_state_dict(json.load(f))
        with open(sys.argv[3], "w") as f:
            json.dump([list(batch) for batch in iterator], f)
        """
    )
    src = str(Path(next(iter(safepoint.__path__))).parent)
    subprocess.run(
        [sys.executable, "-c", script, json.dumps(options), str(state_file), str(out_file)],
        check=True,
        env={**os.environ, "PYTHONPATH": src},
        timeout=120,
    )
    assert head + json.loads(out_file.read_text()) == expected


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(0, 40),
    batch_size=st.integers(1, 7),
    world_size=st.integers(1, 3),
    rank_choice=st.integers(0, 2),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**32),
    epochs=st.integers(0, 3),
    data=st.data(),
)
def test_resume_equality_property(
    n: int,
    batch_size: int,
    world_size: int,
    rank_choice: int,
    shuffle: bool,
    drop_last: bool,
    seed: int,
    epochs: int,
    data: st.DataObject,
) -> None:
    options = {
        "dataset": list(range(n)),
        "batch_size": batch_size,
        "world_size": world_size,
        "rank": rank_choice % world_size,
        "shuffle": shuffle,
        "drop_last": drop_last,
        "seed": seed,
        "epochs": epochs,
    }
    expected = _plain(list(BatchIterator(**options)))
    k = data.draw(st.integers(0, len(expected)), label="k")
    assert _resumed_run(options, k) == expected


def test_resume_forever() -> None:
    options = {"dataset": list(range(10)), "batch_size": 3, "shuffle": True, "epochs": None}
    expected = _plain(list(islice(BatchIterator(**options), 40)))
    for k in (0, 4, 13, 39):
        first = BatchIterator(**options)
        head = _plain(list(islice(first, k)))
        second = BatchIterator(**options)
        second.load_state_dict(first.state_dict())
        assert head + _plain(list(islice(second, 40 - k))) == expected


def test_batches_cover_the_dataset_in_order_without_shuffle() -> None:
    iterator = BatchIterator(list(range(10)), 4)
    assert len(iterator) == 3
    assert list(iterator) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(BatchIterator(list(range(10)), 4, drop_last=True)) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_each_epoch_is_the_seeded_permutation() -> None:
    n, seed = 17, 4
    batches = list(BatchIterator(list(range(n)), n, shuffle=True, seed=seed, epochs=3))
    for epoch, batch in enumerate(batches):
        assert batch == np.random.default_rng([seed, epoch]).permutation(n).tolist()
    assert batches[0] != batches[1]


def test_ranks_get_disjoint_equal_shares() -> None:
    n, world = 23, 3
    shares = [
        list(
            chain.from_iterable(BatchIterator(range(n), 2, shuffle=True, rank=r, world_size=world))
        )
        for r in range(world)
    ]
    assert [len(s) for s in shares] == [n // world] * world
    order = np.random.default_rng([0, 0]).permutation(n)[: n // world * world]
    assert sorted(chain.from_iterable(shares)) == sorted(
        order.tolist()
    )  # the tail of the order is dropped


def test_numpy_datasets_give_arrays_and_collate_applies() -> None:
    data = np.arange(12).reshape(6, 2)
    batch = next(BatchIterator(data, 4))
    assert isinstance(batch, np.ndarray) and batch.shape == (4, 2)
    summed = BatchIterator(list(range(6)), 4, collate=sum)
    assert list(summed) == [6, 9]


def test_epoch_and_position_track_the_next_batch() -> None:
    iterator = BatchIterator(list(range(5)), 2, epochs=2)
    assert (iterator.epoch, iterator.position) == (0, 0)
    next(iterator)
    assert (iterator.epoch, iterator.position) == (0, 1)
    next(iterator), next(iterator)
    assert (iterator.epoch, iterator.position) == (1, 0)


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator([1], 0)
    with pytest.raises(ValueError, match="rank"):
        BatchIterator([1], 1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="never yield"):
        BatchIterator([1, 2], 3, drop_last=True, epochs=None)
    assert list(BatchIterator([], 3)) == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"dataset": list(range(21))}, "dataset_len saved 20, here 21"),
        ({"batch_size": 5}, "batch_size saved 4, here 5"),
        ({"seed": 1}, "seed saved 0, here 1"),
        ({"shuffle": False}, "shuffle saved True, here False"),
        ({"drop_last": True}, "drop_last saved False, here True"),
    ],
)
def test_identity_mismatch_is_refused_and_leaves_the_iterator_untouched(
    change: dict[str, Any], field: str
) -> None:
    options = {"dataset": list(range(20)), "batch_size": 4, "shuffle": True}
    options |= {"rank": 1, "world_size": 2}
    saved = BatchIterator(**options)
    next(saved)
    other = BatchIterator(**(options | change))
    next(other), next(other)
    before = other.state_dict()
    with pytest.raises(StateMismatch, match=field):
        other.load_state_dict(saved.state_dict())
    assert other.state_dict() == before
    with pytest.raises(StateMismatch, match=r"state\['data'\].*" + field):
        restore_into({"data": other}, {"data": saved.state_dict()})
    assert other.state_dict() == before


def test_rank_and_world_size_are_not_identity() -> None:
    # The state is replicated: another rank, or another world size, takes it (see
    # tests/test_data_elastic.py for what an elastic resume yields).
    options: dict[str, Any] = {"dataset": list(range(20)), "batch_size": 4, "shuffle": True}
    saved = BatchIterator(**options, rank=1, world_size=2)
    next(saved)
    assert saved.state_dict() == BatchIterator(**options, rank=0, world_size=2).state_dict() | {
        "position": 1,
        "cursor": 8,
    }
    other_rank = BatchIterator(**options, rank=0, world_size=2)
    other_rank.load_state_dict(saved.state_dict())
    assert (other_rank.epoch, other_rank.position, other_rank.cursor) == (0, 1, 8)
    other_world = BatchIterator(**options, rank=1, world_size=3)
    other_world.load_state_dict(saved.state_dict())
    assert (other_world.epoch, other_world.position, other_world.cursor) == (0, 0, 8)


def test_refuses_states_that_are_not_its_own() -> None:
    iterator = BatchIterator(list(range(8)), 2)
    with pytest.raises(StateMismatch, match="missing epoch, position"):
        iterator.load_state_dict({"batch_size": 2})
    bad = iterator.state_dict() | {"position": 4}
    with pytest.raises(StateMismatch, match="outside an epoch of 4 batches"):
        iterator.load_state_dict(bad)


def test_iterator_is_stateful_in_a_tree() -> None:
    iterator = BatchIterator(list(range(8)), 2, shuffle=True)
    assert isinstance(iterator, Stateful)
    next(iterator)
    saved = capture({"data": iterator})
    assert saved == {"data": iterator.get_state()}
    expected = list(iterator)
    fresh = BatchIterator(list(range(8)), 2, shuffle=True)
    assert restore_into({"data": fresh}, saved)["data"] is fresh
    assert list(fresh) == expected


def test_resumable_skips_what_was_consumed() -> None:
    calls = []

    def make() -> Any:
        calls.append(1)
        return iter(range(10))

    wrapped = Resumable(make)
    assert calls == []  # the source is made on first use
    assert list(islice(wrapped, 4)) == [0, 1, 2, 3]
    assert wrapped.consumed == 4
    fresh = Resumable(make)
    restore_into({"it": fresh}, capture({"it": wrapped}))
    assert fresh.consumed == 4
    assert list(fresh) == [4, 5, 6, 7, 8, 9]
    assert fresh.get_state() == {"consumed": 10}


def test_resumable_refuses_a_source_that_is_too_short() -> None:
    short = Resumable(lambda: range(3))
    next(short)
    with pytest.raises(StateMismatch, match="consumed 5 items but the source now has only 3"):
        short.load_state_dict({"consumed": 5})
    assert short.consumed == 1 and next(short) == 1
    with pytest.raises(StateMismatch, match="not a Resumable state"):
        short.set_state({"consumed": -1})
