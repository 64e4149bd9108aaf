"""Assertions on restored states that several test folders share (the crash tests and the
multi-rank ones): same types, same structure, same bytes; and a count of the bytes a store
writes."""

from __future__ import annotations

from typing import Any

import numpy as np

from safepoint import Shard
from safepoint.store import Store


def assert_identical(actual: Any, expected: Any, path: str = "state") -> None:
    """Same types, same structure, same values bit for bit."""
    if isinstance(expected, Shard):
        assert isinstance(actual, Shard), f"{path}: {type(actual)} is not a Shard"
        assert (actual.offsets, actual.global_shape) == (expected.offsets, expected.global_shape), path
        assert_identical(np.asarray(actual.data), np.asarray(expected.data), f"{path}.data")
        return
    assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{path}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_identical(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_identical(a, e, f"{path}[{i}]")
    elif isinstance(expected, np.ndarray):
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), path
        assert actual.tobytes() == expected.tobytes(), f"{path}: contents differ"
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


class Counting:
    """Counts the bytes a store is asked to write as data files."""

    def __init__(self, store: Store) -> None:
        self.written = 0
        self.calls = 0
        original = store.write_blob

        def write_blob(key: str, chunks: Any, *, durable: bool) -> None:
            parts = list(chunks)
            self.written += sum(memoryview(p).nbytes for p in parts)
            self.calls += 1
            original(key, parts, durable=durable)

        store.write_blob = write_blob  # type: ignore[method-assign]

    def take(self) -> int:
        written, self.written = self.written, 0
        return written
