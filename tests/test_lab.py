"""The lab runs the session's experiments resumably and writes a report from measured results."""

from __future__ import annotations

import pytest

from cifar4 import lab
from cifar4.config import load
from cifar4.errors import ConfigError
from cifar4.lab.report import compare_runs, verdict, write_report
from cifar4.training import pipeline
from conftest import DieAt, Died


def test_every_session_experiment_exists_and_quick_shrinks_it():
    for name in lab.SESSION:
        e = load(name)
        q = lab.quick_version(e)
        assert q.data.train_subset == 2000 and q.train.epochs == max(1, -(-e.train.epochs // 6))
        if e.model.name == "transfer":  # the backbone at 96 px at most; the native 32 px stays
            res = e.model.options.get("resolution", 160)
            assert q.model.options["resolution"] == min(res, 96)
            assert {k: v for k, v in q.model.options.items() if k != "resolution"} == \
                {k: v for k, v in e.model.options.items() if k != "resolution"}


def test_lab_skips_finished_experiments(tiny, tmp_path):
    names = ["mlp-raw", "cnn"]
    first = lab.run_lab(names, tiny, tmp_path / "lab", quick=True, progress=False)
    assert [e.status for e in first] == ["trained", "trained"]
    stamp = (first[1].run_dir / "model.safetensors").stat().st_mtime_ns
    again = lab.run_lab(names, tiny, tmp_path / "lab", quick=True, progress=False)
    assert [e.status for e in again] == ["done", "done"]
    assert (first[1].run_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_lab_resumes_an_interrupted_experiment(tiny, tmp_path):
    exp = lab.quick_version(load("cnn-overfit"))  # 4 epochs in quick mode
    with pytest.raises(Died):
        pipeline.train(exp, tiny, run_dir=tmp_path / "lab" / "runs" / exp.name, progress=False,
                       callbacks=[DieAt(1)])
    out = lab.run_lab(["cnn-overfit"], tiny, tmp_path / "lab", quick=True, progress=False)
    assert out[0].status == "resumed" and out[0].metrics["epochs"] == 4
    assert out[0].metrics["resumed_from_epoch"] == 1


def test_lab_refuses_to_mix_versions(tiny, tmp_path):
    lab.run_lab(["mlp-raw"], tiny, tmp_path / "lab", quick=True, progress=False)
    with pytest.raises(ConfigError, match="another version"):
        lab.run_lab(["mlp-raw"], tiny, tmp_path / "lab", quick=False, progress=False)
    with pytest.raises(ConfigError, match="unknown"):
        lab.run_lab(["nope"], tiny, tmp_path / "lab2", quick=True, progress=False)


def test_report_has_every_section_and_embedded_figures(tiny, tmp_path):
    entries = lab.run_lab(["mlp-raw", "mlp-20", "cnn"], tiny, tmp_path / "lab", quick=True, progress=False)
    page = write_report([(e.name, e.run_dir) for e in entries], tiny, tmp_path / "report")
    text = page.read_text()
    for needle in ("The dataset", "mlp-raw", "MLP vs CNN", "Overfitting verdict", "iterations",
                   "(3072 + 1) x 20", "Why it fails", "data:image/png;base64,"):
        assert needle in text, needle
    md = (tmp_path / "report" / "report.md").read_text()
    assert "![mlp-raw training curves](figures/mlp-raw-curves.png)" in md
    assert (tmp_path / "report" / "figures" / "samples.png").exists()
    rows = compare_runs([e.run_dir for e in entries], tmp_path / "cmp.png")
    assert [r["experiment"] for r in rows] == ["mlp-raw", "mlp-20", "cnn"] and (tmp_path / "cmp.png").exists()


def test_verdicts():
    hist = [{"val_loss": v} for v in (1.0, 0.8, 0.7, 0.75, 0.8, 0.9)]
    assert verdict({"train_accuracy": 0.9, "val_accuracy": 0.7}, hist)[0] == "overfitting"
    flat = [{"val_loss": v} for v in (1.0, 0.8, 0.7, 0.69, 0.68)]
    assert verdict({"train_accuracy": 0.72, "val_accuracy": 0.70}, flat)[0] == "no overfitting"
    assert verdict({"train_accuracy": 0.25, "val_accuracy": 0.24}, flat)[0].startswith("underfitting")
