"""Distributed checkpoints: every rank writes its own shards, one commit, agreed restores.

With ``Checkpointer(name, group=...)`` a save is collective (every rank calls it with its
own state, in the same order):

1. Each rank encodes its state: the coordinator (rank 0) all of it, the other ranks only
   their :class:`~safepoint.format.shards.Shard` leaves and
   :class:`~safepoint.format.shards.PerRank` values (replicated values are saved once).
   Each writes its own data files into the step's folder, in parallel with the others,
   and makes them durable: no gather of data to one rank.
2. **Round 1**: the ranks' parts (their file tables, byte ranges and checksums; or the
   error a rank met) go to every rank. The coordinator merges them into one manifest
   (:func:`~safepoint.format.shards.merge_parts`) and commits it under the name's lease,
   exactly like a one-process save: until then there is no new checkpoint, and if any rank
   failed (or died: the group's collective fails or times out) nothing is committed.
3. **Round 2**: the coordinator's outcome goes to every rank (a broadcast: no rank waits
   for another but the coordinator), so that every rank returns,
   or raises the same clear error; a rank removes its files if the step was not committed.

A restore is collective too: the ranks agree on a step, each reads only the byte ranges
of its own blocks, and if any rank finds damage they all fall back to the same older step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from safepoint.checkpointer.group import Group, GroupTimeout
from safepoint.committer import Pending
from safepoint.errors import (
    CheckpointNotFound,
    CorruptCheckpoint,
    SafepointError,
    SaveFailed,
    StepExists,
    warn_caller,
)
from safepoint.format import describe_os_error, json_copy, prepare, read_manifest
from safepoint.format.shards import Part
from safepoint.format.write import remove_files, write_part
from safepoint.policy import Tick
from safepoint.stateful import capture

if TYPE_CHECKING:
    from safepoint.checkpointer.core import Checkpointer, Restored


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def save_distributed(ckpt: Checkpointer, group: Group, step: int, state: Any, *,
                     metadata: dict[str, Any] | None, blocking: bool, overwrite: bool,
                     extra: dict[str, Any] | None) -> Pending:
    """One rank's part of a collective save (see the module's docstring)."""
    coordinator = group.rank == 0
    prepared, error = None, None
    try:
        prepared = prepare(capture(state), allow_pickle=ckpt.allow_pickle,
                           snapshot=None if blocking else ckpt._snapshot, share=blocking,
                           shards_only=not coordinator)
        metadata, extra = json_copy(metadata, "metadata"), json_copy(extra, "extra")
    except Exception as exc:  # told to every rank in round 1, raised here after round 2
        error = exc
    ckpt._last_save_time, ckpt._last_step = ckpt._clock(), step

    def work() -> None:
        if coordinator:
            _coordinate(ckpt, group, step, prepared, metadata, extra, overwrite, error)
        else:
            _contribute(ckpt, group, step, prepared, error)

    if blocking:
        work()
        done = Pending(step)
        done._finish()
        return done
    return ckpt._committer.submit(work, tag=step)


def _coordinate(ckpt: Checkpointer, group: Group, step: int, prepared: Any,
                metadata: Any, extra: Any, overwrite: bool, error: BaseException | None) -> None:
    from safepoint.checkpointer.core import _SaveRequest

    gathered: list[Part] | None = None
    own_ids: list[str] = []

    def exchange(own: Part) -> list[Part]:  # round 1, once (a retried commit reuses it)
        nonlocal gathered
        own_ids.append(own.save_id)
        if gathered is None:
            values = group.all_gather({"part": own.to_json()})
            gathered = []
            problems = [f"rank {r}: {v['error']}" for r, v in enumerate(values) if "error" in v]
            if problems:
                raise SaveFailed(f"{ckpt.name!r} step {step} was not saved: "
                                 + "; ".join(problems), name=ckpt.name, step=step)
            gathered = [Part.from_json(v["part"]) for v in values[1:]]
        return [own, *gathered]

    failure: BaseException | None = None
    cut_off = False  # round 1 timed out: a rank is gone, so is round 2
    try:
        if error is not None:
            raise error
        latest = None if overwrite else ckpt.latest_step()
        if latest is not None and step <= latest:
            raise StepExists(f"{ckpt.name!r} step {step} already exists or is older than the "
                             f"newest step {latest} in {ckpt.store.url}; pass overwrite=True "
                             "or save a newer step", name=ckpt.name, step=step)
        request = _SaveRequest(step, prepared, metadata, overwrite, extra)
        request.exchange = exchange
        ckpt._write(request)
    except GroupTimeout as exc:
        failure, cut_off = _timed_out(ckpt, step, exc), True
    except BaseException as exc:
        failure = exc
    if cut_off:
        assert failure is not None
        raise failure
    committed = failure is None or _committed_by(ckpt, step, own_ids)
    try:
        if gathered is None:  # failed before round 1: the others still wait for it
            group.all_gather({"error": f"rank 0: {_text(failure or SafepointError('no part'))}"})
        group.broadcast({"committed": committed,
                         "error": None if failure is None else _text(failure)})
    except GroupTimeout as exc:
        raise GroupTimeout(
            f"{ckpt.name!r} step {step} was {'' if committed else 'not '}committed, but ranks "
            f"{exc.missing} did not hear it (dead or hung): {exc}", missing=exc.missing) from exc
    if failure is not None:
        raise failure


def _timed_out(ckpt: Checkpointer, step: int, exc: GroupTimeout) -> GroupTimeout:
    """A timeout in round 1: nothing was committed, and the ranks left go no further."""
    out = GroupTimeout(f"{ckpt.name!r} step {step} was not saved: {exc}; the previous "
                       "checkpoints are untouched", missing=exc.missing)
    out.__cause__ = exc
    return out


def _committed_by(ckpt: Checkpointer, step: int, save_ids: list[str]) -> bool:
    """Whether the step's manifest is this save's (a failure after the commit: retention)."""
    try:
        return read_manifest(ckpt.store, ckpt.name, step).body.get("save_id") in save_ids
    except (CheckpointNotFound, CorruptCheckpoint, OSError):
        return False


def _contribute(ckpt: Checkpointer, group: Group, step: int, prepared: Any,
                error: BaseException | None) -> None:
    written: list[str] = []
    if error is None:
        try:
            part = write_part(ckpt.store, ckpt.name, step, prepared, durable=ckpt.durable,
                              written=written, rank=group.rank)
        except OSError as exc:  # a full disk, say: as a one-process save reports it
            remove_files(ckpt.store, written)
            error = SaveFailed(
                f"could not save {ckpt.name!r} step {step} to {ckpt.store.url} (rank "
                f"{group.rank}): {describe_os_error(exc)}. The previous checkpoints are "
                "untouched.", name=ckpt.name, step=step, errno=exc.errno)
            error.__cause__ = exc
        except Exception as exc:
            remove_files(ckpt.store, written)
            error = exc
    value = {"error": _text(error)} if error is not None else {"part": part.to_json()}
    try:
        group.all_gather(value)
    except GroupTimeout as exc:
        remove_files(ckpt.store, written)
        raise _timed_out(ckpt, step, exc) from exc
    try:
        outcome = group.broadcast(None)
    except GroupTimeout as exc:  # the step may be committed: our files stay (gc knows)
        raise GroupTimeout(
            f"{ckpt.name!r} step {step}: rank 0 did not say whether it committed the step "
            f"({exc}); it may have (latest_step() tells); this rank's files are kept, and gc "
            "removes them if the step was not committed", missing=exc.missing) from exc
    if outcome.get("committed"):
        return
    remove_files(ckpt.store, written)
    if error is not None:
        raise error
    raise SaveFailed(f"{ckpt.name!r} step {step} was not saved (rank 0: {outcome.get('error')}); "
                     "the previous checkpoints are untouched", name=ckpt.name, step=step)


def restore_distributed(ckpt: Checkpointer, group: Group, step: int | None, into: Any,
                        mmap: bool, allow_pickle: bool) -> Restored:
    """A collective restore: the ranks agree on a step that every rank can read."""
    from safepoint.checkpointer.core import CorruptCheckpointWarning
    from safepoint.checkpointer.steps import committed_steps

    candidate = step if step is not None else ckpt.latest_step()
    fell_back = False
    while True:
        proposals = group.all_gather(candidate)
        if any(p is None for p in proposals):
            if fell_back:
                raise CorruptCheckpoint(f"no checkpoint of {ckpt.name!r} in {ckpt.store.url} "
                                        "is intact on every rank; `safepoint verify` lists "
                                        "the problems")
            raise CheckpointNotFound(f"no checkpoint named {ckpt.name!r} in {ckpt.store.url} "
                                     "(seen by every rank)", name=ckpt.name)
        agreed = min(proposals)
        restored, fatal = None, False
        problem: Exception | None = None
        try:
            restored = ckpt._restore_step(agreed, into, mmap, allow_pickle,
                                          rank=(group.rank, group.size))
        except (CorruptCheckpoint, CheckpointNotFound) as exc:
            problem = exc
        except Exception as exc:
            problem, fatal = exc, True
        votes = group.all_gather(None if problem is None else [_text(problem), fatal])
        bad = [(r, v) for r, v in enumerate(votes) if v is not None]
        if not bad:
            assert restored is not None
            return restored
        if problem is not None and (fatal or step is not None):
            raise problem
        where = "; ".join(f"rank {r}: {v[0]}" for r, v in bad)
        if step is not None or any(v[1] for _, v in bad):
            raise SafepointError(f"{ckpt.name!r} step {agreed} could not be restored on every "
                                 f"rank ({where})")
        warn_caller(f"skipping damaged checkpoint {ckpt.name!r} step {agreed} ({where})",
                    CorruptCheckpointWarning)
        older = [s for s in committed_steps(ckpt.store, ckpt.name, None) if s < agreed]
        candidate, fell_back = (older[-1] if older else None), True


def should_save_together(ckpt: Checkpointer, group: Group, step: int) -> bool:
    """``should_save`` across ranks: the coordinator's policy, and a preemption vote (a
    signal at any rank makes every rank save this step); a collective call."""
    preemption, policy = ckpt._preemption, ckpt.policy
    due = False
    if group.rank == 0 and policy is not None:
        since = step - ckpt._last_step if ckpt._last_step is not None else step
        due = policy(Tick(items=since, last_checkpoint_at=ckpt._last_save_time, step=step,
                          clock=ckpt._clock))
    if preemption is None:
        return policy is not None and bool(group.broadcast(due))
    signalled = preemption.pending is not None
    fast = getattr(group, "any", None)
    if fast is not None and policy is None:  # a vote only: one small all-reduce
        ckpt._preempt_agreed = ckpt._preempt_agreed or bool(fast(signalled))
        return ckpt._preempt_agreed
    votes = group.all_gather([signalled, due])
    ckpt._preempt_agreed = ckpt._preempt_agreed or any(v[0] for v in votes)
    return ckpt._preempt_agreed or bool(votes[0][1])


__all__ = ["restore_distributed", "save_distributed", "should_save_together"]
