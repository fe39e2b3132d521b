#!/usr/bin/env python3
"""The accuracy / time frontier: test accuracy against whole-command seconds for every preset
run in the results files given, one panel per dataset side by side (CIFAR-4, CIFAR-10), one
colour per machine, each point a preset (or a time budget) with its mean +- std over seeds.

    # CIFAR-4 beside CIFAR-10 on the 2-core Zen 4 EPYC
    python benchmarks/frontier.py \\
        benchmarks/results/2026-11-28-epyc-zen4-presets-keras-budgets-49b1d10.json \\
        benchmarks/results/2026-12-06-epyc-zen4-cifar10-presets.json \\
        benchmarks/results/2026-12-06-epyc-zen4-cifar10-budgets.json \\
        --png docs/benchmarks/img/2026-12-06-epyc-zen4-frontier.png --no-members

where the CIFAR-10 files come from

    python benchmarks/presets.py fast best --data ~/.cache/cifar4/cifar10.npz --split official \\
        --seeds 0 1 2 --out benchmarks/results/2026-12-06-epyc-zen4-cifar10-presets.json
    python benchmarks/presets.py fast --budgets 60 180 --data ~/.cache/cifar4/cifar10.npz \\
        --split official --out benchmarks/results/2026-12-06-epyc-zen4-cifar10-budgets.json

and the latest CIFAR-4 series of each machine (2026-11-28) was drawn with

    cd benchmarks/results && python ../frontier.py --no-members \\
        2026-11-28-epyc-zen4-presets-keras-budgets-49b1d10.json \\
        2026-11-28-epyc-zen5-presets-keras-budgets-5078592.json \\
        2026-11-28-xeon-amx-presets-keras-budgets-1a86af9.json 2026-11-28-h100-fast-long-transfer-finetune.json

Every layout of benchmarks/results is read: presets.py's list of runs; a dict that keeps them
under "runs", "presets", "budgets", "time_budget" or "calls"; runs filed under keys of their own
(a variant: "avx2_fast", "before_the_kernel", a described series), labelled with that key
("fast [avx2]") so that they never join the mean of the preset as the machine runs it; and runs
kept as a whole metrics.json beside "whole_seconds". A run named by "experiment" rather than
"preset" counts only as a plain run, not under a key of its own (an ensemble study's parts).
Members of ensemble runs are points too ("transfer (member)"; --no-members leaves them out),
and a run with an empty cache (presets.py --cold) is a point of its own, "(fresh machine)".

The dataset is what presets.py recorded ("dataset": file, classes, images; "split"), or the
classes of a kept metrics.json; runs from before presets.py recorded it are CIFAR-4's, the only
data measured then. The machine is the run's GPU where it ran on one (the row's, or the file's
"device": "one NVIDIA H100 ..."), else its CPU as lscpu names it, with the machine the file's
name gives ("AMD EPYC (epyc-zen4)"); --cpu-name and --gpu-name rename them.

Without --png the figure goes to docs/benchmarks/img/<date>-<machines>-frontier.png, the newest
date and the machines as the results files name them. Prints a Markdown table per dataset:
each point's runs, seconds, accuracy, and whether it is on the frontier (no faster point of its
machine is as accurate).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from cifar4 import plots  # noqa: E402

UNNAMED = {"runs", "presets", "budgets", "time_budget", "calls"}  # keys that hold a machine's plain runs
IMG = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "img"
Run = dict[str, Any]


def walk(data: Any, variant: str = "") -> list[tuple[str, Run]]:
    """(variant, run) for every preset run in a results file, in any of its layouts."""
    if isinstance(data, list):
        return [x for item in data for x in walk(item, variant)]
    if not isinstance(data, dict):
        return []
    if "metrics" in data and "whole_seconds" in data:  # a kept metrics.json
        return [(variant, _from_metrics(data["metrics"], data["whole_seconds"]))]
    # a row of presets.py (a "preset"), or an older plain list's run of an "experiment"
    if _number(data.get("test_accuracy")) and (data.get("preset") or (data.get("experiment") and not variant)):
        return [(variant, data)] if _number(seconds_of(data)) else []
    out = []
    for key, value in data.items():
        name = variant if key in UNNAMED else re.split(r"[:(,]", key)[0].strip()[:32]
        out += walk(value, name)
    return out


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _from_metrics(m: dict[str, Any], whole: float) -> Run:
    machine = m.get("machine") or {}
    return {"preset": m["experiment"], "test_accuracy": m["test_accuracy"], "whole_command_seconds": whole,
            "cpu": machine.get("cpu"), "gpu": machine.get("gpu"), "split": m["split"]["kind"],
            "dataset": {"file": Path(m["data"]["source"]).name, "images": m["data"]["images"],
                        "classes": list(m.get("per_class_accuracy") or {})}}


def dataset_of(r: Run) -> str:
    """The panel a run belongs to: CIFAR-4 where the run predates the dataset's record."""
    d = r.get("dataset")
    if not d:
        return "CIFAR-4"
    if d.get("classes"):
        return plots.dataset_title(d["classes"])
    return {4: "CIFAR-4", 10: "CIFAR-10"}.get(d.get("num_classes", 0), f"{d.get('num_classes')} classes")


def file_gpu(data: Any) -> str | None:
    """The GPU a results file names at its top ("device", "setup"), as NVIDIA's model name."""
    if not isinstance(data, dict):
        return None
    text = json.dumps({k: v for k, v in data.items() if k in ("device", "setup", "gpu")})
    found = re.search(r"NVIDIA [A-Z]\d+(?: \d+GB \w+)?", text)
    return found.group(0) if found else None


def label_of(r: Run, variant: str) -> str:
    label = r.get("preset") or r.get("experiment") or "?"
    budget = r.get("time_budget")
    budget = budget.get("seconds") if isinstance(budget, dict) else budget  # metrics.json's own
    if budget:
        label += f" --time-budget {budget:g}"
    if variant and variant.replace("_", "-") != r.get("preset"):
        label += f" [{variant}]"
    return label + (" (fresh machine)" if r.get("cold") else "")


def seconds_of(r: Run) -> Any:
    """Whole-command seconds: timed around the process where measured, else the run's own."""
    return r.get("whole_command_seconds") or r.get("total_seconds")


def machine_of(r: Run, gpu: str | None, cpu_name: str | None, gpu_name: str | None, file: str = "") -> str:
    """The series a run is drawn in: its GPU, else its CPU (lscpu's model name), with the
    machine its results file names ("AMD EPYC (epyc-zen4)"): lscpu says "AMD EPYC" of a Zen 4
    and a Zen 5 alike."""
    if r.get("gpu") or gpu:
        name, given = gpu_name or r.get("gpu") or gpu or "GPU", gpu_name
    else:
        name, given = cpu_name or r.get("cpu") or "CPU", cpu_name
    slug = describe([file])[1] if file else "results"
    return name if given or slug == "results" else f"{name} ({slug})"


def load(files: list[str], gpu_files: tuple[str, ...] = (), cpu_name: str | None = None,
         gpu_name: str | None = None, about: dict[str, set[str]] | None = None, members: bool = True
         ) -> dict[str, list[tuple[str, str, float, float]]]:
    """dataset -> [(label, machine, seconds, test accuracy)] over every run of the files (GPU
    files, as --gpu names them, are drawn as the GPU whatever their rows say). `about` gathers
    per dataset what the panel's title says: the file, its images, the split, the dates."""
    out: dict[str, list[tuple[str, str, float, float]]] = {}
    about = {} if about is None else about
    for f in list(files) + list(gpu_files):
        data = json.loads(Path(f).read_text())
        gpu = file_gpu(data) or ("GPU" if f in gpu_files else None)
        for variant, r in walk(data):
            machine = machine_of(r, gpu, cpu_name, gpu_name, f)
            rows = out.setdefault(dataset_of(r), [])
            about.setdefault(dataset_of(r), set()).update(_about(r, f))
            rows.append((label_of(r, variant), machine, float(seconds_of(r)), float(r["test_accuracy"])))
            cold = " (fresh machine)" if r.get("cold") else ""
            rows += [(f"{m['experiment']} (member){cold}", machine, float(m["total_seconds"]),
                      float(m["test_accuracy"])) for m in r.get("members") or [] if m.get("total_seconds") and members]
    return out


def _about(r: Run, file: str) -> list[str]:
    d, date = r.get("dataset") or {}, re.match(r"\d{4}-\d{2}-\d{2}", Path(file).name)
    return ([f"{d['file']}, {d['images']:,} images"] if d.get("file") else []) + \
        ([f"{r['split']} split"] if r.get("split") else []) + ([date.group(0)] if date else [])


def describe(files: list[str]) -> tuple[str, str]:
    """(newest date, machines) as the results files' names give them: 2026-12-06-epyc-zen4-... ->
    ('2026-12-06', 'epyc-zen4'); a maker's name (epyc, xeon) takes the word after it too."""
    dates, machines = [], []
    for f in files:
        found = re.match(r"(\d{4}-\d{2}-\d{2})-([a-z0-9]+)(?:-([a-z0-9]+))?", Path(f).name)
        if found:
            dates.append(found.group(1))
            words = found.group(2, 3) if found.group(2) in ("epyc", "xeon") else found.group(2, 2)
            machines.append("-".join(dict.fromkeys(w for w in words if w)))
    return max(dates, default="undated"), "-".join(dict.fromkeys(machines)) or "results"


def table(name: str, points: list[plots.FrontierPoint]) -> str:
    """A dataset's points as Markdown, fastest first, per machine."""
    front = plots.on_frontier(points)
    lines = [f"\n{name}\n", "| machine | run | runs | whole command s | test accuracy | on the frontier |",
             "|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p.series, p.seconds)):
        acc = f"{p.accuracy:.4f}" + (f" +- {p.accuracy_std:.4f}" if p.runs > 1 else "")
        lines.append(f"| {p.series} | {p.label} | {p.runs} | {p.seconds:.1f} | {acc} | "
                     f"{'yes' if (p.series, p.label) in front else ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cpu", nargs="+", help="results JSON files (presets.py's, or any layout above)")
    ap.add_argument("--gpu", nargs="*", default=[], help="results measured on a GPU whose rows do not name it")
    ap.add_argument("--png", default=None, help="the figure (default: docs/benchmarks/img/DATE-MACHINES-frontier.png)")
    ap.add_argument("--no-members", action="store_true", help="leave out ensemble members' own points")
    ap.add_argument("--cpu-name", default=None, help="the CPU's name in the legend (default: lscpu's, as recorded)")
    ap.add_argument("--gpu-name", default=None, help="the GPU's name in the legend (default: as recorded)")
    a = ap.parse_args(argv)
    files = a.cpu + a.gpu
    about: dict[str, set[str]] = {}
    by_data = load(a.cpu, tuple(a.gpu), a.cpu_name, a.gpu_name, about, members=not a.no_members)
    if not by_data:
        raise SystemExit(f"frontier.py: no preset runs in {', '.join(files)}; expected presets.py's JSON")
    date, machines = describe(files)
    order = plots.panel_order(by_data)
    panels = {d: plots.frontier_points(by_data[d]) for d in order}
    names = sorted({p.series for pts in panels.values() for p in pts})
    png = Path(a.png) if a.png else IMG / f"{date}-{machines}-frontier.png"
    titled = {f"{d} ({'; '.join(sorted(about[d], key=lambda t: (t[:2] == '20', t)))})": pts
              for d, pts in panels.items()}
    plots.frontier_panels(titled, png, title="Test accuracy against whole-command time on "
                                             + "; ".join(dict.fromkeys(n.split(" (")[0] for n in names)))
    for d, pts in titled.items():
        print(table(d, pts))
    print(f"\nfigure written: {png}")


if __name__ == "__main__":
    main()
