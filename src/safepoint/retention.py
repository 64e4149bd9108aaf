"""Which checkpoints to keep: small composable rules.

A rule is asked, after each commit, which of the committed steps it keeps; rules combine
with ``|`` (keep what either keeps) and ``&`` (keep what both keep)::

    keep_last(3) | keep_every(1000) | keep_best("loss", 2)

The newest committed step is always kept, whatever the rule says. A rule that ranks steps by
a metric asks for it through the ``metric`` callable it is given (the Checkpointer reads it
from the step's metadata and caches it); nothing outside a rule inspects its class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

Metric = Callable[[int, str], "float | None"]
"""``metric(step, key)``: ``metadata[key]`` of a step as a float, or None."""


class Retention:
    """Base of retention rules; subclasses implement :meth:`keep`."""

    def keep(self, steps: Sequence[int], metric: Metric) -> set[int]:
        """The steps (of ``steps``, ascending) this rule keeps."""
        raise NotImplementedError

    @property
    def keeps_everything(self) -> bool:
        """True when the rule never removes a step (so nothing need be listed)."""
        return False

    def __or__(self, other: Retention) -> Retention:
        return _Union(self, other)

    def __and__(self, other: Retention) -> Retention:
        return _Intersection(self, other)


class _Union(Retention):
    def __init__(self, *rules: Retention) -> None:
        self.rules = rules

    def keep(self, steps: Sequence[int], metric: Metric) -> set[int]:
        kept: set[int] = set()
        for rule in self.rules:
            kept |= rule.keep(steps, metric)
        return kept

    @property
    def keeps_everything(self) -> bool:
        return any(rule.keeps_everything for rule in self.rules)

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.rules))


class _Intersection(Retention):
    def __init__(self, *rules: Retention) -> None:
        self.rules = rules

    def keep(self, steps: Sequence[int], metric: Metric) -> set[int]:
        kept = set(steps)
        for rule in self.rules:
            kept &= rule.keep(steps, metric)
        return kept

    @property
    def keeps_everything(self) -> bool:
        return all(rule.keeps_everything for rule in self.rules)

    def __repr__(self) -> str:
        return "(" + " & ".join(map(repr, self.rules)) + ")"


class _All(Retention):
    def keep(self, steps: Sequence[int], metric: Metric) -> set[int]:
        return set(steps)

    @property
    def keeps_everything(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "keep_all()"


class _Last(Retention):
    def __init__(self, count: int) -> None:
        self.count = _positive(count, "keep_last")

    def keep(self, steps: Sequence[int], metric: Metric) -> set[int]:
        return set(steps[-self.count :])

    def __repr__(self) -> str:
        return f"keep_last({self.count})"


class _Every(Retention):
    def __init__(self, period: int) -> None:
        self.period = _positive(period, "keep_every")

    def keep(self, steps: Sequence[int], metric: Metric) -> set[int]:
        return {s for s in steps if s % self.period == 0}

    def __repr__(self) -> str:
        return f"keep_every({self.period})"


class _Best(Retention):
    def __init__(self, key: str, count: int, mode: Literal["min", "max"]) -> None:
        if not isinstance(key, str) or not key:
            raise ValueError("keep_best needs the metadata key to rank steps by, e.g. keep_best('loss', 2)")
        if mode not in ("min", "max"):
            raise ValueError(f"keep_best mode must be 'min' or 'max', not {mode!r}")
        self.key, self.count, self.mode = key, _positive(count, "keep_best"), mode

    def keep(self, steps: Sequence[int], metric: Metric) -> set[int]:
        scored = [(m, s) for s in steps if (m := metric(s, self.key)) is not None and m == m]
        scored.sort(reverse=self.mode == "max")
        return {s for _, s in scored[: self.count]}

    def __repr__(self) -> str:
        return f"keep_best({self.key!r}, {self.count}, mode={self.mode!r})"


def _positive(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} needs a positive int, not {value!r}")
    return value


def keep_all() -> Retention:
    """Keep every step (the default)."""
    return _All()


def keep_last(count: int) -> Retention:
    """Keep the newest ``count`` steps."""
    return _Last(count)


def keep_every(period: int) -> Retention:
    """Keep every step divisible by ``period``."""
    return _Every(period)


def keep_best(key: str, count: int = 1, mode: Literal["min", "max"] = "min") -> Retention:
    """Keep the ``count`` best steps by ``metadata[key]`` (lowest with ``mode="min"``)."""
    return _Best(key, count, mode)


__all__ = ["Metric", "Retention", "keep_all", "keep_best", "keep_every", "keep_last"]
