"""Readers never fail while a committed checkpoint exists, whatever the writer does: two
reader processes restore in a loop while a writer saves as fast as it can with ``keep=1``
or ``keep=2`` (retention removes a step every save). 0 failures, 0 false damage alarms.
The writer waits, every few saves, until both readers have restored its newest step, so
the race covers the whole run however the machine schedules the three processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from safepoint import Checkpointer, check

SCRIPT = Path(__file__).with_name("reader_writer.py")
SAVES, EVERY = 400, 20  # every reader restores at least SAVES // EVERY distinct steps


def _start(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ})


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("keep", [1, 2])
def test_readers_never_fail_under_retention(tmp_path: Path, keep: int) -> None:
    store, sync = tmp_path / "store", tmp_path / "sync"
    sync.mkdir()
    Checkpointer("job", location=store).save(0, {
        "step": 0, "w": np.zeros(1500), "b": np.zeros(700, "int32")})
    names = ["a", "b"]
    for name in names:
        (sync / f"reader-{name}").touch()
    readers = [_start("read", store, name, sync) for name in names]
    writer = _start("write", store, keep, SAVES, EVERY, sync)
    out, err = writer.communicate(timeout=540)
    if writer.returncode != 0:
        (sync / "done").touch()
        reader_errors = [r.communicate(timeout=60)[1] for r in readers]
        pytest.fail(f"writer: {err}\nreaders: {reader_errors}")
    assert json.loads(out.strip().splitlines()[-1])["saved"] == SAVES
    for reader in readers:
        out, err = reader.communicate(timeout=60)
        assert reader.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result["count"] == 0, result["failures"]
        assert result["distinct"] >= SAVES // EVERY  # the writer waited for each of these
    assert len(Checkpointer("job", location=store).steps()) <= keep + 1
    report = check(store)
    assert report.ok, report
    # the data of the step retention removed last waits for a next save (a reader may hold
    # its manifest): the one leftover a finished writer leaves, removed by gc
    assert len(report.leftovers) <= 1, report.leftovers
