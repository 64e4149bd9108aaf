"""Every Python example in README.md runs, against small stand-ins for the user's code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


class _Counter:
    """A live object with state_dict/load_state_dict, standing in for a model or optimizer."""

    def __init__(self) -> None:
        self.value = np.zeros(3)

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = np.array(state["value"])


def _stand_ins(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "numbers.txt").write_text("".join(f"{i}\n" for i in range(1000)))
    return {
        "fetch": lambda i: None,
        "read_big_table": lambda: np.arange(1000.0),
        "fit": lambda table: float(table.mean()),
        "load_rows": lambda path: list(range(10)),
        "process": lambda row: None,
        "summarize": lambda rows: len(rows),
        "model": _Counter(),
        "optimizer": _Counter(),
        "dataset": list(range(100)),
        "steps": 20,
        "train_step": lambda batch: None,
        "loss": 0.5,
        # one rank of a distributed job
        "rank": 0, "world_size": 1, "launch_id": "readme", "local_rows": np.ones((8, 4)),
        "first_row": 0, "vocab": 8, "dim": 4, "batches": _Counter(), "step": 1,
    }


def test_the_readme_has_examples() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAFEPOINT_DIR", str(tmp_path / "store"))
    namespace = _stand_ins(tmp_path)
    code = BLOCKS[index]
    exec(compile("import safepoint\n" + code, f"README.md example {index + 1}", "exec"), namespace)
    if "run.lines" in code:
        assert namespace["run"].state["total"] == sum(range(1000))
