"""A Checkpointer save in flight while the name is taken over: the old writer has passed
its fence check and is held right there (by its ``fence`` hook, as a process paused at
that instant would be) while a new writer in another process takes over and saves steps 4
to 6; then the old writer publishes. The newest-step record is written conditionally
(S3 ``If-Match``; on a local disk, a check under the folder's lock), and a new step's
manifest is created only if absent (S3 ``If-None-Match``; ``link()``), so the late save
must be refused, leave nothing, and lose nothing of the new writer, also when it saves a
step number the new writer has saved too."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from lease_support import (
    Spec,
    assert_checkpoints_exact,
    assert_consistent,
    checkpoint_state,
    finish,
)

from safepoint import Checkpointer
from safepoint.errors import StaleAttempt, WriteConflict
from safepoint.store import FsspecStore, open_store

BUCKET = "safepoint-tests"  # made by the s3_options fixture (tests/conftest.py)
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_SECURITY_TOKEN": "testing", "AWS_SESSION_TOKEN": "testing",
       "AWS_DEFAULT_REGION": "us-east-1"}

@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any] | None]:
    """A location and its storage options, on a local disk or on S3 (moto)."""
    if request.param == "local":
        return str(tmp_path / "store"), None
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    options = request.getfixturevalue("s3_options")
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:10]}", options


@pytest.mark.parametrize("collides", [False, True],
                         ids=["other-step", "same-step"])
def test_a_save_in_flight_during_a_takeover_is_refused(
        tmp_path: Path, where: tuple[str, dict[str, Any] | None],
        writers: Callable[[Spec], Any], collides: bool) -> None:
    location, options = where
    taken_over: list[int] = []

    def hold_here() -> None:  # after the fence check, before the publish
        if not taken_over:
            new = writers(Spec("checkpointer", location, "job", 6, str(tmp_path / "events"),
                               takeover=True, storage_options=options, env=AWS))
            taken_over.append(finish(new))

    old = Checkpointer("job", location=location, storage_options=options)
    for step in (1, 2, 3):
        old.save(step, checkpoint_state(step), metadata={"step": step})
    old.fence = hold_here
    step = 4 if collides else 8  # the new writer saves 4, 5 and 6
    with pytest.raises(StaleAttempt, match="taken over by attempt 2") as refused:
        old.save(step, checkpoint_state(step), metadata={"step": step})
    assert taken_over == [0]
    assert isinstance(refused.value.__context__, WriteConflict)  # the conditional write refused it
    assert_checkpoints_exact(location, "job", 6, options)  # nothing lost, nothing left
    store = FsspecStore(location, **options) if options else open_store(location)
    # On a local disk the refused save leaves the (empty) folder it made for its data files
    # (S3 has no folders): a leftover, which gc removes.
    assert_consistent(store, leftovers=[] if collides else [f"job/{step:012d}"])
