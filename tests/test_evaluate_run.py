"""`cifar4 evaluate RUN` reports what evaluating the whole model on its split reports, while it
takes the train part's logits from the run, a frozen backbone's features from the feature
cache, and an ensemble's members one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cifar4 import config, runs
from cifar4.data.split import split_indices
from cifar4.training import features, pipeline
from cifar4.training.evaluate import report
from cifar4.training.evaluate_run import evaluate_run

CNN = {"name": "cnn", "model": {"name": "cnn"}, "train": {"epochs": 1, "batch_size": 32, "precision": "fp32"}}
FROZEN = {"name": "frozen", "model": {"name": "transfer", "options": {"weights": "none", "resolution": 32}},
          "train": {"epochs": 1, "batch_size": 32, "precision": "fp32", "tta": 1}}


def _whole_model(run, ds, full_train=False, tta=None):
    """The numbers of the whole model on every part's images: what evaluate computed before."""
    loaded = runs.load_model(run)
    exp = config.from_dict(config.read_toml(run / "config.toml"))
    _, idx = split_indices(exp.data, ds)
    if not full_train:
        n = len(idx["train"])
        idx["train"] = idx["train"][pipeline.sample_positions(n, pipeline.TRAIN_EVAL_ROWS, exp.data.split)]
    tta = exp.train.tta if tta is None else tta
    return {k: report(loaded.model, torch.from_numpy(ds.X[r]), torch.from_numpy(ds.Y[r]), loaded.norm,
                      loaded.classes, precision="fp32", tta=0 if k == "train" else tta) | {"images": len(r)}
            for k, r in idx.items()}


def _same(got, want):
    for k in ("train", "val", "test"):
        assert got[k]["images"] == want[k]["images"] and got[k]["confusion"] == want[k]["confusion"], k
        assert got[k]["loss"] == pytest.approx(want[k]["loss"], rel=1e-4, abs=1e-5), k


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_run_reports_as_the_whole_model_and_reads_its_train_part(tiny, tmp_path, cache, monkeypatch):
    run = pipeline.train(config.from_dict(CNN), tiny, run_dir=tmp_path / "cnn", progress=False).run_dir
    want = _whole_model(run, tiny)
    got = evaluate_run(run, tiny)
    _same(got, want)
    assert set(got) == {"run", "data", "tta", "precision", "device", "split", "train", "val", "test"}
    assert all(set(got[k]) == {"images", "loss", "accuracy", "per_class_accuracy", "confusion"} for k in want)
    _same(evaluate_run(run, tiny, full_train=True), _whole_model(run, tiny, full_train=True))
    # the train part comes from the run's saved logits: changed there, it changes here
    saved = runs.read_predictions(run)
    rows, logits = saved["train"]
    runs.write_predictions(run, {**saved, "train": (rows, -logits)})
    assert evaluate_run(run, tiny)["train"]["accuracy"] != pytest.approx(want["train"]["accuracy"])


def test_a_frozen_backbone_is_evaluated_on_its_cached_features(tiny, tmp_path, cache, monkeypatch):
    run = pipeline.train(config.from_dict(FROZEN), tiny, run_dir=tmp_path / "frozen", progress=False).run_dir
    assert list(cache.rglob("*.npz")), "training cached the features"
    want = _whole_model(run, tiny)
    calls = []
    real = features.CacheFile.read
    monkeypatch.setattr(features.CacheFile, "read", lambda self: calls.append(self.path) or real(self))
    got = evaluate_run(run, tiny)
    _same(got, want)
    assert calls, "the features came from the cache"
    _same(evaluate_run(run, tiny, tta=0), _whole_model(run, tiny, tta=0))


def test_an_ensemble_is_evaluated_member_by_member(tiny, tmp_path, cache, monkeypatch):
    import cifar4.training.evaluate_run as er
    (tmp_path / "cnn.toml").write_text(config.from_dict(CNN).to_toml())
    (tmp_path / "frozen.toml").write_text(config.from_dict(FROZEN).to_toml())
    exp = config.from_dict({"name": "both", "ensemble": {"members": [str(tmp_path / "cnn.toml"),
                                                                     str(tmp_path / "frozen.toml")]},
                            "train": {"precision": "fp32"}})
    run = pipeline.train(exp, tiny, run_dir=tmp_path / "both", progress=False).run_dir
    members, real = [], er._member_logits
    monkeypatch.setattr(er, "_member_logits", lambda *a: members.append(a[1]) or real(*a))
    got, want = evaluate_run(run, tiny), _whole_model(run, tiny)
    assert members == [0, 1]
    for k in ("val", "test"):
        assert got[k]["confusion"] == want[k]["confusion"]
        assert got[k]["loss"] == pytest.approx(want[k]["loss"], rel=1e-4, abs=1e-5)
    assert np.isfinite(got["train"]["loss"])
