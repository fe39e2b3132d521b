"""Would an ensemble gain from a third member? Recombine the members of finished ensemble runs.

Give it the run folders of one ensemble experiment trained with several seeds on one split
(`python benchmarks/presets.py best --seeds 0 1 2 --keep-runs DIR`, then `DIR/best-*`). For each
run it averages its own members (as trained), then adds a member of the same experiment from
another seed's run (a second `transfer-tuned`, a second `fast-24`), then both kinds, with weights
chosen on the validation split each time, as the ensemble does. It trains nothing: the members'
saved predictions are combined, so it takes seconds. The test split is reported beside, never
used to choose.

    python benchmarks/recombine.py DIR/best-* --out benchmarks/results/DATE-MACHINE-recombine.json
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

from cifar4 import data as datamod
from cifar4 import runs
from cifar4.training.ensemble import make_ensemble
from common import emit, mean_std, write_rows


def members_of(run: Path) -> dict[str, Path]:
    """{experiment name: member folder} of a finished ensemble run."""
    if not ((run / "metrics.json").exists() and (run / "members").is_dir()):
        raise SystemExit(f"recombine.py: '{run}' is not a finished ensemble run; expected a run folder "
                         f"with metrics.json and members/")
    out = {}
    for sub in sorted((run / "members").iterdir()):
        if (sub / "metrics.json").exists():
            out[runs.read_metrics(sub)["experiment"]] = sub
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished runs of one ensemble experiment")
    ap.add_argument("--data", default=None, help="the dataset file the runs trained on (default: cifar4's)")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = ap.parse_args()
    by_split: dict[int, list[tuple[Path, dict[str, Path]]]] = defaultdict(list)
    for r in a.runs:
        own = members_of(r)  # first: a folder that is not a run gets its one-line error
        by_split[int(runs.read_metrics(r)["split"]["seed"])].append((r, own))
    ds = datamod.load(a.data)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for split_seed, group in by_split.items():
            if len(group) < 2:  # no other seed's run on this split to lend a member
                print(f"split seed {split_seed}: one run only ({group[0][0].name}); left out", flush=True)
                continue
            for i, (run, own) in enumerate(group):
                shapes: dict[str, list[Path]] = {"as trained": list(own.values())}
                other = group[(i + 1) % len(group)][1]  # the next seed's run lends its members
                for name, folder in other.items():
                    shapes[f"+ {name}"] = [*own.values(), folder]
                shapes["+ " + " + ".join(other)] = [*own.values(), *other.values()]
                for shape, members in shapes.items():
                    res = make_ensemble(members, out=Path(tmp) / "e", weights="val", data=ds,
                                        overwrite=True)
                    m = res.metrics
                    row = {"split_seed": split_seed, "run": run.name, "shape": shape,
                           "members": [mm["experiment"] for mm in m["members"]],
                           "weights": m["model_options"]["weights"],
                           "val_accuracy": m["val_accuracy"], "test_accuracy": m["test_accuracy"]}
                    emit(row, rows)
    write_rows(rows, a.out)
    print("\n| shape | runs | validation | test |\n|---|---|---|---|")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        rs = [r for r in rows if r["shape"] == shape]
        print(f"| {shape} | {len(rs)} | {mean_std([r['val_accuracy'] for r in rs])} | "
              f"{mean_std([r['test_accuracy'] for r in rs])} |")


if __name__ == "__main__":
    main()
