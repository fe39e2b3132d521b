#!/usr/bin/env python3
"""Where `cifar4 evaluate RUN` spends its time, against the run's own training time.

    python benchmarks/evaluate.py RUN [--data FILE]

Three ways of evaluating the same run, each timed once in this process after a warm-up load
of the model and the data (seconds, wall clock):
1. `evaluate_run(RUN)`: what `cifar4 evaluate RUN` does (train part from the run's saved
   logits, frozen-backbone features from the feature cache);
2. `evaluate_run(RUN, full_train=True)`: `--full-train`, every train image;
3. the whole model on every image of every part (train, val, test), as `cifar4 evaluate` did
   before it measured what training measured: the reference the other two are checked against
   (val and test accuracy equal).
The run's `train_seconds` and `total_seconds` from metrics.json are printed beside them; run it
on a `best` run (`cifar4 train --preset best`) with its feature cache present, on an idle
machine. It prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from cifar4 import config, runs
from cifar4 import data as datamod
from cifar4.data.split import split_indices
from cifar4.device import inference_precision
from cifar4.training.evaluate import report
from cifar4.training.evaluate_run import evaluate_run


def whole_model(run: Path, ds: datamod.Dataset) -> dict:
    loaded = runs.load_model(run)
    exp = config.from_dict(config.read_toml(run / "config.toml"))
    _, idx = split_indices(exp.data, ds)
    prec = inference_precision(loaded.precision, torch.device("cpu"))
    return {k: report(loaded.model, torch.from_numpy(ds.X[r]), torch.from_numpy(ds.Y[r]), loaded.norm,
                      loaded.classes, precision=prec, tta=0 if k == "train" else exp.train.tta)
            for k, r in idx.items()}


def cpu_name() -> str:
    """The CPU as lscpu names it (/proc/cpuinfo's model name)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def timed(fn, *args, **kw) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return round(time.perf_counter() - t0, 2), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", default=None)
    a = ap.parse_args()
    ds = datamod.load(a.data)
    runs.load_model(a.run)  # warm-up: the imports and the weights' first read
    metrics = runs.read_metrics(a.run)
    s_default, default = timed(evaluate_run, a.run, ds, device="cpu")
    s_full, full = timed(evaluate_run, a.run, ds, device="cpu", full_train=True)
    s_whole, whole = timed(whole_model, a.run, ds)
    print(json.dumps({
        "run": str(a.run), "experiment": metrics.get("experiment"), "cpu": cpu_name(),
        "threads": torch.get_num_threads(), "train_seconds": metrics.get("train_seconds"),
        "total_seconds": metrics.get("total_seconds"),
        "evaluate_seconds": s_default, "full_train_seconds": s_full, "whole_model_seconds": s_whole,
        "val_accuracy": [default["val"]["accuracy"], full["val"]["accuracy"], whole["val"]["accuracy"]],
        "test_accuracy": [default["test"]["accuracy"], full["test"]["accuracy"], whole["test"]["accuracy"]],
        "train_images": [default["train"]["images"], full["train"]["images"]],
    }, indent=2))


if __name__ == "__main__":
    main()
