"""When to checkpoint: small composable policies that own their behaviour.

A policy is asked at boundaries (between items of a loop, after a sub-step, at a training
step) whether to checkpoint now. Combine them with ``|`` (any) and ``&`` (all); a plain
callable taking a :class:`Tick` works too::

    policy = every(items=1000) | every(seconds=30)

A policy also answers what a loop needs to know to ask it rarely, so that asking costs
nothing per item (tenacity's ``stop`` strategies are the model; nothing outside a policy
inspects its class):

- :meth:`Policy.horizon`: how many more items may pass before it could say yes (``None``:
  no count bounds it, ask at segment ends, a few hundred times a second at most). The
  default, for a policy that does not say, is 1: it is asked after every item.
- :attr:`Policy.uses_clock`: whether it may become due by time alone (the loop then keeps a
  watchdog, so that slow items cannot delay it).
- :meth:`Policy.due_at`: the earliest clock reading at which time alone could make it due
  (the watchdog sleeps until then: a thread that wakes costs the loop a hand-over of the
  GIL, about half a millisecond on a busy machine). The default, for a policy that does not
  say, is "at any moment": the watchdog then looks every 50 ms.
- :attr:`Policy.uses_fraction`: whether it reads ``Tick.fraction`` (costly for a stream).

A user-written policy that defines ``horizon`` is as fast as a built-in one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

Clock = Callable[[], float]


@dataclass
class Tick:
    """What a policy sees at a boundary."""

    items: int
    """Items (or sub-steps, or training steps) since the last checkpoint."""
    last_checkpoint_at: float
    """Clock reading at the last checkpoint (or the start)."""
    fraction: float | None = None
    """Overall progress in [0, 1], when known."""
    fraction_at_last: float = 0.0
    """Progress at the last checkpoint."""
    substep_completed: bool = False
    """A named sub-step has just finished (tasks and flows)."""
    step: int | None = None
    """The training step being asked about (``Checkpointer.should_save(step)``)."""
    clock: Clock = field(default=time.monotonic, repr=False)

    def now(self) -> float:
        """Read the clock (policies call this only when they need it)."""
        return self.clock()


class Policy:
    """Base of checkpoint policies; subclasses implement :meth:`__call__`, and should
    answer :meth:`horizon`, :attr:`uses_clock` and :attr:`uses_fraction` where they can."""

    def __call__(self, tick: Tick) -> bool:
        raise NotImplementedError

    def horizon(self, since: int, position: int, total: int | None, fraction_at_last: float) -> int | None:
        """Items that may pass (``since`` have passed since the last checkpoint, the loop is
        at ``position`` of ``total``) before this policy could say yes; None when no count
        bounds it. The default, 1, asks after every item."""
        return 1

    def due_at(self, last_checkpoint_at: float) -> float | None:
        """The earliest clock reading at which time alone could make this policy say yes
        (the last checkpoint was at ``last_checkpoint_at``); None when time alone never does.
        The default, ``last_checkpoint_at``, means at any moment."""
        return last_checkpoint_at if self.uses_clock else None

    @property
    def uses_clock(self) -> bool:
        return True

    @property
    def uses_fraction(self) -> bool:
        return True

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
    """A plain function of a Tick: it may look at anything, so it is asked after every item."""

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

    def horizon(self, since: int, position: int, total: int | None, fraction_at_last: float) -> int | None:
        values = [v for p in self.policies if (v := p.horizon(since, position, total, fraction_at_last)) is not None]
        return min(values) if values else None

    def due_at(self, last_checkpoint_at: float) -> float | None:
        times = [t for p in self.policies if (t := p.due_at(last_checkpoint_at)) is not None]
        return min(times) if times else None

    @property
    def uses_clock(self) -> bool:
        return any(p.uses_clock for p in self.policies)

    @property
    def uses_fraction(self) -> bool:
        return any(p.uses_fraction for p in self.policies)

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.policies))


class AllOf(AnyOf):
    """Checkpoint when all of the policies say so (``a & b``): not before the latest of
    their horizons."""

    def __call__(self, tick: Tick) -> bool:
        results = [p(tick) for p in self.policies]
        return all(results)

    def horizon(self, since: int, position: int, total: int | None, fraction_at_last: float) -> int | None:
        values = [v for p in self.policies if (v := p.horizon(since, position, total, fraction_at_last)) is not None]
        return max(values) if values else None

    def due_at(self, last_checkpoint_at: float) -> float | None:
        times = [t for p in self.policies if (t := p.due_at(last_checkpoint_at)) is not None]
        return max(times) if times else None

    def __repr__(self) -> str:
        return "(" + " & ".join(map(repr, self.policies)) + ")"


class _Quiet(Policy):
    """A built-in policy that never reads the clock or the fraction unless it says so."""

    @property
    def uses_clock(self) -> bool:
        return False

    @property
    def uses_fraction(self) -> bool:
        return False

    def horizon(self, since: int, position: int, total: int | None, fraction_at_last: float) -> int | None:
        return None


class _Items(_Quiet):
    def __init__(self, items: int) -> None:
        if items < 1:
            raise ValueError(f"every(items=...) needs a positive count, not {items}")
        self.items = items

    def __call__(self, tick: Tick) -> bool:
        return tick.items >= self.items

    def horizon(self, since: int, position: int, total: int | None, fraction_at_last: float) -> int | None:
        return self.items - since

    def __repr__(self) -> str:
        return f"every(items={self.items})"


class _Steps(_Quiet):
    def __init__(self, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"every(steps=...) needs a positive count, not {steps}")
        self.steps = steps

    def __call__(self, tick: Tick) -> bool:
        return tick.step is not None and tick.step % self.steps == 0

    def __repr__(self) -> str:
        return f"every(steps={self.steps})"


class _Seconds(_Quiet):
    def __init__(self, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError(f"every(seconds=...) needs a positive period, not {seconds}")
        self.seconds = seconds

    def __call__(self, tick: Tick) -> bool:
        return tick.now() - tick.last_checkpoint_at >= self.seconds

    def due_at(self, last_checkpoint_at: float) -> float | None:
        return last_checkpoint_at + self.seconds

    @property
    def uses_clock(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"every(seconds={self.seconds})"


class _Progress(_Quiet):
    def __init__(self, fraction: float) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"on_progress(...) needs a fraction in (0, 1], not {fraction}")
        self.fraction = fraction

    def __call__(self, tick: Tick) -> bool:
        if tick.fraction is None:
            return False
        return tick.fraction - tick.fraction_at_last >= self.fraction - 1e-12

    def horizon(self, since: int, position: int, total: int | None, fraction_at_last: float) -> int | None:
        if total is None:
            return None
        return math.ceil((fraction_at_last + self.fraction - 1e-12) * total) - position

    @property
    def uses_fraction(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"on_progress({self.fraction})"


class _Manual(_Quiet):
    def __call__(self, tick: Tick) -> bool:
        return False

    def __repr__(self) -> str:
        return "manual()"


class _AfterSubstep(_Quiet):
    def __call__(self, tick: Tick) -> bool:
        return tick.substep_completed

    def __repr__(self) -> str:
        return "after_substep()"


def every(*, items: int | None = None, seconds: float | None = None,
          steps: int | None = None) -> Policy:
    """Checkpoint every ``items`` items, every ``seconds`` seconds, or at every training
    step divisible by ``steps`` (any of those given)."""
    parts: list[Policy] = []
    if items is not None:
        parts.append(_Items(items))
    if seconds is not None:
        parts.append(_Seconds(seconds))
    if steps is not None:
        parts.append(_Steps(steps))
    if not parts:
        raise TypeError("every() needs items=N, seconds=T, steps=S, or several")
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
