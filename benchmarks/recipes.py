#!/usr/bin/env python3
"""Variants of an ensemble's members, trained in one process over seeds, and every pairing of
them as a validation-weighted ensemble: which recipe to ship, chosen on validation.

    python benchmarks/recipes.py --seeds 0 1 2 \\
        --member fast base b512:train.batch_size=512,train.lr=1.5 \\
        --member transfer base b1024:train.batch_size=1024,train.lr=0.002

Each --member names an experiment, then its variants: `base` (as the file holds it, with its
`[gpu]` table on a GPU) or LABEL:KEY=VALUE,... (the keys of `cifar4 train --set`; they hold over
the `[gpu]` table's). Each variant trains once per seed with
`cifar4.train` (one process: the runs after the first skip the process's start-up and warm-up, so
compare their fit times with each other, not with a fresh command's). The ensembles weight
their members as `weights = "val"` does (training/ensemble.choose_weights) from the runs' saved
predictions. Prints JSON lines, then tables of validation and test accuracy (mean +- std).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
import tempfile
from pathlib import Path

import torch

import cifar4
from cifar4 import config as cfgmod
from cifar4 import data as datamod
from cifar4 import runs
from cifar4.training.ensemble import choose_weights, combine_probs
from common import mean_std


def parse_variant(text: str) -> tuple[str, dict]:
    if text == "base":
        return "base", {}
    label, sep, sets = text.partition(":")
    if not sep:
        raise SystemExit(f"variant '{text}' is not base or LABEL:KEY=VALUE,...")
    # commas inside a TOML list (model.options.widths=[32, 96, 192]) belong to the value
    return label, cfgmod.parse_sets(re.split(r",(?![^\[]*\])", sets))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--member", nargs="+", action="append", required=True, metavar="EXPERIMENT [VARIANT ...]")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--split-seed", type=int, default=42)
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    ds = datamod.load(a.data)
    members = [(m[0], [parse_variant(v) for v in (m[1:] or ["base"])]) for m in a.member]
    results: list[dict] = []
    folders: dict[tuple[str, str, int], Path] = {}
    fit: dict[tuple[str, str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, variants in members:
            for label, over in variants:
                for seed in a.seeds:
                    o = cfgmod.merge(over, {"train": {"seed": seed}, "data": {"split_seed": a.split_seed}})
                    exp = cfgmod.load(name, o)
                    folder = Path(tmp) / f"{name}-{label}-{seed}"
                    r = cifar4.train(exp, ds, run_dir=folder, progress=False)
                    m = r.metrics
                    row = {"member": name, "variant": label, "seed": seed, "val_accuracy": m["val_accuracy"],
                           "test_accuracy": m["test_accuracy"], "fit_seconds": m["fit_seconds"],
                           "epochs": m["epochs"], "batch_size": exp.train.batch_size, "lr": exp.train.lr}
                    folders[(name, label, seed)] = folder
                    fit[(name, label, seed)] = m["fit_seconds"]
                    results.append(row)
                    print(json.dumps(row), flush=True)
        ensembles = []
        for combo in itertools.product(*[[(n, lb) for lb, _ in vs] for n, vs in members]):
            for seed in a.seeds:
                preds = [runs.read_predictions(folders[(n, lb, seed)]) for n, lb in combo]
                assert all(p is not None for p in preds)
                y = {k: torch.from_numpy(ds.Y[preds[0][k][0]]) for k in ("val", "test")}  # type: ignore[index]
                lg = {k: [torch.from_numpy(p[k][1]) for p in preds] for k in ("val", "test")}  # type: ignore[index]
                w = choose_weights(lg["val"], y["val"])
                acc = {k: float((combine_probs(lg[k], w).argmax(1) == y[k]).float().mean()) for k in ("val", "test")}
                row = {"ensemble": " + ".join(f"{n}/{lb}" for n, lb in combo), "seed": seed, "weights": w,
                       "val_accuracy": acc["val"], "test_accuracy": acc["test"],
                       "fit_seconds": round(sum(fit[(n, lb, seed)] for n, lb in combo), 3)}
                ensembles.append(row)
                print(json.dumps(row), flush=True)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\nseeds {a.seeds}, split seed {a.split_seed}, on {dev}")
    print("| run | validation | test | fit s (median) |\n|---|---|---|---|")
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(f"{r['member']}/{r['variant']}", []).append(r)
    for r in ensembles:
        groups.setdefault(r["ensemble"], []).append(r)
    for k, rs in groups.items():
        print(f"| {k} | {mean_std([r['val_accuracy'] for r in rs])} | {mean_std([r['test_accuracy'] for r in rs])} "
              f"| {statistics.median(r['fit_seconds'] for r in rs):.2f} |")
    if a.out:
        Path(a.out).write_text(json.dumps({"device": dev, "torch": torch.__version__, "runs": results,
                                           "ensembles": ensembles}, indent=1))


if __name__ == "__main__":
    main()
