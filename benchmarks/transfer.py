#!/usr/bin/env python3
"""Transfer-learning figures: accuracy and time of the `transfer*` experiments.

For each experiment the first seed runs with a cold feature cache (a fresh, empty cache folder),
so its time is what a user sees on a first run: feature extraction plus head training; later
seeds read the cache (only the head trains). Fine-tuned experiments (mode c) have no feature
stage; their time is the training itself. Test accuracy is on the held-out test split of the
experiment's split (the session's by default). Prints one JSON object per run, then a table.

    python benchmarks/transfer.py transfer transfer-32 transfer-random --seeds 0 1 2
    python benchmarks/transfer.py transfer-finetune --seeds 0 --set resolution=160 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import cifar4
from cifar4 import config
from common import by_experiment, mean_std


def run_one(name: str, ds, seed: int, epochs: int | None, options: dict, root: Path,
            subset: int | None = None) -> dict:
    over: dict = {"train": {"seed": seed}}
    if subset:
        over["data"] = {"train_subset": subset, "eval_subset": max(1, subset // 3)}
        over["train"]["batch_size"] = min(config.load(name).train.batch_size, subset)
    if epochs:
        over["train"]["epochs"] = epochs
    if options:
        over["model"] = {"options": options}
    exp = config.load(name, over)
    t = time.perf_counter()
    r = cifar4.train(exp, ds, runs_root=root, progress=False)
    wall = time.perf_counter() - t
    m = r.metrics
    f = m.get("features") or {}
    return {"experiment": name, "seed": seed, "options": m["model_options"], "epochs": m["epochs"],
            "test_accuracy": m["test_accuracy"], "val_accuracy": m["val_accuracy"],
            "train_accuracy": m["train_accuracy"], "cache": f.get("cache"),
            "feature_seconds": f.get("seconds"), "fit_seconds": m["fit_seconds"],
            "features_plus_fit_seconds": round((f.get("seconds") or 0) + m["fit_seconds"], 2),
            "wall_seconds": round(wall, 2), "precision": m["precision"],
            "seconds_per_epoch": m["seconds_per_epoch"], "device": m["machine"]["device"],
            "gpu": m["machine"].get("gpu"), "cpu": m["machine"]["cpu"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiments", nargs="+")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="model options")
    ap.add_argument("--data", default=None)
    ap.add_argument("--subset", type=int, default=None, help="train on N images, validate and test on N/3")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    options = config.parse_options(a.set, "--set")
    ds = cifar4.load_dataset(a.data)
    results = []
    with tempfile.TemporaryDirectory(prefix="cifar4-bench-") as tmp:
        for name in a.experiments:
            os.environ["CIFAR4_CACHE"] = str(Path(tmp) / f"cache-{name}")  # cold for the first seed
            for seed in a.seeds:
                r = run_one(name, ds, seed, a.epochs, options, Path(tmp) / "runs", a.subset)
                print(json.dumps(r), flush=True)
                results.append(r)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    print("\nexperiment | runs | test acc | first run: features + fit s (cache) | later runs: fit s | device")
    for name, rs in by_experiment(results).items():
        acc = mean_std([r["test_accuracy"] for r in rs])
        later = f"{statistics.mean(r['fit_seconds'] for r in rs[1:]):.1f}" if len(rs) > 1 else "-"
        print(f"{name} | {len(rs)} | {acc} | {rs[0]['features_plus_fit_seconds']:.1f} ({rs[0]['cache']}) | "
              f"{later} | {rs[0]['gpu'] or rs[0]['cpu']}")


if __name__ == "__main__":
    main()
