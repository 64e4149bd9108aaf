"""The background committer: nothing is written after a failed job."""

from __future__ import annotations

import threading

import pytest

from safepoint.committer import Committer


class Boom(Exception):
    pass


@pytest.mark.parametrize("coalesce", [True, False])
def test_a_job_handed_over_before_an_error_is_raised_is_never_written(coalesce: bool) -> None:
    """The caller raises a background error (``check()``) while a job it handed over before
    waits: that job is dropped with the error, even if the worker has not yet looked again
    (it is held here between the failure and its next look)."""
    committer = Committer(background=True, coalesce=coalesce, name="job")
    release, failed, proceed = threading.Event(), threading.Event(), threading.Event()
    written: list[str] = []

    def first() -> None:
        release.wait(10)
        raise Boom("the fence: a newer writer took over")

    pending = committer.submit(first, tag=1)
    finish = pending._finish

    def held_finish(error: BaseException | None = None) -> None:
        failed.set()  # the error is recorded; the worker has not looked for the next job
        proceed.wait(10)
        finish(error)

    pending._finish = held_finish  # type: ignore[method-assign]
    second = threading.Thread(target=lambda: committer.submit(lambda: written.append("second"), tag=2))
    second.start()  # waits in the slot (without coalescing, submit returns at once here too)
    while committer._waiting is None:
        second.join(0.001)
    release.set()
    assert failed.wait(10)
    with pytest.raises(Boom):
        committer.check()
    proceed.set()
    second.join(10)
    committer.close()
    assert written == []
    with pytest.raises(Boom):
        pending.wait(1)
    assert committer.commits == 0
