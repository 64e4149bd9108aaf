"""Every size read from a store is checked before anything is allocated: a manifest that
lies about a file's size, a 64 GiB sparse manifest or journal. Each case runs in a fresh
process whose peak memory is measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hostile_support import rewrite, two_steps

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")

PEAK_LIMIT = 400 << 20  # far above what the process needs, far below what a lie would take

HERE = Path(__file__).parent


def _peak(code: str) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter; it prints a JSON result, to which the peak
    resident memory of the process is added."""
    # VmHWM, the peak of this process's own memory: ru_maxrss would also count the memory
    # of the parent the child was forked from (Linux keeps it across exec).
    program = textwrap.dedent(code) + textwrap.dedent("""
        with open("/proc/self/status") as status:
            peak = next(line for line in status if line.startswith("VmHWM:"))
        result["peak"] = int(peak.split()[1]) * 1024
        print(json.dumps(result))
    """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(HERE)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _restore_code(root: Path, step: int | None) -> str:
    return f"""
        import json, warnings
        from safepoint import Checkpointer, CorruptCheckpoint
        warnings.simplefilter("ignore")
        result = {{}}
        try:
            restored = Checkpointer("job", location={str(root)!r}).restore({step!r})
            result["step"] = restored.step
        except CorruptCheckpoint as exc:
            result["error"] = str(exc)
    """


def test_a_manifest_that_lies_about_a_file_size_allocates_nothing(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store, _ = two_steps(root)

    def lie(body: dict) -> None:  # a 3 GiB file and array, for a file of 30 KB
        body["files"][0][1] = 3 << 30
        body["blobs"][0]["size"] = body["blobs"][0]["ranges"][0][2] = (3 << 30) - 64
        body["tree"]["w"]["shape"] = [((3 << 30) - 64) // 8]

    rewrite(store, "job", 2, lie)
    found = _peak(_restore_code(root, 2))
    assert "data file has" in str(found["error"]) and "expected 3221225472" in str(found["error"])
    assert found["peak"] < PEAK_LIMIT
    found = _peak(_restore_code(root, None))
    assert found["step"] == 1 and found["peak"] < PEAK_LIMIT


@pytest.mark.parametrize("what", ["step manifest", "newest-step record"])
def test_a_sparse_64_gib_manifest_is_refused_unread(tmp_path: Path, what: str) -> None:
    root = tmp_path / "store"
    two_steps(root)
    target = root / "job" / ("000000000002.json" if what == "step manifest" else "latest.json")
    target.unlink()  # its own file (the two names share one file on a local disk)
    with open(target, "wb") as f:
        f.truncate(64 << 30)
    found = _peak(_restore_code(root, 2 if what == "step manifest" else None))
    if what == "step manifest":
        assert "more than any file safepoint writes" in str(found["error"])
    else:
        assert found["step"] == 2  # the listing finds the intact step
    assert found["peak"] < PEAK_LIMIT


def test_a_sparse_64_gib_journal_is_refused_unread(tmp_path: Path) -> None:
    root = tmp_path / "store"
    code_run = textwrap.dedent(f"""
        import safepoint
        with safepoint.resume("stream", location={str(root)!r}, policy=safepoint.every(items=1)) as run:
            for i in run.range(5):
                if i == 3:
                    raise SystemExit(3)
                run.state["n"] = i
    """)
    done = subprocess.run([sys.executable, "-c", code_run], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 3, done.stderr
    journal = next((root / "stream").glob("run-*.journal"))
    with open(journal, "r+b") as f:
        f.truncate(64 << 30)
    found = _peak(f"""
        import json
        import safepoint
        result = {{}}
        try:
            with safepoint.resume("stream", location={str(root)!r}) as run:
                pass
        except safepoint.CorruptCheckpoint as exc:
            result["error"] = str(exc)
    """)
    assert "more than any file safepoint writes" in str(found["error"])
    assert found["peak"] < PEAK_LIMIT
