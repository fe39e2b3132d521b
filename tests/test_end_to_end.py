"""End to end on the real CIFAR-4 (skipped when ../shared/data/cifar4.npz is absent): the
session's headline results, reproduced by the command a user would type."""

from __future__ import annotations

import json

import pytest

from cifar4 import config
from cifar4.cli import main
from cifar4.training import pipeline

pytestmark = pytest.mark.slow


def test_cnn_7_epochs_reaches_the_sessions_accuracy(real_path, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", "cnn", "--epochs", "7", "--data", str(real_path), "--json", "-q"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["test_accuracy"] >= 0.68, m["test_accuracy"]  # the session: 0.694
    assert m["params"] == 28_612 and m["split"] == {"kind": "session", "seed": 42, "train": 16800,
                                                    "val": 3600, "test": 3600}
    assert m["iterations"] == 7 * 168


def test_raw_pixels_break_the_mlp_scaled_pixels_fix_it(real, tmp_path):
    raw = config.from_dict({"name": "mlp-raw", "model": {"name": "mlp-20"}, "data": {"scale": False},
                            "train": {"epochs": 4}})
    scaled = config.from_dict({"name": "mlp-20", "model": {"name": "mlp-20"}, "train": {"epochs": 4}})
    r = pipeline.train(raw, real, runs_root=tmp_path, progress=False)
    s = pipeline.train(scaled, real, runs_root=tmp_path, progress=False)
    assert r.history[0]["loss"] > 5          # the session saw 59.8 and 76.4: loss in the tens
    assert 0.22 < r.metrics["test_accuracy"] < 0.28
    assert s.metrics["test_accuracy"] > 0.40


def test_same_seed_twice_gives_identical_histories_on_real_data(real, tmp_path):
    e = config.from_dict({"name": "det", "model": {"name": "cnn"}, "train": {"epochs": 2, "seed": 7},
                          "data": {"train_subset": 3000}, "augment": {"flip": True, "rotation": 15,
                                                                         "shift": 0.1}})
    a = pipeline.train(e, real, runs_root=tmp_path / "a", progress=False)
    b = pipeline.train(e, real, runs_root=tmp_path / "b", progress=False)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    assert a.metrics["test_accuracy"] == b.metrics["test_accuracy"]
