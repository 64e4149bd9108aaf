"""Training loops killed at random instants resume bit-exactly.

Each run is a fresh Python process (``examples/train.py``, or a jax script written to
``tmp_path``). A run is SIGKILLed once a checkpoint at a random step exists, a random
fraction of a step later, then run again to completion; its final parameters must equal,
byte for byte, those of a run that was never interrupted. SIGTERM must end a run with 143
after saving the step in progress, and the rerun resumes right after that step.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from safepoint import Checkpointer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train.py"
STEPS = 20
DELAY = "0.05"  # seconds per step, so that a kill lands mid-run

JAX_SCRIPT = """
import sys, time
import jax, jax.numpy as jnp, numpy as np
import safepoint
from safepoint.data import BatchIterator

location, out = sys.argv[1], sys.argv[2]
rows = np.random.default_rng(0).normal(size=(128, 5)).astype(np.float32)
state = {
    "params": {
        "dense": {"kernel": jnp.full((4, 8), 0.1, jnp.float32), "bias": jnp.zeros(8, jnp.bfloat16)},
        "head": {"kernel": jnp.full((8, 1), 0.1, jnp.float32), "bias": jnp.zeros(1, jnp.float32)},
    },
    "key": jax.random.key(0),
    "data": BatchIterator(rows, batch_size=16, shuffle=True, seed=0, epochs=None),
    "step": 0,
}

def loss_fn(params, x, y):
    hidden = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"].astype(jnp.float32))
    return jnp.mean((hidden @ params["head"]["kernel"] + params["head"]["bias"] - y) ** 2)

ckpt = safepoint.Checkpointer("jax", location=location, keep=3, save_interval_steps=1,
                              handle_preemption=True)
if ckpt.latest_step() is not None:
    state = ckpt.restore(into=state).state
    print(f"resuming after step {state['step']}")
while state["step"] < 20:
    batch = jnp.asarray(next(state["data"]))
    state["key"], sub = jax.random.split(state["key"])
    x = batch[:, :4] + 0.01 * jax.random.normal(sub, (batch.shape[0], 4))
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], x, batch[:, 4:])
    state["params"] = jax.tree.map(lambda p, g: (p - 0.1 * g).astype(p.dtype),
                                   state["params"], grads)
    state["step"] += 1
    time.sleep(0.05)
    if ckpt.should_save(state["step"]):
        ckpt.save(state["step"], state, blocking=False, metadata={"loss": float(loss)})
    if ckpt.preempted:
        ckpt.wait()
        sys.exit(143)
leaves = jax.tree.leaves(state["params"]) + [jax.random.key_data(state["key"])]
np.save(out, np.concatenate([np.asarray(a).view(np.uint8).ravel() for a in leaves]))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def example(framework: str, save_every: int = 1) -> Callable[[Path, Path], list[str]]:
    """The command line of ``examples/train.py`` for a store and an output file."""

    def command(location: Path, out: Path) -> list[str]:
        return [
            sys.executable, str(EXAMPLE), "--framework", framework, "--steps", str(STEPS),
            "--location", str(location), "--out", str(out),
            "--save-every", str(save_every), "--delay", DELAY,
        ]  # fmt: skip

    return command


def jax_script(tmp_path: Path) -> Callable[[Path, Path], list[str]]:
    script = tmp_path / "train_jax.py"
    script.write_text(JAX_SCRIPT)
    return lambda location, out: [sys.executable, str(script), str(location), str(out)]


def run_to_end(command: list[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 0, done.stderr
    return done


def start_and_signal(command: list[str], checkpointer: Checkpointer, sig: int) -> subprocess.Popen:
    """Start ``command``; once a checkpoint at a random step ``k`` exists, wait a random
    fraction of a step and send ``sig``. Returns the process, finished."""
    k = random.randint(1, 10)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
    )
    deadline = time.monotonic() + 90
    while (checkpointer.latest_step() or 0) < k:
        assert process.poll() is None, f"the run ended before step {k}: {process.stderr.read()}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    time.sleep(random.uniform(0, 0.05))
    process.send_signal(sig)
    process.wait(timeout=60)
    return process


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., bytes]:
    """The final parameter bytes of an uninterrupted run, computed once per program."""
    results: dict[str, bytes] = {}

    def get(key: str, command: Callable[[Path, Path], list[str]]) -> bytes:
        if key not in results:
            folder = tmp_path_factory.mktemp(f"reference-{key}")
            run_to_end(command(folder / "store", folder / "params.npy"))
            results[key] = (folder / "params.npy").read_bytes()
        return results[key]

    return get


def killed_and_resumed(
    tmp_path: Path, command: Callable[[Path, Path], list[str]], name: str
) -> bytes:
    """Run, SIGKILL at a random step, run again to the end; the final parameter bytes."""
    location, out = tmp_path / "store", tmp_path / "params.npy"
    process = start_and_signal(
        command(location, out), Checkpointer(name, location=location), signal.SIGKILL
    )
    assert process.returncode == -signal.SIGKILL
    assert not out.exists()
    rerun = run_to_end(command(location, out))
    assert "resuming after step" in rerun.stdout
    return out.read_bytes()


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_example_killed_at_a_random_step_resumes_bit_exactly(
    tmp_path: Path, reference: Callable[..., bytes], framework: str
) -> None:
    if framework == "torch":
        pytest.importorskip("torch")
    command = example(framework)
    resumed = killed_and_resumed(tmp_path, command, f"train-{framework}")
    assert resumed == reference(framework, command)


def test_jax_pytree_killed_at_a_random_step_resumes_bit_exactly(
    tmp_path: Path, reference: Callable[..., bytes]
) -> None:
    pytest.importorskip("jax")
    command = jax_script(tmp_path)
    resumed = killed_and_resumed(tmp_path, command, "jax")
    assert resumed == reference("jax", command)


def test_sigterm_saves_the_step_in_progress_and_exits_143(
    tmp_path: Path, reference: Callable[..., bytes]
) -> None:
    command = example("numpy", save_every=4)  # the preemption save falls between the regular ones
    location, out = tmp_path / "store", tmp_path / "params.npy"
    checkpointer = Checkpointer("train-numpy", location=location)
    process = start_and_signal(command(location, out), checkpointer, signal.SIGTERM)
    assert process.returncode == 143, process.stderr.read()
    saved = int(re.search(r"preempted: saved step (\d+)", process.stdout.read()).group(1))
    assert checkpointer.latest_step() == saved < STEPS
    rerun = run_to_end(command(location, out))
    assert f"resuming after step {saved}\n" in rerun.stdout
    assert out.read_bytes() == reference("numpy", example("numpy"))  # whatever the interval
