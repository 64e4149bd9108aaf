"""A resumable pipeline: generate data, standardize it, fit a model, evaluate it.

    python examples/flow_pipeline.py              # runs the four steps
    python examples/flow_pipeline.py --crash fit  # `fit` fails; run again without --crash:
                                                  # the flow resumes at `fit`
    safepoint show example-pipeline               # the step table

Steps return their arrays; safepoint stores them and hands them to later steps, also after
a crash, so no step writes or reads a file by hand. The record lives in $SAFEPOINT_DIR
(default ./.safepoint) under the name "example-pipeline".
"""

from __future__ import annotations

import argparse

import numpy as np

from safepoint.flow import Flow

flow = Flow("example-pipeline")
crash_at: str | None = None


@flow.step
def generate(state, data):
    print("running generate")
    rng = np.random.default_rng(state["seed"])
    x = rng.normal(size=(state["rows"], 8)) * np.arange(1, 9) + 5.0
    y = x @ np.linspace(-1.0, 1.0, 8) + rng.normal(scale=0.1, size=state["rows"])
    return {"x": x, "y": y}


@flow.step
def standardize(state, data):
    print("running standardize")
    x = data["generate"]["x"]
    mean, std = x.mean(axis=0), x.std(axis=0)
    return {"x": (x - mean) / std, "mean": mean, "std": std}


@flow.step
def fit(state, data):
    print("running fit")
    if crash_at == "fit":
        raise RuntimeError("simulated crash in fit")
    x, y = data["standardize"]["x"], data["generate"]["y"]
    design = np.column_stack([x, np.ones(len(x))])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return {"coef": coef}


@flow.step
def evaluate(state, data):
    print("running evaluate")
    x, y = data["standardize"]["x"], data["generate"]["y"]
    prediction = np.column_stack([x, np.ones(len(x))]) @ data["fit"]["coef"]
    state["rmse"] = float(np.sqrt(np.mean((prediction - y) ** 2)))


def main() -> None:
    global crash_at
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crash", choices=flow.steps, help="make this step raise")
    crash_at = parser.parse_args().crash
    try:
        state = flow.run({"seed": 0, "rows": 100_000})
    except RuntimeError as exc:
        print(f"failed: {exc}")
        raise SystemExit(1) from exc
    finally:
        for row in flow.status():
            print(f"  {row.name:<12} {row.status:<8} {row.error or ''}")
    print(f"rmse {state['rmse']:.4f}")


if __name__ == "__main__":
    main()
