"""Checkpointable iterators for ML input pipelines.

:class:`BatchIterator` walks an indexable dataset in batches, shuffled per epoch from a
seed and sharded across ranks, and resumes from its state to exactly the batches an
uninterrupted run would have produced, or on another number of ranks to the rest of the
epoch with no sample skipped or repeated. Its state is a few integers, the same on every
rank: the order of an epoch is recomputed from ``(seed, epoch)``, never stored.

:class:`Resumable` wraps any deterministic iterator the caller builds and resumes it by
re-creating it and skipping the items already consumed.

Both are plain Python iterators with ``state_dict()``/``load_state_dict()`` (and
``get_state()``/``set_state()``), so they work with any framework and take part in a
checkpoint as live objects: ``save(step, {"model": model, "data": batches})``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from safepoint.errors import StateMismatch

__all__ = ["BatchIterator", "Resumable"]

T = TypeVar("T")

# The fields of a BatchIterator state that say *what* is iterated; a state is refused by an
# iterator whose own values differ. The rank and world size are not among them: the state is
# the same on every rank, and a state saved on another world size resumes elastically.
_IDENTITY = ("dataset_len", "batch_size", "seed", "shuffle", "drop_last")
# Where the iterator is, in states of every version (old ones also hold a rank, ignored).
_WHERE = ("epoch", "position", "world_size")
_REQUIRED = ("epoch", "position", *_IDENTITY, "world_size")
# Written since elastic resume; for an old state they are derived from its position.
_CURSOR = ("cursor", "split_start", "epoch_size")


class Indexable(Protocol):
    """A dataset: a length and items by integer index (a list, a numpy array, a torch Dataset)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Any: ...


class BatchIterator:
    """Batches of an indexable dataset, shuffled per epoch, sharded, resumable exactly.

    Each epoch has an order of the dataset's indices: ``range(len(dataset))``, or with
    ``shuffle`` a permutation drawn from ``numpy.random.default_rng([seed, epoch])``, so the
    order of epoch ``e`` depends on nothing but ``seed`` and ``e``. An epoch's samples are a
    prefix ``order[:epoch_size]``: with ``world_size`` ranks the order is cut to a multiple of
    ``world_size`` (its last ``len(dataset) % world_size`` indices are dropped; with
    ``shuffle`` these are different items each epoch), and with ``drop_last`` further to
    whole batches on every rank. Rank ``r`` takes every ``world_size``-th index starting at
    ``r`` and cuts its share into batches of ``batch_size`` (a shorter last batch unless
    ``drop_last``). So after every rank has yielded ``k`` batches, the ranks together have
    consumed exactly ``order[:cursor]`` with ``cursor = k * batch_size * world_size``.

    The state (:meth:`state_dict`) holds that global cursor and is the same on every rank,
    so any rank may restore the state saved by rank 0. On the same world size the resumed
    iterator yields exactly the batches of an uninterrupted one. On another world size the
    rest of the epoch, ``order[cursor:epoch_size]``, is split the same way among the new
    ranks (rank ``r`` takes every ``world_size``-th index from ``cursor + r``): across the
    ranks no sample of the epoch is skipped or repeated, and ranks' shares differ by at most
    one sample. Every rank still yields the same number of batches; all but the last are
    full, and the ranks' last batches of that epoch may differ in size by one sample (some
    are empty when the last step has fewer samples left than there are ranks). ``drop_last``
    decides an epoch's samples when the epoch starts; a resumed remainder is yielded whole,
    so its last batches may be short even with ``drop_last``. A state saved at the start of
    an epoch (cursor 0) starts that epoch afresh on the new world size, and every following
    epoch starts normally.

    A batch is a list of items, or for a numpy array dataset an array taken with one fancy
    index; ``collate`` (if given) is applied to it. Iteration stops after ``epochs`` epochs,
    or never with ``epochs=None``.

    ``len()`` is the number of batches this rank yields in the current epoch (the same on
    every rank); after an elastic resume, the number of batches of the resumed remainder.
    """

    def __init__(
        self,
        dataset: Indexable | np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        epochs: int | None = 1,
        rank: int = 0,
        world_size: int = 1,
        collate: Callable[[Any], Any] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        if epochs is not None and epochs < 0:
            raise ValueError(f"epochs must be non-negative or None (forever), got {epochs}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epochs = epochs
        self.rank = rank
        self.world_size = world_size
        self.collate = collate
        self._dataset_len = len(dataset)
        if epochs is None and self._epoch_size(world_size) == 0:
            raise ValueError(
                f"a dataset of {self._dataset_len} items yields no batch per epoch on each of "
                f"{world_size} ranks with batch_size={batch_size} and drop_last={drop_last}, "
                "so epochs=None would never yield; use a smaller batch_size or drop_last=False"
            )
        self._epoch = 0
        self._position = 0  # batches already yielded by each rank since the split began
        # This epoch's samples are order[:_end]; since order[_start] they are split among
        # world_size ranks (_start is 0 unless this epoch was resumed on another world size).
        self._start = 0
        self._end = self._epoch_size(world_size)
        # ((epoch, start, end), this rank's indices of that split), made on first use
        self._order: tuple[tuple[int, int, int], np.ndarray] | None = None

    def _epoch_size(self, world_size: int) -> int:
        """How many samples of its order an epoch started on ``world_size`` ranks has."""
        per_rank = self._dataset_len // world_size
        if self.drop_last:
            per_rank -= per_rank % self.batch_size
        return per_rank * world_size

    def _batches(self, start: int, end: int, world_size: int) -> int:
        """Batches per rank of ``order[start:end]`` split among ``world_size`` ranks."""
        return -(-(end - start) // (self.batch_size * world_size))

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (counting from 0)."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many batches of the current epoch have been yielded (of ``len()``)."""
        return self._position

    @property
    def cursor(self) -> int:
        """How many samples of the current epoch's order all ranks together have consumed."""
        return self._start + self._position * self.batch_size * self.world_size

    def __len__(self) -> int:
        return self._batches(self._start, self._end, self.world_size)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Any:
        batches = len(self)
        if batches == 0 or (self.epochs is not None and self._epoch >= self.epochs):
            raise StopIteration
        first = self._position * self.batch_size
        indices = self._indices()[first : first + self.batch_size]
        if isinstance(self.dataset, np.ndarray):
            batch: Any = self.dataset[indices]
        else:
            batch = [self.dataset[i] for i in indices.tolist()]
        self._position += 1
        if self._position == batches:
            self._epoch += 1
            self._position = self._start = 0
            self._end = self._epoch_size(self.world_size)
        return batch if self.collate is None else self.collate(batch)

    def _indices(self) -> np.ndarray:
        """This rank's share of the current epoch's split, in order (cached)."""
        key = (self._epoch, self._start, self._end)
        if self._order is None or self._order[0] != key:
            if self.shuffle:
                order = np.random.default_rng([self.seed, self._epoch]).permutation(
                    self._dataset_len
                )
            else:
                order = np.arange(self._dataset_len)
            self._order = (key, order[self._start + self.rank : self._end : self.world_size])
        return self._order[1]

    def state_dict(self) -> dict[str, Any]:
        """Where the iterator is and what it iterates; the same on every rank."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "cursor": self.cursor,
            "split_start": self._start,
            "epoch_size": self._end,
            "world_size": self.world_size,
            "dataset_len": self._dataset_len,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def _resume_point(self, state: dict[str, Any]) -> tuple[int, int, int, int]:
        """``(epoch, position, split_start, epoch_size)`` on this iterator's world size."""
        missing = [key for key in _REQUIRED if key not in state]
        if not missing and any(key in state for key in _CURSOR):  # a state with a cursor
            missing = [key for key in _CURSOR if key not in state]
        if missing:
            raise StateMismatch(
                f"not a BatchIterator state: missing {', '.join(missing)}; pass the dict that "
                "BatchIterator.state_dict() returned"
            )
        differing = [
            f"{key} saved {state[key]!r}, here {value!r}"
            for key, value in self.state_dict().items()
            if key in _IDENTITY and state[key] != value
        ]
        if differing:
            raise StateMismatch(
                "the saved BatchIterator state belongs to a different iterator ("
                + "; ".join(differing)
                + "); create the iterator with the saved values to resume it, or do not "
                "restore its state to start it afresh"
            )
        epoch, position, world = (int(state[key]) for key in _WHERE)
        if world < 1:
            raise StateMismatch(f"the saved BatchIterator world_size {world} is not positive")
        if "cursor" in state:
            cursor, start, end = (int(state[key]) for key in _CURSOR)
        else:  # an old state: its epoch is split from the start on its world size
            start, end = 0, self._epoch_size(world)
            cursor = position * self.batch_size * world
        batches = self._batches(start, end, world)
        if epoch < 0 or not 0 <= position < max(batches, 1):
            raise StateMismatch(
                f"the saved BatchIterator position (epoch {epoch}, batch {position}) is outside "
                f"an epoch of {batches} batches; the state is corrupt"
            )
        if not (
            0 <= start <= end <= self._dataset_len
            and (start < end or end == 0)
            and (start > 0 or end == self._epoch_size(world))
            and cursor == start + position * self.batch_size * world
        ):
            raise StateMismatch(
                f"the saved BatchIterator cursor {cursor} (split at {start} among {world} "
                f"ranks, batch {position}) does not fit an epoch of {end} of "
                f"{self._dataset_len} samples; the state is corrupt"
            )
        if world == self.world_size:
            return epoch, position, start, end
        if cursor == 0:  # nothing of the epoch consumed: start it afresh on this world size
            return epoch, 0, 0, self._epoch_size(self.world_size)
        return epoch, 0, cursor, end  # the rest of the epoch, split among this world's ranks

    def validate_state(self, state: dict[str, Any]) -> None:
        """Raise :class:`StateMismatch` if ``state`` was made by a different iterator."""
        self._resume_point(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where the state says, elastically on another world size.

        A state of a different iterator raises :class:`StateMismatch` and changes nothing.
        """
        self._epoch, self._position, self._start, self._end = self._resume_point(state)

    get_state = state_dict
    set_state = load_state_dict


class Resumable(Generic[T]):
    """Any deterministic iterator made resumable by counting and skipping.

    ``make_iter()`` must return an iterator that yields the same items in the same order
    every time it is called (a file read in order, a seeded generator). The state is the
    number of items consumed; :meth:`load_state_dict` calls ``make_iter()`` again and skips
    that many items at once, so resuming costs as much as producing them again. When the
    source can seek (a file offset, a dataset index), implement ``state_dict()`` and
    ``load_state_dict()`` on your own iterator instead: then resuming costs nothing.
    """

    def __init__(self, make_iter: Callable[[], Iterable[T]]) -> None:
        self._make_iter = make_iter
        self._iterator: Iterator[T] | None = None  # made on first use
        self._consumed = 0

    @property
    def consumed(self) -> int:
        """How many items have been yielded since the start (across resumes)."""
        return self._consumed

    def __iter__(self) -> Resumable[T]:
        return self

    def __next__(self) -> T:
        if self._iterator is None:
            self._iterator = iter(self._make_iter())
        item = next(self._iterator)
        self._consumed += 1
        return item

    def state_dict(self) -> dict[str, int]:
        """The number of items consumed."""
        return {"consumed": self._consumed}

    def validate_state(self, state: dict[str, Any]) -> None:
        """Raise :class:`StateMismatch` if ``state`` was not made by :meth:`state_dict`."""
        consumed = state.get("consumed") if isinstance(state, Mapping) else None
        if not isinstance(consumed, (int, np.integer)) or consumed < 0:
            raise StateMismatch(
                f"not a Resumable state: {state!r}; pass the dict that Resumable.state_dict() "
                "returned"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Re-create the iterator and skip the consumed items; on failure nothing changes."""
        self.validate_state(state)
        consumed = int(state["consumed"])
        iterator = iter(self._make_iter())
        skipped = sum(1 for _ in islice(iterator, consumed))
        if skipped < consumed:
            raise StateMismatch(
                f"cannot resume: the saved state consumed {consumed} items but the source now "
                f"has only {skipped}; make_iter() must yield the same items on every call"
            )
        self._iterator = iterator
        self._consumed = consumed

    get_state = state_dict
    set_state = load_state_dict
