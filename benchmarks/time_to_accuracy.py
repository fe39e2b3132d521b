#!/usr/bin/env python3
"""Time-to-accuracy and throughput of cifar4's experiments, optionally beside the Keras reference.

For each experiment and seed it trains with the normal engine and, after every epoch, measures
test accuracy (with the experiment's TTA); that measurement is excluded from the clock, while
the steps, per-epoch validation and state saving are included - the same accounting as the
Keras reference (benchmarks/keras_reference.py). It prints one JSON object per run, then a
summary table: final test accuracy (mean +- std over seeds), training seconds, seconds to reach
0.70 / 0.78 / 0.85 / 0.90 / 0.94 / 0.95 test accuracy, and training / inference images per second.

    python benchmarks/time_to_accuracy.py fast fast-long --seeds 0 1 2
    python benchmarks/time_to_accuracy.py cnn --epochs 7 --rounds 2 --seeds 0 --keras
    python benchmarks/time_to_accuracy.py cnn-augmented --epochs 5 --rounds 4 --seeds 0 --keras

--keras trains the same model with TensorFlow/Keras (benchmarks/keras_reference.py, run by
--keras-python, this interpreter by default) on the same dataset file. With --rounds N the two
take turns N times (Keras first in odd rounds, cifar4's runs first in even ones), and the
summary gains the speed-up of each round (Keras seconds over cifar4's mean seconds in that
round) and their median: on a shared 2-core host one pair can differ from the next by 15 %, and
a host slows down after sustained load, so whoever runs second in a pair is penalised;
alternating spreads both over the two sides.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import cifar4
from cifar4 import config
from cifar4.data.transforms import Normalization
from cifar4.training.callbacks import Callback
from cifar4.training.evaluate import evaluate, predict_logits
from common import by_experiment, mean_std

THRESHOLDS = (0.70, 0.78, 0.85, 0.90, 0.94, 0.95)
# the experiments benchmarks/keras_reference.py trains with Keras
KERAS_MODELS = ("cnn", "cnn-augmented", "cnn-augmented-long", "mlp-deep", "mlp-20", "mlp-raw")
KERAS_SCRIPT = Path(__file__).with_name("keras_reference.py")


class TestEachEpoch(Callback):
    """Test accuracy after each epoch, with the clock stopped while it is measured."""

    def __init__(self, x_test: torch.Tensor, y_test: torch.Tensor, norm: Normalization, tta: int):
        self.x, self.y, self.norm, self.tta = x_test, y_test, norm, tta
        self.curve: list[dict] = []

    def on_train_begin(self, logs=None):
        self.t0 = time.perf_counter()
        self.excluded = 0.0

    def on_epoch_end(self, epoch, logs=None):
        assert logs is not None and self.plan is not None
        t = time.perf_counter()
        elapsed = t - self.t0 - self.excluded
        acc = evaluate(self.model, self.x, self.y, self.norm, device=self.plan.device,
                       precision=self.plan.precision.precision, tta=self.tta)["accuracy"]
        self.curve.append({"epoch": epoch, "train_seconds": round(elapsed, 2),
                           "val_accuracy": round(logs["val_accuracy"], 4), "test_accuracy": round(acc, 4)})
        print(json.dumps(self.curve[-1]), file=sys.stderr, flush=True)
        self.excluded += time.perf_counter() - t


def run_one(name: str, ds, seed: int, split_seed: int, epochs: int | None, root: Path,
            split: str | None = None, sets: list[str] | None = None) -> dict:
    over: dict = config.merge(config.parse_sets(sets or []),
                              {"train": {"seed": seed}, "data": {"split_seed": split_seed}})
    if split:
        over["data"]["split"] = split
    if epochs:
        over["train"]["epochs"] = epochs
    exp = config.load(name, over)
    if exp.model.name == "transfer" and exp.model.options.get("finetune", 0) == 0:
        raise SystemExit(f"{name}: a frozen transfer backbone trains on cached features; "
                         f"measure it with benchmarks/transfer.py")
    from cifar4.data.split import split_indices
    _, idx = split_indices(exp.data, ds)
    norm = Normalization.from_config(exp.data.scale, exp.data.standardize, ds.X[idx["train"]])  # as the run's
    cb = TestEachEpoch(torch.from_numpy(ds.X[idx["test"]]), torch.from_numpy(ds.Y[idx["test"]]), norm,
                       exp.train.tta)
    r = cifar4.train(exp, ds, runs_root=root, progress=False, save_state=True, callbacks=[cb])
    # Inference throughput as `cifar4 predict` runs it: the test split, batch 1000, the
    # model's recorded precision and the experiment's TTA views; best of 2.
    x = torch.from_numpy(ds.X[idx["test"]])
    loaded = cifar4.load_model(r.run_dir)
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        predict_logits(loaded.model, x, loaded.norm, precision=loaded.precision, tta=exp.train.tta)
        best = min(best, time.perf_counter() - t)
    m = r.metrics
    train_s = cb.curve[-1]["train_seconds"]
    return {"experiment": name, "seed": seed, "split_seed": split_seed, "epochs": m["epochs"],
            "test_accuracy": m["test_accuracy"], "train_seconds": train_s,
            "train_images_per_s": round(m["split"]["train"] * m["epochs"] / train_s, 1),
            "inference_images_per_s": round(len(x) / best, 1), "precision": m["precision"],
            "tta": exp.train.tta,
            "time_to": time_to(cb.curve), "curve": cb.curve, "machine": m["machine"],
            "versions": m["versions"]}


def time_to(curve: list[dict]) -> dict[str, float | None]:
    out = {}
    for th in THRESHOLDS:
        hit = next((c["train_seconds"] for c in curve if c["test_accuracy"] >= th), None)
        out[f"{th:.2f}"] = hit
    return out


def run_keras(python: str, name: str, epochs: int | None, data: str) -> dict | None:
    """The Keras reference's run of experiment `name` (None where it has no Keras model); a
    failed run ends the benchmark with the reference's own one-line error."""
    if name not in KERAS_MODELS:
        return None
    cmd = [python, str(KERAS_SCRIPT), name, "--data", data]
    if epochs:
        cmd += ["--epochs", str(epochs)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines()
        print(lines[-1] if lines else f"{KERAS_SCRIPT.name} exited with {r.returncode}", file=sys.stderr)
        raise SystemExit(2)
    p = json.loads(r.stdout.strip().splitlines()[-1])
    return {"experiment": f"keras:{name}", "seed": None, "split_seed": 42, "epochs": p["epochs"],
            "test_accuracy": p["test_accuracy"], "train_seconds": p["train_seconds"],
            "train_images_per_s": round(p["n_train"] * p["epochs"] / p["train_seconds"], 1),
            "inference_images_per_s": None, "precision": "fp32", "time_to": time_to(p["curve"]),
            "curve": p["curve"], "tensorflow": p["tensorflow"]}


def speedups(results: list[dict]) -> dict[str, list[float]]:
    """Per experiment, Keras' seconds over cifar4's mean seconds, round by round (a round holds
    one Keras run and cifar4's runs of the same experiment)."""
    out: dict[str, list[float]] = {}
    keras = {(r["experiment"].split(":", 1)[1], r.get("round", 1)): r["train_seconds"]
             for r in results if r["experiment"].startswith("keras:")}
    ours: dict[tuple[str, int], list[float]] = {}
    for r in results:
        if not r["experiment"].startswith("keras:"):
            ours.setdefault((r["experiment"], r.get("round", 1)), []).append(r["train_seconds"])
    for (name, round_), secs in sorted(ours.items(), key=lambda kv: kv[0][1]):
        reference = keras.get((name, round_))
        if reference:
            out.setdefault(name, []).append(reference / statistics.mean(secs))
    return out


def print_speedups(results: list[dict]) -> None:
    for name, ratios in speedups(results).items():
        rounds = " / ".join(f"{x:.2f}x" for x in ratios)
        print(f"{name} against Keras, round by round: {rounds}; median {statistics.median(ratios):.2f}x, "
              f"lowest {min(ratios):.2f}x")


def _keras_round(python: str, name: str, epochs: int | None, data: str, round_: int) -> list[dict]:
    p = run_keras(python, name, epochs, data)
    if not p:
        return []
    p["round"] = round_
    print(json.dumps({k: v for k, v in p.items() if k != "curve"}), flush=True)
    return [p]


def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiments", nargs="+", help="built-in experiment names or TOML files")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--split-seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--epochs", type=int, default=None, help="override the experiments' epochs")
    ap.add_argument("--split", default=None, help="override the split (session, stratified, official)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override any experiment key, as cifar4 train --set")
    ap.add_argument("--data", default=None)
    ap.add_argument("--keras", action="store_true",
                    help="train the same model with Keras too (benchmarks/keras_reference.py)")
    ap.add_argument("--keras-python", default=sys.executable, metavar="PYTHON",
                    help="the interpreter that has TensorFlow, for --keras (default: this one)")
    ap.add_argument("--peer", default=None, metavar="PATH", help="deprecated: use --keras")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --keras: alternate Keras' and cifar4's runs this many times")
    ap.add_argument("--out", default=None, help="write all results as JSON here")
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error(f"--rounds {a.rounds}: expected a whole number >= 1")
    if a.peer is not None:
        print(f"--peer is deprecated: use --keras (running {KERAS_SCRIPT} instead of {a.peer})",
              file=sys.stderr)
        a.keras = True
    ds = cifar4.load_dataset(a.data)
    results = []
    with tempfile.TemporaryDirectory(prefix="cifar4-bench-") as tmp:
        for name in a.experiments:
            for round_ in range(1, (a.rounds if a.keras else 1) + 1):
                # rounds alternate who goes first (Keras, cifar4, cifar4, Keras, ...): a host that
                # slows down under sustained load then slows both sides alike
                keras_first = round_ % 2 == 1
                if a.keras and keras_first:
                    results += _keras_round(a.keras_python, name, a.epochs, ds.source, round_)
                for split_seed in a.split_seeds:
                    for seed in a.seeds:
                        r = run_one(name, ds, seed, split_seed, a.epochs, Path(tmp), a.split, a.sets)
                        r["round"] = round_
                        print(json.dumps({k: v for k, v in r.items() if k not in ("curve", "machine", "versions")}),
                              flush=True)
                        results.append(r)
                if a.keras and not keras_first:
                    results += _keras_round(a.keras_python, name, a.epochs, ds.source, round_)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    print()
    head = ["experiment", "runs", "epochs", "test acc", "train s", *[f"to {t:.2f}" for t in THRESHOLDS],
            "train img/s", "infer img/s"]
    print(" | ".join(head))
    for name, rs in by_experiment(results).items():
        acc = mean_std([r["test_accuracy"] for r in rs])
        secs = statistics.mean(r["train_seconds"] for r in rs)
        tts = []
        for t in THRESHOLDS:
            hits = [r["time_to"][f"{t:.2f}"] for r in rs]
            tts.append("-" if any(h is None for h in hits) else f"{statistics.mean(hits):.1f}")
        tr = statistics.mean(r["train_images_per_s"] for r in rs)
        inf = [r["inference_images_per_s"] for r in rs if r["inference_images_per_s"]]
        print(" | ".join([name, str(len(rs)), str(rs[0]["epochs"]), acc, f"{secs:.1f}", *tts,
                          f"{tr:.0f}", fmt(statistics.mean(inf) if inf else None, ".0f")]))
    if a.keras:
        print_speedups(results)
    if results and "machine" in results[-1]:
        m = results[-1]["machine"]
        print(f"\nmachine: {m['cpu']}, {m['cpu_count']} CPUs, torch threads {m['torch_threads']}, "
              f"device {m['device']}; versions {results[-1]['versions']}")


if __name__ == "__main__":
    main()
