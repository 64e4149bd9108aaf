"""When to checkpoint: small composable policies.

A policy is asked at every item (or sub-step) boundary whether to checkpoint now. Combine
them with ``|`` (any) and ``&`` (all); a plain callable taking a :class:`Tick` works too::

    policy = every(items=1000) | every(seconds=30)

Time-based policies read the clock each time they are asked, so a deadline is missed by at
most the time between two boundaries, however suddenly items become slow. Asking rarely
enough is the caller's job: a run asks at segment ends (a few hundred times a second at
most), not after every item.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

Clock = Callable[[], float]


@dataclass
class Tick:
    """What a policy sees at a boundary."""

    items: int
    """Items (or sub-steps) completed since the last checkpoint."""
    last_checkpoint_at: float
    """Clock reading at the last checkpoint (or the start)."""
    fraction: float | None = None
    """Overall progress in [0, 1], when known."""
    fraction_at_last: float = 0.0
    """Progress at the last checkpoint."""
    substep_completed: bool = False
    """A named sub-step has just finished (tasks)."""
    clock: Clock = field(default=time.monotonic, repr=False)

    def now(self) -> float:
        """Read the clock (policies call this only when they need it)."""
        return self.clock()


class Policy:
    """Base of checkpoint policies; subclasses implement :meth:`__call__`."""

    def __call__(self, tick: Tick) -> bool:
        raise NotImplementedError

    def __or__(self, other: PolicyLike) -> Policy:
        return AnyOf(self, as_policy(other))

    def __ror__(self, other: PolicyLike) -> Policy:
        return AnyOf(as_policy(other), self)

    def __and__(self, other: PolicyLike) -> Policy:
        return AllOf(self, as_policy(other))

    def __rand__(self, other: PolicyLike) -> Policy:
        return AllOf(as_policy(other), self)


PolicyLike = Policy | Callable[[Tick], bool]


class _Callable(Policy):
    def __init__(self, fn: Callable[[Tick], bool]) -> None:
        self.fn = fn

    def __call__(self, tick: Tick) -> bool:
        return bool(self.fn(tick))

    def __repr__(self) -> str:
        return f"policy({self.fn!r})"


def as_policy(value: PolicyLike) -> Policy:
    """A Policy from a Policy or a plain callable ``(Tick) -> bool``."""
    if isinstance(value, Policy):
        return value
    if callable(value):
        return _Callable(value)
    raise TypeError(f"a checkpoint policy must be a Policy or a callable(Tick) -> bool, not {value!r}")


class AnyOf(Policy):
    """Checkpoint when any of the policies says so (``a | b``). Every policy is asked, so
    that each keeps its own bookkeeping current."""

    def __init__(self, *policies: Policy) -> None:
        self.policies = policies

    def __call__(self, tick: Tick) -> bool:
        results = [p(tick) for p in self.policies]
        return any(results)

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.policies))


class AllOf(Policy):
    """Checkpoint when all of the policies say so (``a & b``)."""

    def __init__(self, *policies: Policy) -> None:
        self.policies = policies

    def __call__(self, tick: Tick) -> bool:
        results = [p(tick) for p in self.policies]
        return all(results)

    def __repr__(self) -> str:
        return "(" + " & ".join(map(repr, self.policies)) + ")"


class _Items(Policy):
    def __init__(self, items: int) -> None:
        if items < 1:
            raise ValueError(f"every(items=...) needs a positive count, not {items}")
        self.items = items

    def __call__(self, tick: Tick) -> bool:
        return tick.items >= self.items

    def __repr__(self) -> str:
        return f"every(items={self.items})"


class _Seconds(Policy):
    def __init__(self, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError(f"every(seconds=...) needs a positive period, not {seconds}")
        self.seconds = seconds

    def __call__(self, tick: Tick) -> bool:
        return tick.now() - tick.last_checkpoint_at >= self.seconds

    def __repr__(self) -> str:
        return f"every(seconds={self.seconds})"


class _Progress(Policy):
    def __init__(self, fraction: float) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"on_progress(...) needs a fraction in (0, 1], not {fraction}")
        self.fraction = fraction

    def __call__(self, tick: Tick) -> bool:
        if tick.fraction is None:
            return False
        return tick.fraction - tick.fraction_at_last >= self.fraction - 1e-12

    def __repr__(self) -> str:
        return f"on_progress({self.fraction})"


class _Manual(Policy):
    def __call__(self, tick: Tick) -> bool:
        return False

    def __repr__(self) -> str:
        return "manual()"


class _AfterSubstep(Policy):
    def __call__(self, tick: Tick) -> bool:
        return tick.substep_completed

    def __repr__(self) -> str:
        return "after_substep()"


def every(*, items: int | None = None, seconds: float | None = None) -> Policy:
    """Checkpoint every ``items`` items, or every ``seconds`` seconds (either, if both)."""
    parts: list[Policy] = []
    if items is not None:
        parts.append(_Items(items))
    if seconds is not None:
        parts.append(_Seconds(seconds))
    if not parts:
        raise TypeError("every() needs items=N, seconds=T, or both")
    return parts[0] if len(parts) == 1 else AnyOf(*parts)


def on_progress(fraction: float) -> Policy:
    """Checkpoint each time progress has advanced by ``fraction`` (e.g. 0.05 = every 5%)."""
    return _Progress(fraction)


def manual() -> Policy:
    """Never checkpoint on its own: only explicit ``checkpoint()`` calls (and at exit)."""
    return _Manual()


def after_substep() -> Policy:
    """Checkpoint after every completed sub-step (the "automatic" strategy of tasks)."""
    return _AfterSubstep()


def default_policy() -> Policy:
    """Suits a cheap loop: at most two commits a second, plus one at exit."""
    return every(seconds=0.5)


__all__ = [
    "AllOf",
    "AnyOf",
    "Policy",
    "PolicyLike",
    "Tick",
    "after_substep",
    "as_policy",
    "default_policy",
    "every",
    "manual",
    "on_progress",
]
