"""Does an ensemble's later member gain from learning the earlier one's predictions? (validation)

Give it finished runs of the earlier member, one per seed on one split (`cifar4 train -e
transfer-tuned --set train.time_limit=0 --seed S`). For each, it trains the later member
(`--student`, `fast-24` by default, the same seed and split, no time limit) at each `--weights`
share of the teacher's softened probabilities in its targets (0: the labels alone, as `best`
trains it without `[ensemble] distill`), then averages it with its teacher as an ensemble does
(weights chosen on validation). It prints one JSON row per student and a table; the test split is
reported beside, never used to choose.

    python benchmarks/distill.py RUNS/transfer-tuned-* --weights 0 0.5 --temperature 2 \\
        --out benchmarks/results/DATE-MACHINE-distill-COMMIT.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from cifar4 import config, runs
from cifar4 import data as datamod
from cifar4.config import EnsembleConfig
from cifar4.training.distill import teacher_targets
from cifar4.training.ensemble import make_ensemble
from cifar4.training.pipeline import train
from common import emit, mean_std, write_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("teachers", nargs="+", type=Path, help="finished runs of the earlier member, one per seed")
    ap.add_argument("--student", default="fast-24", help="the later member's experiment (default fast-24)")
    ap.add_argument("--weights", nargs="+", type=float, default=[0.0, 0.5],
                    help="ensemble.distill values to train the student at (0: the labels alone)")
    ap.add_argument("--temperature", type=float, default=2.0, help="ensemble.distill_temperature")
    ap.add_argument("--data", default=None, help="the dataset file the teachers trained on (default: cifar4's)")
    ap.add_argument("--keep-runs", type=Path, default=None, help="keep the students' runs here")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = ap.parse_args()
    bad = [w for w in a.weights if not 0 <= w <= 0.5]
    if bad or not 0 < a.temperature <= 10:
        raise SystemExit(f"distill.py: --weights {bad or a.weights} --temperature {a.temperature:g}: expected "
                         f"weights from 0 to 0.5 and a temperature above 0, at most 10 (as [ensemble] takes them)")
    ds = datamod.load(a.data)
    for t in a.teachers:
        if not (t / "metrics.json").exists():
            raise SystemExit(f"distill.py: '{t}' is not a finished run; expected a run folder with metrics.json")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        keep = a.keep_runs or Path(tmp)
        for teacher in a.teachers:
            tm = runs.read_metrics(teacher)
            for w in a.weights:
                exp = config.load(a.student, {"train": {"seed": tm["seed"], "time_limit": 0},
                                              "data": {"split_seed": tm["split"]["seed"]}})
                ens = EnsembleConfig(members=[tm["experiment"], a.student], distill=w,
                                     distill_temperature=a.temperature)
                targets = teacher_targets([teacher], exp, ds, ens) if w else None
                folder = keep / f"{exp.name}-seed{tm['seed']}-split{tm['split']['seed']}-distill{w:g}"
                res = train(exp, ds, run_dir=folder, overwrite=True, progress=False, targets=targets)
                pair = make_ensemble([teacher, folder], out=Path(tmp) / "pair", weights="val", data=ds,
                                     overwrite=True).metrics
                m = res.metrics
                row = {"teacher": teacher.name, "seed": tm["seed"], "split_seed": tm["split"]["seed"],
                       "student": a.student, "distill": w, "temperature": a.temperature,
                       "teacher_val_accuracy": tm["val_accuracy"], "teacher_test_accuracy": tm["test_accuracy"],
                       "val_accuracy": m["val_accuracy"], "val_loss": m["val_loss"],
                       "test_accuracy": m["test_accuracy"], "fit_seconds": m["fit_seconds"],
                       "targets_seconds": (targets.record["seconds"] if targets else 0.0),
                       "pair_weights": pair["model_options"]["weights"],
                       "pair_val_accuracy": pair["val_accuracy"], "pair_test_accuracy": pair["test_accuracy"]}
                emit(row, rows)
    write_rows(rows, a.out)
    print("\n| distill | runs | student validation | student test | pair validation | pair test |\n"
          "|---|---|---|---|---|---|")
    for w in a.weights:
        rs = [r for r in rows if r["distill"] == w]
        print(f"| {w:g} | {len(rs)} | {mean_std([r['val_accuracy'] for r in rs])} | "
              f"{mean_std([r['test_accuracy'] for r in rs])} | {mean_std([r['pair_val_accuracy'] for r in rs])} | "
              f"{mean_std([r['pair_test_accuracy'] for r in rs])} |")


if __name__ == "__main__":
    main()
