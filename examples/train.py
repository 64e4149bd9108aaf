"""A training loop that can be killed at any moment and resumes exactly: run it, kill it
(Ctrl+C, kill -9, or SIGTERM for a clean preemption), run it again; the final parameters
are bit for bit those of a run that was never interrupted.

    python examples/train.py [--framework numpy|torch] [--steps 20] [--location DIR] [--out FILE]

numpy (the default): linear regression with hand-written SGD plus gradient noise from
numpy's global generator. torch: a small MLP with dropout, AdamW and a StepLR schedule.
The state tree holds everything that decides the next step: parameters, optimizer, the
position of the data iterator and every random generator.
"""

import argparse
import sys
import time

import numpy as np

import safepoint
from safepoint.data import BatchIterator

parser = argparse.ArgumentParser()
parser.add_argument("--framework", choices=["numpy", "torch"], default="numpy")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--location", default=None, help="checkpoint store (default ./.safepoint)")
parser.add_argument("--out", default="params.npy", help="where the final parameters go")
parser.add_argument("--save-every", type=int, default=5, help="checkpoint every N steps")
parser.add_argument("--delay", type=float, default=0.1, help="extra seconds per step")
args = parser.parse_args()

# A synthetic dataset: 4 features and a noisy linear target, as rows of one array.
features = np.random.default_rng(0).normal(size=(256, 4))
target = features @ np.array([1.5, -2.0, 0.5, 3.0]) + 0.1
dataset = np.column_stack([features, target]).astype(np.float32)
batches = BatchIterator(dataset, batch_size=16, shuffle=True, seed=0, epochs=None)
np.random.seed(0)  # the global generators are state too: GlobalRNG saves them

if args.framework == "torch":
    import torch

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # initial weights and dropout masks
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    noise = torch.Generator().manual_seed(0)  # input noise, apart from the global generator
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "noise": noise}

    def train_step(batch: np.ndarray) -> float:
        x, y = torch.from_numpy(batch[:, :4]), torch.from_numpy(batch[:, 4:])
        x = x + 0.01 * torch.randn(x.shape, generator=noise)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        return loss.item()

    def parameters() -> np.ndarray:
        return torch.cat([p.detach().flatten() for p in model.parameters()]).numpy()
else:
    state = {"w": np.zeros(4), "b": np.zeros(1)}

    def train_step(batch: np.ndarray) -> float:
        x, y = batch[:, :4].astype(np.float64), batch[:, 4].astype(np.float64)
        error = x @ state["w"] + state["b"] - y
        state["w"] -= 0.05 * (2 * x.T @ error / len(y) + np.random.normal(0, 0.01, 4))
        state["b"] -= 0.05 * 2 * error.mean(keepdims=True)
        return float((error**2).mean())

    def parameters() -> np.ndarray:
        return np.concatenate([state["w"], state["b"]])


state.update(data=batches, rng=safepoint.GlobalRNG(), step=0)
ckpt = safepoint.Checkpointer(
    f"train-{args.framework}",
    location=args.location,
    keep=3,
    save_interval_steps=args.save_every,
    handle_preemption=True,
)
if ckpt.latest_step() is not None:
    state = ckpt.restore(into=state).state  # live objects and arrays are loaded in place
    print(f"resuming after step {state['step']}", flush=True)

while state["step"] < args.steps:
    loss = train_step(next(state["data"]))
    state["step"] += 1
    time.sleep(args.delay)  # stands for a longer step: time to kill it
    if ckpt.should_save(state["step"]):
        ckpt.save(state["step"], state, blocking=False, metadata={"loss": loss})
    if ckpt.preempted:  # SIGTERM: this step is saved; exit so the scheduler restarts us
        ckpt.wait()
        print(f"preempted: saved step {state['step']}", flush=True)
        sys.exit(143)

np.save(args.out, parameters())
print(f"done: {args.steps} steps, parameters in {args.out}")
