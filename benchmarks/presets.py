#!/usr/bin/env python3
"""Whole-command time and accuracy of the presets, as a user runs them.

Each run is `cifar4 train --preset NAME --seed S --split-seed K` in a fresh process, timed
from before the process starts to its exit (metrics.json written): imports, loading, the
precision measurement, feature extraction, training, the final evaluation and the files all
count. `--cold` gives the first run of each preset an empty cache folder (no cached features,
no cached precision choice: a fresh machine); the later runs of that preset use what it
cached, as a user's second run does. `--budgets 30 60` runs the first preset with `--time-budget`
instead, each budget with each of `--seeds` (seed 0 alone when none are given), and the table
gives each budget's mean. `--data FILE` and `--split KIND` (session, stratified, official) go to
every run, budgets included: CIFAR-10 is measured on its own test set with `--split official`.
Each row records its dataset (file name, classes, images, from the run's metrics.json) and split
kind, so that a series on other data says so and frontier.py draws it in a panel of its own.

    python benchmarks/presets.py fast fast-long best --seeds 0 1 2 --split-seeds 7 11 --cold
    python benchmarks/presets.py fast --budgets 30 60 90 180 360
    python benchmarks/presets.py fast --budgets 60 180 600 --seeds 0 1 2 --cold \
        --data ~/.cache/cifar4/cifar10.npz --split official
    python benchmarks/presets.py fast best --data ~/.cache/cifar4/cifar10.npz --split official \
        --seeds 0 1 2 --out benchmarks/results/DATE-MACHINE-cifar10-presets.json

Prints one JSON object per run, then a table (mean +- sample std over the runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit, mean_std, write_rows


def run(preset: str, seed: int, split_seed: int, cache: str | None, budget: float | None,
        runs_dir: Path, data: str | None, cold: bool, split: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "cifar4", "train", "--preset", preset, "--seed", str(seed),
           "--split-seed", str(split_seed), "--runs-dir", str(runs_dir), "--json", "-q"]
    if budget is not None:
        cmd += ["--time-budget", str(budget)]
    if data:
        cmd += ["--data", data]
    if split:
        cmd += ["--split", split]
    env = dict(os.environ)
    if cache is not None:
        env["CIFAR4_CACHE"] = cache
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    whole = time.perf_counter() - t
    if p.returncode:
        return {"preset": preset, "seed": seed, "split_seed": split_seed, "error": p.stderr.strip()[-300:]}
    m = json.loads(p.stdout)
    out = {"preset": preset, "seed": seed, "split_seed": split_seed, "cold": cache is not None and cold,
           "time_budget": budget, "test_accuracy": m["test_accuracy"], "val_accuracy": m["val_accuracy"],
           "whole_command_seconds": round(whole, 2), "total_seconds": m["total_seconds"],
           "fit_seconds": m.get("fit_seconds"), "warmup_seconds": m.get("warmup_seconds"),
           "eval_seconds": m.get("eval_seconds"),
           "epochs": m.get("epochs"), "precision": m.get("precision"), "tta": m.get("tta"),
           "cpu": m["machine"]["cpu"], "gpu": m["machine"].get("gpu"), **dataset(m),
           "run_dir": m["run_dir"]}
    if m.get("members"):
        out["feature_seconds"] = m.get("feature_seconds")
        if m.get("skipped_members"):  # members whose lightest variant did not fit their time
            out["skipped_members"] = [{k: sk.get(k) for k in ("experiment", "reason")} for sk in m["skipped_members"]]
        out["members"] = [{k: mm.get(k) for k in ("experiment", "weight", "val_accuracy", "test_accuracy",
                                                 "fit_seconds", "warmup_seconds", "feature_seconds",
                                                 "total_seconds")}
                          for mm in m["members"]]
        # what each member's time limit chose (its fallback, the features it extracted)
        for mm, sub in zip(out["members"], sorted((Path(m["run_dir"]) / "members").iterdir()), strict=False):
            own = json.loads((sub / "metrics.json").read_text())
            mm["fallback"], mm["features"] = own.get("fallback"), own.get("features", {}).get("views")
    elif m.get("fallback"):
        out["fallback"] = m["fallback"]
    return out


def plan_runs(presets: list[str], seeds: list[int] | None, split_seeds: list[int],
              budgets: list[float]) -> list[tuple[str, int, int, float | None]]:
    """(preset, seed, split seed, budget) of each run, in order. Budgets: the first preset,
    each budget with each seed (seed 0 alone by default: a budget series is long), on split
    seed 42. Otherwise each preset with each seed (0, 1, 2 by default) on split seed 42, then
    seed 0 on each other split seed."""
    if budgets:
        return [(presets[0], s, 42, b) for b in budgets for s in (seeds or [0])]
    plan: list[tuple[str, int, int, float | None]] = []
    for p in presets:
        plan += [(p, s, 42, None) for s in (seeds or [0, 1, 2])] + [(p, 0, k, None) for k in split_seeds]
    return plan


def table(rows: list[dict]) -> list[str]:
    """The summary's markdown lines: a line per preset (a budget series: per budget), with the
    test accuracy's mean +- sample std over its runs, the whole command's mean and most seconds,
    and the cold first run's seconds."""
    ok = [r for r in rows if "error" not in r]
    lines = ["| preset | runs | test accuracy | whole command s (mean, max) | cold first run s |",
             "|---|---|---|---|---|"]
    groups: dict[tuple[str, float | None], list[dict]] = {}
    for r in ok:
        groups.setdefault((r["preset"], r.get("time_budget")), []).append(r)
    for (p, budget), rs in groups.items():
        name = p if budget is None else f"{p} --time-budget {budget:g}"
        cold = [r["whole_command_seconds"] for r in rs if r["cold"]]
        lines.append(f"| {name} | {len(rs)} | {mean_std([r['test_accuracy'] for r in rs])} | "
                     f"{sum(r['whole_command_seconds'] for r in rs) / len(rs):.1f}, "
                     f"{max(r['whole_command_seconds'] for r in rs):.1f} | {cold[0] if cold else ''} |")
    return lines


def dataset(m: dict) -> dict:
    """What a run measured on, from its metrics.json: the file's name, its classes (output
    order) and images, and the split's kind."""
    classes = list(m.get("per_class_accuracy") or {})
    return {"dataset": {"file": Path(m["data"]["source"]).name, "classes": classes,
                        "num_classes": len(classes), "images": m["data"]["images"]},
            "split": m["split"]["kind"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("presets", nargs="+")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="training seeds (default: 0 1 2; with --budgets, 0)")
    ap.add_argument("--split-seeds", type=int, nargs="*", default=[], help="other splits (training seed 0)")
    ap.add_argument("--cold", action="store_true", help="the first run of each preset with an empty cache")
    ap.add_argument("--budgets", type=float, nargs="*", default=[])
    ap.add_argument("--data", default=None, help="the dataset file (default: cifar4's)")
    ap.add_argument("--split", default=None, choices=("session", "stratified", "official"),
                    help="the split kind, as cifar4 train --split (official: CIFAR-10's own test set)")
    ap.add_argument("--out", default=None, help="also write the runs as JSON here")
    ap.add_argument("--keep-runs", default=None, metavar="DIR",
                    help="keep the run folders here (default: a temporary folder, removed), so that "
                         "an ensemble's members can be compared or recombined afterwards")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = Path(a.keep_runs) if a.keep_runs else Path(tmp) / "runs"
        plan = plan_runs(a.presets, a.seeds, a.split_seeds, a.budgets)
        first: set[str] = set()
        for preset, seed, split_seed, budget in plan:
            # --cold: each preset's first run starts with an empty cache folder of its own, and
            # its later runs find what that run cached (not the user's cache, which a new
            # machine has empty too: then a second run would extract again)
            cache = str(Path(tmp) / f"cache-{preset}") if a.cold else None
            r = run(preset, seed, split_seed, cache, budget, runs_dir, a.data, cold=preset not in first,
                  split=a.split)
            first.add(preset)
            emit(r, rows)
    write_rows(rows, a.out)
    print("\n" + "\n".join(table(rows)))


if __name__ == "__main__":
    main()
