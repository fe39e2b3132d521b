"""The accuracy / time frontier: benchmarks/frontier.py reads every layout the results files use
and draws one panel per dataset; the lab report draws the user's runs the same way."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from cifar4 import lab, plots
from cifar4.config import load
from cifar4.data import CIFAR10_CLASSES, from_arrays
from cifar4.lab.report import write_report
from cifar4.training import pipeline
from conftest import make_arrays

BENCH = Path(__file__).parents[1] / "benchmarks"
C10 = {"file": "cifar10.npz", "classes": list(CIFAR10_CLASSES), "num_classes": 10, "images": 60000}


def _row(preset: str, secs: float, acc: float, **more) -> dict:
    return {"preset": preset, "seed": 0, "split_seed": 42, "cold": False, "time_budget": None,
            "test_accuracy": acc, "whole_command_seconds": secs, "total_seconds": secs - 0.5, "cpu": "AMD EPYC",
            **more}


def _metrics_run(experiment: str, secs: float, acc: float) -> dict:
    """A results file's run kept as its whole metrics.json beside the command's seconds."""
    return {"command": f"cifar4 train --preset {experiment}", "whole_seconds": secs,
            "metrics": {"experiment": experiment, "test_accuracy": acc, "total_seconds": secs - 1,
                        "split": {"kind": "session"}, "data": {"source": "/d/cifar4.npz", "images": 24000},
                        "per_class_accuracy": {"bird": 1.0, "cat": 1.0, "frog": 1.0, "horse": 1.0},
                        "machine": {"cpu": "Intel(R) Xeon(R) Processor"}}}


@pytest.fixture
def frontier(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import frontier
    return frontier


def _write(tmp_path: Path, name: str, data) -> str:
    (tmp_path / name).write_text(json.dumps(data))
    return str(tmp_path / name)


def test_frontier_reads_every_results_layout_and_groups_by_dataset(frontier, tmp_path):
    files = [
        _write(tmp_path, "2026-11-26-epyc-zen4-presets.json", [_row("fast", 80, 0.90), _row("fast", 90, 0.92)]),
        _write(tmp_path, "2026-11-27-epyc-zen5-presets.json", {"cpu": "Zen 5", "runs": [_row("fast-long", 200, 0.95)]}),
        _write(tmp_path, "2026-11-28-xeon-amx-presets-keras-budgets.json", {
            "presets": [_row("best", 400, 0.96)], "time_budget": [_row("fast", 30, 0.85, time_budget=30.0)],
            "avx2": [_row("fast", 86, 0.89)], "keras_cnn": [{"experiment": "keras:cnn", "test_accuracy": 0.7}]}),
        _write(tmp_path, "2026-11-28-xeon-amx-best.json", {"runs": {"best old (552a565): presets.py best": [
            _row("best", 480, 0.961)]}}),
        _write(tmp_path, "2026-11-28-h100-fast-long.json", {
            "device": "one NVIDIA H100 80GB HBM3, torch",
            "calls": [{"command": "x", "runs": [_row("fast-long", 20, 0.955)]}]}),
        _write(tmp_path, "2026-12-06-xeon-icelake-presets.json", {"runs": [_metrics_run("fast", 85.0, 0.897)]}),
        _write(tmp_path, "2026-12-06-epyc-zen4-cifar10-presets.json",
               [_row("fast", 95, 0.80, dataset=C10, split="official"),
                _row("fast", 97, 0.82, dataset=C10, split="official")]),
    ]
    by_data = frontier.load(files)
    assert set(by_data) == {"CIFAR-4", "CIFAR-10"}
    zen4, amx = "AMD EPYC (epyc-zen4)", "AMD EPYC (xeon-amx)"
    assert sorted(by_data["CIFAR-10"]) == [("fast", zen4, 95.0, 0.80), ("fast", zen4, 97.0, 0.82)]
    c4 = {(label, machine) for label, machine, _, _ in by_data["CIFAR-4"]}
    assert c4 == {("fast", zen4), ("fast-long", "AMD EPYC (epyc-zen5)"), ("best", amx),
                  ("fast --time-budget 30", amx), ("fast [avx2]", amx), ("best [best old]", amx),
                  ("fast-long", "NVIDIA H100 80GB HBM3 (h100)"), ("fast", "Intel(R) Xeon(R) Processor (xeon-icelake)")}
    assert len(by_data["CIFAR-4"]) == 9  # fast twice on the Zen 4, each other once
    assert frontier.describe(files[-1:]) == ("2026-12-06", "epyc-zen4")
    assert frontier.describe(files) == ("2026-12-06", "epyc-zen4-epyc-zen5-xeon-amx-h100-xeon-icelake")


def test_frontier_draws_a_panel_per_dataset_with_mean_and_std(frontier, tmp_path, capsys):
    c4 = _write(tmp_path, "2026-11-28-epyc-zen4-presets.json",
                {"presets": [_row("fast", 80, 0.90), _row("fast", 90, 0.92), _row("best", 400, 0.96)]})
    c10 = _write(tmp_path, "2026-12-06-epyc-zen4-cifar10-presets.json",
                 [_row("fast", 95, 0.80, dataset=C10, split="official")])
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    frontier.main([c4, "--png", str(one)])
    frontier.main([c4, c10, "--png", str(two)])
    out = capsys.readouterr().out
    assert "\nCIFAR-10 (cifar10.npz, 60,000 images; official split; 2026-12-06)\n" in out
    assert re.search(r"\| AMD EPYC \(epyc-zen4\) \| fast \| 2 \| 85\.0 \| 0\.9100 \+- 0\.0141 \| yes \|", out)
    assert "| AMD EPYC (epyc-zen4) | fast | 1 | 95.0 | 0.8000 | yes |" in out
    w1, w2 = matplotlib.image.imread(one).shape[1], matplotlib.image.imread(two).shape[1]
    assert w2 > 1.7 * w1  # two panels side by side


def test_frontier_points_are_means_with_sample_std_and_the_frontier_is_per_series():
    pts = plots.frontier_points([("fast", "cpu", 80, 0.90), ("fast", "cpu", 90, 0.92), ("best", "cpu", 400, 0.905),
                                 ("fast", "gpu", 5, 0.95)])
    fast = pts[0]
    assert (fast.runs, fast.seconds, fast.accuracy) == (2, 85.0, pytest.approx(0.91))
    assert fast.accuracy_std == pytest.approx(np.std([0.90, 0.92], ddof=1))
    assert plots.on_frontier(pts) == {("cpu", "fast"), ("gpu", "fast")}


def test_frontier_labels_stay_inside_and_apart_and_seconds_read_as_numbers():
    plt = plots._pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    pts = plots.frontier_points([("fast", "", 84.0, 0.913), ("fast (fresh machine)", "", 85.0, 0.911),
                                 ("fast --time-budget 30", "", 30.0, 0.84), ("best (fresh machine)", "", 590.0, 0.96)])
    ax.set_xscale("log")
    plots._frontier_axes(ax, pts)
    offsets = dict(zip([p.label for p in pts], plots._label_offsets(ax, pts), strict=True))
    assert offsets["best (fresh machine)"][2] == "right"  # anchored on its right: it would run off the panel
    assert offsets["fast --time-budget 30"][2] == "left"
    assert offsets["fast"][1] != offsets["fast (fresh machine)"][1]  # the two close labels do not overlap
    assert offsets["fast --time-budget 30"][1] == 3
    fig.canvas.draw()
    shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert shown and all(re.fullmatch(r"\$?\\mathdefault\{\d+\}\$?|\d+", t) for t in shown), shown
    plt.close(fig)


def test_report_draws_the_users_runs_of_two_datasets_side_by_side(tiny, tmp_path):
    entries = lab.run_lab(["mlp-raw"], tiny, tmp_path / "lab", quick=True, progress=False)
    X, _, t = make_arrays(200)
    ten = from_arrays(X, np.arange(200) % 10, t, source="c10.npz", classes=CIFAR10_CLASSES)
    pipeline.train(lab.quick_version(load("mlp-raw")), ten, run_dir=tmp_path / "runs" / "mlp-raw-1", progress=False)
    write_report([(e.name, e.run_dir) for e in entries], tiny, tmp_path / "report", runs_dir=tmp_path / "runs")
    md = (tmp_path / "report" / "report.md").read_text()
    section = md[md.index("What a minute buys"):]
    assert re.search(r"\| CIFAR-4 \| this lab \| mlp-raw \| 1 \|", section)
    assert re.search(rf"\| CIFAR-10 \| {re.escape(str(tmp_path / 'runs'))}/ \| mlp-raw \| 1 \|", section)
    assert "On CIFAR-4, the fastest, mlp-raw (this lab), reached" in section and "on CIFAR-10, the fastest" in section
    fig = matplotlib.image.imread(tmp_path / "report" / "figures" / "frontier.png")
    # the lab's own runs folder as the runs folder: each run drawn once, one dataset, one panel
    write_report([(e.name, e.run_dir) for e in entries], tiny, tmp_path / "alone", runs_dir=tmp_path / "lab" / "runs")
    alone = matplotlib.image.imread(tmp_path / "alone" / "figures" / "frontier.png")
    alone_md = (tmp_path / "alone" / "report.md").read_text()
    alone_md = alone_md[alone_md.index("What a minute buys"):]
    assert fig.shape[1] > 1.7 * alone.shape[1] and "CIFAR-10" not in alone_md
    assert re.search(r"\| CIFAR-4 \| this lab \| mlp-raw \| 1 \|", alone_md) and "runs/ |" not in alone_md


def test_presets_passes_the_split_to_budget_runs_and_records_the_dataset(tmp_path):
    X, _, t = make_arrays(200)
    data = tmp_path / "ten.npz"
    np.savez(data, X=X, Y=np.arange(200) % 10, is_test=t, classes=np.array(CIFAR10_CLASSES))
    out = subprocess.run([sys.executable, str(BENCH / "presets.py"), "mlp-raw", "--budgets", "30",
                          "--data", str(data), "--split", "official", "--out", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    [row] = json.loads((tmp_path / "r.json").read_text())
    assert row["split"] == "official" and row["time_budget"] == 30
    assert row["dataset"] == {"file": "ten.npz", "classes": list(CIFAR10_CLASSES), "num_classes": 10, "images": 200}
