"""Elastic resume of BatchIterator: a state saved on W ranks resumes on W' ranks.

Ranks are W iterator objects in one process, stepped in lockstep (one batch each per step),
as a data-parallel job does. The dataset is ``range(n)``, so a batch's items are the
dataset indices it covers and the multiset of samples seen is checked directly.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safepoint.data import BatchIterator
from safepoint.errors import StateMismatch
from safepoint.stateful import restore_into

Batches = list[list[int]]  # one batch per rank


def _ranks(world: int, state: dict[str, Any] | None = None, **options: Any) -> list[BatchIterator]:
    """``world`` iterators, one per rank, each restored from ``state`` (rank 0's) if given."""
    ranks = [BatchIterator(rank=r, world_size=world, **options) for r in range(world)]
    if state is not None:
        state = json.loads(json.dumps(state))  # as a checkpoint brings it back
        for iterator in ranks:
            iterator.load_state_dict(state)
    return ranks


def _step(ranks: list[BatchIterator]) -> Batches:
    """One lockstep step: a batch from every rank; the ranks' states stay identical."""
    batches = [[int(i) for i in next(iterator)] for iterator in ranks]
    states = [iterator.state_dict() for iterator in ranks]
    assert all(state == states[0] for state in states), states
    assert len({len(iterator) for iterator in ranks}) == 1
    return batches


def _steps(ranks: list[BatchIterator], k: int) -> list[Batches]:
    return [_step(ranks) for _ in range(k)]


def _rest_of_epoch(ranks: list[BatchIterator]) -> list[Batches]:
    """Step until the epoch ends; the ranks yield ``len()`` batches in all, and end together."""
    epoch, left = ranks[0].epoch, len(ranks[0]) - ranks[0].position
    steps: list[Batches] = []
    if len(ranks[0]) == 0:  # an epoch without a batch: the iterator stops
        assert all(next(iterator, None) is None for iterator in ranks)
        return steps
    while ranks[0].epoch == epoch:
        steps.append(_step(ranks))
    assert len(steps) == left
    return steps


def _samples(steps: list[Batches]) -> list[int]:
    return [i for batches in steps for batch in batches for i in batch]


def _epoch_samples(world: int, **options: Any) -> list[int]:
    """The samples of an uninterrupted first epoch on ``world`` ranks."""
    return _samples(_rest_of_epoch(_ranks(world, **options)))


def _order(n: int, shuffle: bool, seed: int, epoch: int = 0) -> list[int]:
    if shuffle:
        return np.random.default_rng([seed, epoch]).permutation(n).tolist()
    return list(range(n))


def _assert_same_epoch(seen: list[int], expected: list[int]) -> None:
    assert len(set(seen)) == len(seen), "a sample was seen twice"
    assert Counter(seen) == Counter(expected), "samples missing or foreign"


def _options(
    n: int, batch_size: int, shuffle: bool, drop_last: bool, **more: Any
) -> dict[str, Any]:
    return {"dataset": list(range(n)), "batch_size": batch_size, "shuffle": shuffle,
            "seed": 7, "drop_last": drop_last, "epochs": 2, **more}  # fmt: skip


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize(("n", "batch_size"), [(23, 2), (23, 4), (37, 3), (5, 2)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_lockstep_ranks_consume_a_prefix_of_the_order(
    world: int, n: int, batch_size: int, drop_last: bool
) -> None:
    options = _options(n, batch_size, True, drop_last)
    ranks, order = _ranks(world, **options), _order(n, True, 7)
    per_rank = n // world - (n // world % batch_size if drop_last else 0)
    seen: list[int] = []
    for k in range(1, len(ranks[0]) + 1):
        seen += _samples([_step(ranks)])
        assert sorted(seen) == sorted(order[: min(k * batch_size, per_rank) * world])
        if ranks[0].epoch == 0:
            assert ranks[0].cursor == ranks[0].state_dict()["cursor"] == k * batch_size * world
    assert (ranks[0].epoch, ranks[0].cursor) == (1 if per_rank else 0, 0)


PAIRS = [(4, 2), (2, 4), (3, 2), (4, 3), (1, 3), (3, 1), (2, 5), (5, 4)]


@pytest.mark.parametrize(("world", "new_world"), PAIRS)
@pytest.mark.parametrize(("n", "batch_size"), [(23, 2), (37, 3), (22, 4)])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_elastic_resume_sees_every_sample_of_the_epoch_once(
    world: int, new_world: int, n: int, batch_size: int, shuffle: bool, drop_last: bool
) -> None:
    options = _options(n, batch_size, shuffle, drop_last)
    expected = _epoch_samples(world, **options)
    batches = len(BatchIterator(world_size=world, **options))
    for k in range(batches):
        old = _ranks(world, **options)
        head = _steps(old, k)
        new = _ranks(new_world, old[0].state_dict(), **options)
        lengths = {len(iterator) for iterator in new}
        assert len(lengths) == 1 and all(iterator.position == 0 for iterator in new)
        rest = _rest_of_epoch(new)
        if k == 0:  # nothing consumed yet: the epoch starts afresh on the new world size
            _assert_same_epoch(_samples(rest), _epoch_samples(new_world, **options))
        else:
            _assert_same_epoch(_samples(head + rest), expected)
        # All batches but the last are full; the ranks' shares differ by at most one sample.
        assert all(len(b) == batch_size for batches_ in rest[:-1] for b in batches_)
        shares = [sum(len(step[r]) for step in rest) for r in range(new_world)]
        assert max(shares) - min(shares) <= 1
        # The next epoch starts normally on the new world size.
        fresh = _ranks(new_world, **options)
        _rest_of_epoch(fresh)
        assert _rest_of_epoch(new) == _rest_of_epoch(fresh)
        assert all(next(iterator, None) is None for iterator in new)  # epochs=2


CHAINS = [(4, 2, 3), (2, 3, 4), (3, 1, 2), (5, 2, 4), (2, 4, 2), (3, 3, 2), (1, 4, 1)]


@pytest.mark.parametrize("worlds", CHAINS)
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_chained_elastic_resumes_skip_nothing_and_repeat_nothing(
    worlds: tuple[int, int, int], shuffle: bool, drop_last: bool
) -> None:
    options = _options(29, 2, shuffle, drop_last)
    first, second, third = worlds
    expected = _epoch_samples(first, **options)
    for k1 in range(1, len(BatchIterator(world_size=first, **options))):
        ranks = _ranks(first, **options)
        head = _steps(ranks, k1)
        ranks = _ranks(second, ranks[0].state_dict(), **options)
        for k2 in range(len(ranks[0]) - ranks[0].position):
            middle_ranks = _ranks(second, ranks[0].state_dict(), **options)
            middle = _steps(middle_ranks, k2)
            last = _ranks(third, middle_ranks[0].state_dict(), **options)
            _assert_same_epoch(_samples(head + middle + _rest_of_epoch(last)), expected)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_same_world_size_resumes_the_exact_batch_sequence_from_rank_0s_state(
    world: int, shuffle: bool, drop_last: bool
) -> None:
    options = _options(23, 2, shuffle, drop_last)
    expected = _steps(_ranks(world, **options), 2 * len(BatchIterator(world_size=world, **options)))
    for k in range(len(expected) + 1):
        ranks = _ranks(world, **options)
        head = _steps(ranks, k)
        resumed = _ranks(world, ranks[0].state_dict(), **options)
        assert [(it.epoch, it.position, it.cursor, len(it)) for it in resumed] == [
            (it.epoch, it.position, it.cursor, len(it)) for it in ranks
        ]
        assert head + _steps(resumed, len(expected) - k) == expected


def test_same_world_size_resume_inside_an_elastic_epoch_is_exact() -> None:
    options = _options(37, 3, True, False)
    old = _ranks(4, **options)
    _steps(old, 1)
    elastic = _ranks(2, old[0].state_dict(), **options)
    expected = _steps(elastic, len(elastic[0]) + len(BatchIterator(world_size=2, **options)))
    for k in range(len(expected)):
        elastic = _ranks(2, old[0].state_dict(), **options)
        head = _steps(elastic, k)
        resumed = _ranks(2, elastic[0].state_dict(), **options)
        assert [(it.epoch, it.position, len(it)) for it in resumed] == [
            (it.epoch, it.position, len(it)) for it in elastic
        ]
        assert head + _steps(resumed, len(expected) - k) == expected


def test_len_counts_the_batches_of_the_resumed_remainder() -> None:
    # 22 items on 2 ranks in batches of 4: each rank's share of 11 is 4 + 4 + 3.
    options = _options(22, 4, False, False)
    old = _ranks(2, **options)
    _steps(old, 2)  # order[:16] consumed
    assert old[0].state_dict() == {
        "epoch": 0, "position": 2, "cursor": 16, "split_start": 0, "epoch_size": 22,
        "world_size": 2, "dataset_len": 22, "batch_size": 4, "seed": 7, "shuffle": False,
        "drop_last": False,
    }  # fmt: skip
    three = _ranks(3, old[0].state_dict(), **options)
    assert [len(it) for it in three] == [1, 1, 1]
    assert _rest_of_epoch(three) == [[[16, 19], [17, 20], [18, 21]]]
    assert [len(it) for it in three] == [len(BatchIterator(world_size=3, **options))] * 3
    # Fewer samples left than ranks: every rank yields one batch, the last ones empty.
    eight = _ranks(8, old[0].state_dict(), **options)
    assert [len(it) for it in eight] == [1] * 8
    assert _rest_of_epoch(eight) == [[[16], [17], [18], [19], [20], [21], [], []]]
    arrays = BatchIterator(np.arange(44).reshape(22, 2), 4, seed=7, rank=7, world_size=8)
    arrays.load_state_dict(old[0].state_dict())
    assert next(arrays).shape == (0, 2)


def test_drop_last_fixes_the_epoch_and_a_resumed_remainder_is_yielded_whole() -> None:
    # 23 items on 2 ranks, batches of 4, drop_last: each rank yields 2 batches (8 of its 11).
    options = _options(23, 4, False, True)
    old = _ranks(2, **options)
    _steps(old, 1)
    assert old[0].state_dict()["epoch_size"] == 16
    three = _ranks(3, old[0].state_dict(), **options)
    assert _rest_of_epoch(three) == [[[8, 11, 14], [9, 12, 15], [10, 13]]]


def test_old_states_load_on_the_same_world_size_and_resume_elastically() -> None:
    options = _options(23, 2, True, False, seed=5, epochs=3)
    # What the iterator wrote before elastic resume, on rank 1 of 3, one epoch and 2 batches in.
    old = {"epoch": 1, "position": 2, "dataset_len": 23, "batch_size": 2, "seed": 5,
           "shuffle": True, "drop_last": False, "rank": 1, "world_size": 3}  # fmt: skip
    ranks = _ranks(3, **options)
    head = _steps(ranks, len(ranks[0]) + 2)
    expected = _steps(ranks, 2 * len(ranks[0]) - 2)
    assert ranks[0].epoch == 3
    for rank in range(3):
        iterator = BatchIterator(rank=rank, world_size=3, **options)
        iterator.load_state_dict(old)
        assert (iterator.epoch, iterator.position, iterator.cursor) == (1, 2, 12)
        assert [[int(i) for i in b] for b in iterator] == [step[rank] for step in expected]
    two = _ranks(2, old, **options)
    _assert_same_epoch(
        _samples(head[len(head) - 2 :] + _rest_of_epoch(two)), _order(23, True, 5, 1)[:21]
    )
    with pytest.raises(StateMismatch, match="seed saved 5, here 6"):
        BatchIterator(world_size=3, **(options | {"seed": 6})).load_state_dict(old)
    with pytest.raises(StateMismatch, match="outside an epoch of 4 batches"):
        BatchIterator(world_size=3, **options).load_state_dict(old | {"position": 4})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cursor": 10}, "cursor 10 .* the state is corrupt"),
        ({"split_start": 10}, "cursor 8 .split at 10 .* the state is corrupt"),
        ({"epoch_size": 24}, "does not fit an epoch of 24 of 23 samples"),
        ({"epoch_size": 20}, "does not fit an epoch of 20"),
        ({"world_size": 0}, "world_size 0 is not positive"),
        ({"position": 6}, r"position \(epoch 0, batch 6\) is outside an epoch of 6 batches"),
        ({"batch_size": 3}, "batch_size saved 3, here 2"),
    ],
)
def test_inconsistent_states_are_refused_and_change_nothing(
    change: dict[str, Any], message: str
) -> None:
    options = _options(23, 2, True, False)
    saved = _ranks(2, **options)
    _steps(saved, 2)
    target = BatchIterator(rank=1, world_size=3, **options)
    next(target)
    before = target.state_dict()
    with pytest.raises(StateMismatch, match=message):
        target.load_state_dict(saved[0].state_dict() | change)
    with pytest.raises(StateMismatch, match=r"state\['data'\].*" + message):
        restore_into({"data": target}, {"data": saved[0].state_dict() | change})
    assert target.state_dict() == before


def test_a_state_with_part_of_the_cursor_is_refused() -> None:
    state = BatchIterator(list(range(8)), 2).state_dict()
    del state["epoch_size"]
    with pytest.raises(StateMismatch, match="missing epoch_size"):
        BatchIterator(list(range(8)), 2).load_state_dict(state)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    n=st.integers(0, 60),
    batch_size=st.integers(1, 6),
    worlds=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_elastic_resume_property(
    n: int,
    batch_size: int,
    worlds: list[int],
    shuffle: bool,
    drop_last: bool,
    seed: int,
    data: st.DataObject,
) -> None:
    """Any chain of resumes inside epoch 0 sees the epoch of the world that began it, once."""
    options = _options(n, batch_size, shuffle, drop_last, seed=seed, epochs=1)
    state: dict[str, Any] | None = None
    owner: int | None = None
    seen: list[Batches] = []
    for world in worlds:
        ranks = _ranks(world, state, **options)
        left = len(ranks[0]) - ranks[0].position
        k = data.draw(st.integers(0, max(left - 1, 0)), label=f"steps on {world} ranks")
        seen += _steps(ranks, k)
        if k and owner is None:
            owner = world  # the world size that began the epoch fixes its samples
        state = ranks[0].state_dict()
    seen += _rest_of_epoch(ranks)
    owner = worlds[-1] if owner is None else owner
    _assert_same_epoch(_samples(seen), _epoch_samples(owner, **options))
    assert all(next(iterator, None) is None for iterator in ranks)  # epochs=1
