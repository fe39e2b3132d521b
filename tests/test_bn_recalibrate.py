"""Batch-norm recalibration before each validation (train.bn_recalibrate): the validation curve
and the saved model use statistics of the current weights; the training itself is unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from cifar4 import config
from cifar4.training import pipeline
from cifar4.training.batchnorm import updated as updated_batch_norms
from cifar4.training.callbacks import Callback
from conftest import DieAt, Died


def exp(recalibrate: int, model: str = "cnn", epochs: int = 2, **options):
    return config.from_dict({"name": "bn", "model": {"name": model, "options": {"batchnorm": True, **options}},
                             "train": {"epochs": epochs, "batch_size": 32, "seed": 4,
                                       "bn_recalibrate": recalibrate}})


class Stale(Callback):
    """Leaves the batch norms' running statistics far from the activations after every step,
    as averages that lag fast-moving weights do (here to the extreme)."""

    def on_batch_end(self, batch, logs=None):
        for m in updated_batch_norms(self.model):
            m.running_mean.fill_(100.0)
            m.running_var.fill_(1.0)


def strip(h):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in h]


def buffers(model):
    return {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_recalibration_makes_validation_use_the_current_statistics(tiny, tmp_path):
    stale = pipeline.train(exp(0), tiny, runs_root=tmp_path / "a", progress=False, callbacks=[Stale()])
    fixed = pipeline.train(exp(2), tiny, runs_root=tmp_path / "b", progress=False, callbacks=[Stale()])
    # the same training: batch norm steps on each batch's own statistics
    assert [(r["loss"], r["accuracy"]) for r in stale.history] == [(r["loss"], r["accuracy"]) for r in fixed.history]
    assert stale.history[-1]["accuracy"] > 0.8
    # stale statistics: every unit below zero after batch norm, one class for all images
    assert stale.history[-1]["val_accuracy"] < 0.4 and stale.metrics["test_accuracy"] < 0.4
    # recalibrated: the curve and the model saved and evaluated follow the weights
    assert fixed.history[-1]["val_accuracy"] > 0.8 and fixed.metrics["test_accuracy"] > 0.8
    for m in updated_batch_norms(fixed.model):
        assert m.running_mean.abs().max() < 50


def test_recalibration_changes_only_the_statistics_and_is_deterministic(tiny, tmp_path):
    """Dropout and batch norm: the recalibration draws no random number, so the weights and
    the training numbers are those of a run without it; the same seed gives the same statistics."""
    kw = {"model": "mlp-deep", "hidden": [64, 32], "dropout": 0.3}
    off = pipeline.train(exp(0, **kw), tiny, runs_root=tmp_path / "off", progress=False)
    a = pipeline.train(exp(3, **kw), tiny, runs_root=tmp_path / "a", progress=False)
    b = pipeline.train(exp(3, **kw), tiny, runs_root=tmp_path / "b", progress=False)
    assert [(r["loss"], r["accuracy"]) for r in off.history] == [(r["loss"], r["accuracy"]) for r in a.history]
    for name, p in off.model.named_parameters():
        assert torch.equal(p, dict(a.model.named_parameters())[name]), name
    assert any(not torch.equal(v, buffers(a.model)[k]) for k, v in buffers(off.model).items())
    assert strip(a.history) == strip(b.history)
    for k, v in buffers(a.model).items():
        assert torch.equal(v, buffers(b.model)[k])


def test_off_the_running_statistics_are_the_training_averages(tiny, tmp_path):
    """bn_recalibrate = 0: the statistics are the running averages the training steps left."""
    seen = []

    class Last(Callback):
        def on_batch_end(self, batch, logs=None):
            seen.append({k: v.clone() for k, v in buffers(self.model).items()})
    r = pipeline.train(exp(0, epochs=1), tiny, runs_root=tmp_path, progress=False, callbacks=[Last()])
    for k, v in buffers(r.model).items():
        assert torch.equal(v, seen[-1][k])
    assert "final_statistics" not in r.metrics  # nothing was recalibrated, nothing chosen


def test_a_resumed_run_recalibrates_to_the_same_result(tiny, tmp_path):
    full = pipeline.train(exp(2, epochs=3), tiny, runs_root=tmp_path / "full", progress=False)
    orig = pipeline._callbacks
    pipeline._callbacks = lambda *a, **k: orig(*a, **k) + [DieAt(2)]
    try:
        with pytest.raises(Died):
            pipeline.train(exp(2, epochs=3), tiny, run_dir=tmp_path / "part", progress=False)
    finally:
        pipeline._callbacks = orig
    resumed = pipeline.resume(tmp_path / "part", tiny, progress=False)
    assert strip(resumed.history) == strip(full.history)
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_the_setting_is_checked_and_recorded(tmp_path, tiny):
    with pytest.raises(ValidationError):
        config.TrainConfig(bn_recalibrate=-1)
    assert config.TrainConfig().bn_recalibrate == 4
    r = pipeline.train(exp(3, epochs=1), tiny, runs_root=tmp_path, progress=False)
    assert "bn_recalibrate = 3" in (r.run_dir / "config.toml").read_text()


@pytest.mark.slow
def test_two_gloo_processes_keep_the_statistics_recalibrated_at_the_final_weights(bigger_npz, tmp_path):
    """Under torchrun every rank recalibrates on the same rows, and rank 0's statistics become
    everyone's: the saved model holds the statistics of its own weights on those rows (a rank's
    steps see half a batch, whose running averages would differ)."""
    import contextlib
    import os
    import subprocess
    import sys

    from cifar4 import data as datamod
    from cifar4.data.split import split_indices
    from cifar4.runs import load_model
    from cifar4.training import batchnorm

    run = tmp_path / "two"
    e = exp(2, epochs=2)
    cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "cifar4", "train",
           "--model", "cnn", "--set", "model.options.batchnorm=true", "--set", "train.bn_recalibrate=2",
           "--epochs", "2", "--batch-size", "32", "--seed", "4", "--precision", "fp32", "--data", str(bigger_npz),
           "--run-dir", str(run), "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = load_model(run)
    saved = {k: v.clone() for k, v in buffers(loaded.model).items()}
    ds = datamod.load(bigger_npz)
    _, idx = split_indices(e.data, ds)
    x = loaded.norm.apply(torch.from_numpy(ds.X[idx["train"]])).permute(0, 2, 3, 1)
    batchnorm.recalibrate(loaded.model, x, batchnorm.rows(len(x), e.train), 32, contextlib.nullcontext)
    for k, v in buffers(loaded.model).items():
        torch.testing.assert_close(saved[k], v, rtol=1e-4, atol=1e-5)


def test_the_last_epoch_keeps_the_statistics_that_validate_better(tiny, tmp_path, monkeypatch):
    """After the last epoch the model keeps the running averages where they validate better
    than the recalibrated statistics (here a recalibration made worthless on purpose): the
    model saved and evaluated has the training's own. (One epoch: a worthless recalibration
    after an earlier epoch would be carried into the running averages too.)"""
    from cifar4.training import batchnorm
    real = batchnorm.recalibrate

    def worthless(model, *a, **k):
        norms = real(model, *a, **k)
        for m in norms:
            m.running_mean.fill_(100.0)
        return norms
    monkeypatch.setattr(batchnorm, "recalibrate", worthless)
    run = pipeline.train(exp(2, epochs=1), tiny, runs_root=tmp_path, progress=False)
    assert run.history[-1]["val_accuracy"] > 0.7 and run.metrics["test_accuracy"] > 0.7
    assert all(m.running_mean.abs().max() < 50 for m in updated_batch_norms(run.model))
    assert run.metrics["final_statistics"] == "running"
    saved = json.loads((run.run_dir / "metrics.json").read_text())
    assert saved["final_statistics"] == "running"
