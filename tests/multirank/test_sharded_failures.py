"""A distributed save in which one rank fails or dies: nothing is committed, every rank
learns of it, the previous checkpoint stays intact, the other ranks' files go.

Store-coordinated numpy ranks (children of the tests' fork server, three of them: the
coordinator, the failing rank and a bystander). Each launch saves step 1, then tries step 2
with a fault on one rank:

- a rank raises during its part: a shard of another dtype or global shape than the other
  ranks', a value it cannot encode (only on that rank), a full disk (its store's
  ``write_blob`` writes half a file, then raises ``OSError(ENOSPC)``). Every rank raises; the
  others' errors name the failing rank; step 1 is still the newest and restores bit for
  bit; no rank's data file of step 2 is left; and the same launch then saves step 2 (the
  group is still in step). ``safepoint.check`` is clean, also after ``gc``.
- a rank dies (SIGKILL, in the middle of writing its data, before round 1) with
  ``StoreGroup(timeout=2)``: each survivor raises ``GroupTimeout`` naming it, nothing is
  committed, ``check`` finds no damage, and ``gc`` leaves nothing.
- a rank dies after round 1 (or the coordinator right after its commit): the step is
  committed and whole (the survivors keep their files on a round-2 timeout), and no rank's
  error says that nothing was committed.

The same with ``TorchGroup`` (gloo, two processes, see ``torch_rank.py``): a rank that fails
makes every rank raise, and a dead rank makes the survivor raise at once (not hang).
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
import uuid
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
from multirank_support import (
    NAME,
    assert_clean_after_gc,
    data_files,
    global_state,
    outcome_of,
    rank_state,
    spoil,
)

import child_processes
import safepoint
from child_processes import CONTEXT
from safepoint import Checkpointer, StoreGroup
from state_checks import assert_identical

WORLD = 3
HERE = Path(__file__).resolve().parent
SRC = str(HERE.parent.parent / "src")
WAIT = 60.0  # seconds for any answer of a rank


def rank_main(store: Path, rank: int, world: int, run_id: str, scenario: str, faulty: int,
              timeout: float, conn: Any) -> None:
    """Save step 1, then step 2 with ``scenario`` at rank ``faulty``; report; on the test's
    word save step 2 again, without the fault."""
    try:
        group = StoreGroup(rank, world, run_id, timeout=timeout, poll=0.002)
        ckpt = Checkpointer(NAME, location=store, group=group)
        ckpt.save(1, rank_state(1, rank, world))
        state = rank_state(2, rank, world)
        saved_write = ckpt.store.write_blob
        if rank == faulty:
            spoil(scenario, state, ckpt, world)
        started = time.monotonic()
        outcome = outcome_of(lambda: ckpt.save(2, state))
        outcome["seconds"] = time.monotonic() - started
        ckpt.store.write_blob = saved_write  # type: ignore[method-assign]
        conn.send(outcome)
        if conn.recv() == "again":
            conn.send(outcome_of(lambda: ckpt.save(2, rank_state(2, rank, world))))
    except BaseException:
        conn.send({"crashed": traceback.format_exc()})
    os._exit(0)


class Launch:
    def __init__(self, store: Path, world: int, scenario: str, faulty: int, timeout: float) -> None:
        run_id = uuid.uuid4().hex
        self.conns, self.children = [], []
        for rank in range(world):
            ours, theirs = CONTEXT.Pipe()
            self.children.append(child_processes.start(
                rank_main, store, rank, world, run_id, scenario, faulty, timeout, theirs))
            theirs.close()
            self.conns.append(ours)

    def answers(self, ranks: list[int] | None = None) -> dict[int, dict[str, Any]]:
        got = {}
        for rank in range(len(self.conns)) if ranks is None else ranks:
            assert self.conns[rank].poll(WAIT), f"rank {rank} did not answer in {WAIT} s"
            got[rank] = self.conns[rank].recv()
            assert "crashed" not in got[rank], f"rank {rank}: {got[rank]['crashed']}"
        return got

    def tell(self, word: str, ranks: list[int] | None = None) -> None:
        for rank in range(len(self.conns)) if ranks is None else ranks:
            self.conns[rank].send(word)

    def close(self) -> None:
        """Hang up (a rank still waiting for a word ends), then reap every rank."""
        for conn in self.conns:
            conn.close()
        deadline = time.monotonic() + WAIT
        for child in self.children:
            child.join(max(0.0, deadline - time.monotonic()))
            if child.exitcode is None:
                os.kill(child.pid, signal.SIGKILL)
                child.join(WAIT)


def assert_only_step_1(store: Path, world: int) -> None:
    ckpt = Checkpointer(NAME, location=store)
    assert ckpt.steps() == [1] and ckpt.latest_step() == 1
    restored = ckpt.restore()
    assert restored.step == 1
    assert_identical(restored.state, global_state(1, world))


# ------------------------------------------------------------------- tests

RAISING = {  # scenario: what the failing rank itself raises, and a word of the cause
    "dtype": ("SaveFailed", "<f8"),
    "global shape": ("SaveFailed", "global shape"),
    "unsupported": ("UnsupportedType", "lock"),
    "disk full": ("SaveFailed", "No space left on device"),
}


class BareOSError(Exception):
    """The failing rank raised its store's OSError itself, not a SaveFailed."""


def _raising_cases() -> list[Any]:
    cases = []
    for scenario in RAISING:
        for faulty in (0, 1) if scenario in ("unsupported", "disk full") else (1,):
            cases.append(pytest.param(scenario, faulty,
                                      id=f"{scenario.replace(' ', '-')}-rank{faulty}"))
    return cases


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("scenario", "faulty"), _raising_cases())
def test_a_rank_that_raises_fails_the_save_on_every_rank(scenario: str, faulty: int,
                                                         tmp_path: Path) -> None:
    store = tmp_path / "store"
    launch = Launch(store, WORLD, scenario, faulty, timeout=WAIT)
    try:
        got = launch.answers()
        # the previous checkpoint is intact, nothing of step 2 is left: every rank removed
        # its own files (the ranks wait meanwhile)
        assert_only_step_1(store, WORLD)
        assert data_files(store, 2) == []
        report = safepoint.check(store)
        assert report.ok, str(report)
        launch.tell("again")
        again = launch.answers()
    finally:
        launch.close()
    own_type, cause = RAISING[scenario]
    bare = None
    for rank, outcome in got.items():
        assert outcome["raised"] is not None, f"rank {rank}'s save returned"
        message = outcome["message"]
        assert cause.lower() in message.lower(), (rank, outcome)  # the cause, on every rank
        if rank == faulty and scenario == "disk full" and outcome["raised"] == "OSError":
            bare = outcome  # the known bug: raised last, so that the rest is still checked
        elif rank == faulty:
            assert outcome["raised"] == own_type, (rank, outcome)
        elif rank == 0 and scenario in ("dtype", "global shape"):  # found by the merge
            assert outcome["raised"] == "StateMismatch", (rank, outcome)
            assert f"rank {faulty}" in message, (rank, outcome)
        else:
            assert outcome["raised"] == "SaveFailed", (rank, outcome)
            assert f"rank {faulty}" in message, (rank, outcome)  # names the failing rank
            assert "step 2" in message, (rank, outcome)
        if scenario == "disk full" and rank == faulty:
            assert outcome["errno"] == errno.ENOSPC, (rank, outcome)
    # the group is still in step: the same launch saves step 2
    assert all(outcome["raised"] is None for outcome in again.values()), again
    ckpt = Checkpointer(NAME, location=store)
    assert ckpt.steps() == [1, 2]
    assert_identical(ckpt.restore().state, global_state(2, WORLD))
    assert_identical(ckpt.restore(step=1).state, global_state(1, WORLD))
    assert_clean_after_gc(store)
    if bare is not None:
        raise BareOSError(f"rank {faulty} raised {bare}")


def survivors_of(launch: Launch, victim: int) -> dict[int, Any]:
    """The answers of every rank but ``victim``, which must have died by SIGKILL."""
    try:
        survivors = [r for r in range(WORLD) if r != victim]
        got = launch.answers(survivors)
        launch.tell("stop", survivors)
    finally:
        launch.close()
    assert launch.children[victim].exitcode == -signal.SIGKILL
    return got


_MISSING = re.compile(r"ranks \[([0-9, ]*)\] of (\d+) did not reach")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", [1, 0], ids=["rank1", "coordinator"])
def test_a_rank_that_dies_before_round_1_times_the_others_out(victim: int, tmp_path: Path) -> None:
    store = tmp_path / "store"
    timeout = 2.0
    got = survivors_of(Launch(store, WORLD, "dies", victim, timeout=timeout), victim)
    for rank, outcome in got.items():
        assert outcome["raised"] == "GroupTimeout", (rank, outcome)
        found = _MISSING.search(outcome["message"])
        assert found, outcome["message"]
        missing = [int(r) for r in found.group(1).split(",")]
        assert victim in missing and int(found.group(2)) == WORLD, (rank, outcome)
        # one timeout: a round-1 timeout ends the save on every rank
        assert timeout <= outcome["seconds"] < 2 * timeout + 20, (rank, outcome)
    assert_only_step_1(store, WORLD)
    assert safepoint.check(store).ok
    assert_clean_after_gc(store)
    assert data_files(store, 2) == []


class MisleadingError(Exception):
    """A rank's error says nothing was committed, and the step was committed."""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", [1, 0], ids=["rank1-after-round-1", "coordinator-after-commit"])
def test_a_rank_that_dies_after_round_1_leaves_the_committed_step_whole(victim: int,
                                                                        tmp_path: Path) -> None:
    """Rank 1 dies after its part of round 1 (the coordinator has every part: it commits), or
    the coordinator dies right after its commit, before round 2. The step is committed and
    whole: the survivors must keep their files on a round-2 timeout (they cannot know)."""
    store = tmp_path / "store"
    got = survivors_of(Launch(store, WORLD, "dies after round 1", victim, timeout=1.0), victim)
    ckpt = Checkpointer(NAME, location=store)
    assert ckpt.steps() == [1, 2]
    assert_identical(ckpt.restore().state, global_state(2, WORLD))
    assert safepoint.check(store).ok
    assert_clean_after_gc(store)
    for rank, outcome in got.items():
        assert outcome["raised"] in (None, "GroupTimeout"), (rank, outcome)
    misleading = {rank: outcome["message"] for rank, outcome in got.items()
                  if outcome["raised"] and "nothing was committed" in outcome["message"]}
    if misleading:
        raise MisleadingError(f"step 2 is committed, yet {misleading}")


# ------------------------------------------------------------- torch (gloo)


def torch_ranks(tmp_path: Path, world: int, *args: str) -> list[dict[str, Any]]:
    """Run ``torch_rank.py`` as ``world`` processes; every rank's JSON lines, by rank."""
    store, init = tmp_path / "store", tmp_path / f"init-{uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, str(HERE)]),
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(HERE / "torch_rank.py"), str(rank), str(world),
                               str(store), str(init), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in range(world)]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            results.append({"code": proc.returncode, "lines": lines, "stderr": err})
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


needs_torch = pytest.mark.skipif(find_spec("torch") is None, reason="needs torch")


@needs_torch
@pytest.mark.timeout(180)
@pytest.mark.parametrize("victim", [1, 0], ids=["rank1", "coordinator"])
def test_torch_group_a_rank_that_raises_or_dies(victim: int, tmp_path: Path) -> None:
    """Rank 1 raises during its part (twice), then ``victim`` dies during step 3's save."""
    store = tmp_path / "store"
    results = torch_ranks(tmp_path, 2, str(victim))
    survivor = 1 - victim
    assert results[victim]["code"] == -signal.SIGKILL, results[victim]["stderr"][-3000:]
    assert results[survivor]["code"] == 0, results[survivor]["stderr"][-3000:]
    for rank, result in enumerate(results):
        by = {line["case"]: line for line in result["lines"]}
        # the coordinator finds the mismatch when it merges the parts: StateMismatch there
        assert by["dtype"]["raised"] == ("StateMismatch" if rank == 0 else "SaveFailed"), by
        assert "rank 1" in by["dtype"]["message"], by
        assert by["unsupported"]["raised"] == ("UnsupportedType" if rank == 1 else "SaveFailed"), by
        if rank == 0:
            assert "rank 1" in by["unsupported"]["message"], by
        assert by["again"]["raised"] is None, by
    (died,) = [line for line in results[survivor]["lines"] if line["case"] == "die"]
    # gloo sees the dead peer's connections close: a RuntimeError (DistBackendError) at
    # once, long before the group's 120 s timeout
    assert died["raised"] is not None and died["isinstance_runtime_error"], died
    assert died["seconds"] < 60, died
    ckpt = Checkpointer(NAME, location=store)
    assert ckpt.steps() == [1, 2]
    assert_identical(ckpt.restore().state, global_state(2, 2))
    assert_identical(ckpt.restore(step=1).state, global_state(1, 2))
    assert safepoint.check(store).ok
    assert_clean_after_gc(store)
    assert data_files(store, 3) == []
