#!/usr/bin/env python3
"""The accuracy / time frontier: test accuracy against whole-command seconds for every preset
measured, from the JSON that presets.py writes (and GPU results in the same shape).

    python benchmarks/frontier.py benchmarks/results/2026-11-27-epyc-zen5-presets.json \
        benchmarks/results/2026-11-27-epyc-zen5-best.json benchmarks/results/2026-11-27-epyc-zen5-budgets.json \
        --gpu benchmarks/results/2026-11-27-h100-fast-long-gpu-tables.json \
        --cpu-name "AMD EPYC (family 26 model 2, Zen 5)" \
        --png docs/benchmarks/img/2026-11-27-epyc-zen5-h100-frontier.png

Members of ensemble runs (their own runs inside the ensemble's folder) are points too: a
member alone is a preset of its own (`transfer`, `fast-24`). A run made with an empty cache
(presets.py --cold: a fresh machine) is a point of its own, "(fresh machine)". Prints a Markdown table: per
preset the mean test accuracy and the mean whole-command seconds, and whether it is on the
frontier (no faster preset is as accurate).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def points(files: list[str]) -> dict[str, list[tuple[float, float]]]:
    """label -> [(seconds, test accuracy)] over the runs."""
    out: dict[str, list[tuple[float, float]]] = {}
    for f in files:
        data = json.loads(Path(f).read_text())
        rows = data["runs"] if isinstance(data, dict) else data
        for r in rows:
            if "error" in r:
                continue
            label = r.get("preset") or r.get("experiment")
            if r.get("time_budget"):
                label = f"{label} --time-budget {r['time_budget']:g}"
            cold = " (fresh machine)" if r.get("cold") else ""
            secs = r.get("whole_command_seconds") or r.get("total_seconds")
            out.setdefault(label + cold, []).append((float(secs), float(r["test_accuracy"])))
            for m in r.get("members", []):
                if m.get("total_seconds"):
                    out.setdefault(f"{m['experiment']} (member){cold}", []).append(
                        (float(m["total_seconds"]), float(m["test_accuracy"])))
    return out


def summarize(pts: dict[str, list[tuple[float, float]]]) -> list[tuple[str, float, float, int]]:
    rows = [(k, statistics.mean(s for s, _ in v), statistics.mean(a for _, a in v), len(v)) for k, v in pts.items()]
    return sorted(rows, key=lambda r: r[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cpu", nargs="+", help="presets.py JSON files measured on the CPU")
    ap.add_argument("--gpu", nargs="*", default=[], help="GPU results (same keys)")
    ap.add_argument("--png", default=None)
    ap.add_argument("--cpu-name", default="2-core AMD EPYC (Zen 4)")
    ap.add_argument("--gpu-name", default="one NVIDIA H100")
    a = ap.parse_args()
    groups = [(a.cpu_name, summarize(points(a.cpu)), "o")]
    if a.gpu:
        groups.append((a.gpu_name, summarize(points(a.gpu)), "s"))
    if a.png:
        fig, ax = plt.subplots(figsize=(8, 4.8))
        for name, rows, marker in groups:
            ax.scatter([r[1] for r in rows], [r[2] for r in rows], marker=marker, label=name)
            for label, secs, acc, _ in rows:
                ax.annotate(label, (secs, acc), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("seconds, command start to metrics.json (mean over runs)")
        ax.set_ylabel("test accuracy (mean over runs)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        ax.set_title("What a minute buys: CIFAR-4 test accuracy against whole-command time")
        fig.tight_layout()
        fig.savefig(a.png, dpi=110)
    for name, rows, _ in groups:
        print(f"\n{name}\n\n| run | runs | whole command s | test accuracy | on the frontier |\n|---|---|---|---|---|")
        best = -1.0
        for label, secs, acc, n in rows:
            front = acc > best
            best = max(best, acc)
            print(f"| {label} | {n} | {secs:.1f} | {acc:.4f} | {'yes' if front else ''} |")


if __name__ == "__main__":
    main()
