"""Readers never fail while a committed checkpoint exists, whatever the writer does: two
reader processes restore in a loop while a writer saves as fast as it can with ``keep=1``
or ``keep=2`` (retention removes a step every save). 0 failures, 0 false damage alarms,
in 20,000 restores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safepoint import Checkpointer

SCRIPT = Path(__file__).with_name("reader_writer.py")
RESTORES = 10_000  # per reader; two readers


def _start(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ})


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("keep", [1, 2])
def test_readers_never_fail_under_retention(tmp_path: Path, keep: int) -> None:
    store, stop = tmp_path / "store", tmp_path / "stop"
    Checkpointer("job", location=store).save(0, {"step": 0, "w": [], "b": []} | {
        "w": __import__("numpy").zeros(1500), "b": __import__("numpy").zeros(700, "int32")})
    writer = _start("write", store, keep, stop)
    readers = [_start("read", store, RESTORES) for _ in range(2)]
    results = []
    for reader in readers:
        out, err = reader.communicate(timeout=540)
        assert reader.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    stop.touch()
    out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    saved = json.loads(out.strip().splitlines()[-1])["saved"]
    assert saved > 100, "the writer barely ran: the test did not race anything"
    for result in results:
        assert result["count"] == 0, result["failures"]
        assert result["distinct"] > 10  # the readers saw many different newest steps
    assert len(Checkpointer("job", location=store).steps()) <= keep + 1
