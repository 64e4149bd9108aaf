"""Checkpointable iterators for ML input pipelines.

:class:`BatchIterator` walks an indexable dataset in batches, shuffled per epoch from a
seed and sharded across ranks, and resumes from its state to exactly the batches an
uninterrupted run would have produced. Its state is a few integers: the order of an epoch is
recomputed from ``(seed, epoch)``, never stored.

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
# iterator whose own values differ.
_IDENTITY = ("dataset_len", "batch_size", "seed", "shuffle", "drop_last", "rank", "world_size")


class Indexable(Protocol):
    """A dataset: a length and items by integer index (a list, a numpy array, a torch Dataset)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Any: ...


class BatchIterator:
    """Batches of an indexable dataset, shuffled per epoch, sharded, resumable exactly.

    Each epoch has an order of the dataset's indices: ``range(len(dataset))``, or with
    ``shuffle`` a permutation drawn from ``numpy.random.default_rng([seed, epoch])``, so the
    order of epoch ``e`` depends on nothing but ``seed`` and ``e``. With ``world_size`` ranks
    the order is cut to a multiple of ``world_size`` by dropping its last
    ``len(dataset) % world_size`` indices (with ``shuffle`` these are different items each
    epoch), and rank ``r`` takes every ``world_size``-th index starting at ``r``; the ranks'
    shares are disjoint and of equal size. Each rank's share is cut into batches of
    ``batch_size``; a shorter last batch is yielded unless ``drop_last``.

    A batch is a list of items, or for a numpy array dataset an array taken with one fancy
    index; ``collate`` (if given) is applied to it. Iteration stops after ``epochs`` epochs,
    or never with ``epochs=None``.

    ``len()`` is the number of batches per epoch on this rank.
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
        self._per_rank = self._dataset_len // world_size
        full, rest = divmod(self._per_rank, batch_size)
        self._batches_per_epoch = full if drop_last or rest == 0 else full + 1
        if epochs is None and self._batches_per_epoch == 0:
            raise ValueError(
                f"a dataset of {self._dataset_len} items yields no batch per epoch on each of "
                f"{world_size} ranks with batch_size={batch_size} and drop_last={drop_last}, "
                "so epochs=None would never yield; use a smaller batch_size or drop_last=False"
            )
        self._epoch = 0
        self._position = 0  # batches already yielded in this epoch
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, this rank's indices)

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (counting from 0)."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many batches of the current epoch have been yielded."""
        return self._position

    def __len__(self) -> int:
        return self._batches_per_epoch

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Any:
        if self._batches_per_epoch == 0 or (self.epochs is not None and self._epoch >= self.epochs):
            raise StopIteration
        start = self._position * self.batch_size
        indices = self._indices(self._epoch)[start : start + self.batch_size]
        if isinstance(self.dataset, np.ndarray):
            batch: Any = self.dataset[indices]
        else:
            batch = [self.dataset[i] for i in indices.tolist()]
        self._position += 1
        if self._position == self._batches_per_epoch:
            self._epoch += 1
            self._position = 0
        return batch if self.collate is None else self.collate(batch)

    def _indices(self, epoch: int) -> np.ndarray:
        """This rank's dataset indices for ``epoch``, in order (cached for one epoch)."""
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self._dataset_len)
            else:
                order = np.arange(self._dataset_len)
            usable = self._per_rank * self.world_size
            self._order = (epoch, order[:usable][self.rank :: self.world_size])
        return self._order[1]

    def state_dict(self) -> dict[str, Any]:
        """Where the iterator is (``epoch``, ``position``) and what it iterates."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "dataset_len": self._dataset_len,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def validate_state(self, state: dict[str, Any]) -> None:
        """Raise :class:`StateMismatch` if ``state`` was made by a different iterator."""
        missing = [key for key in ("epoch", "position", *_IDENTITY) if key not in state]
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
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < max(self._batches_per_epoch, 1):
            raise StateMismatch(
                f"the saved BatchIterator position (epoch {epoch}, batch {position}) is outside "
                f"an epoch of {self._batches_per_epoch} batches; the state is corrupt"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved position; a state of a different iterator changes nothing."""
        self.validate_state(state)
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])

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
