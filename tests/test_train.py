"""The engine learns, is deterministic for a seed on the CPU, and its callbacks behave as in Keras."""

from __future__ import annotations

import math

import pytest
import torch

from cifar4 import config, pipeline
from cifar4.callbacks import EarlyStopping
from cifar4.errors import ConfigError
from cifar4.train import lr_factor
from conftest import DieAt, Died


def exp(**train):
    base = {"name": "t", "model": {"name": "cnn"}, "train": {"epochs": 3, "batch_size": 32, **train}}
    return config.from_dict(base)


def test_training_learns_a_learnable_problem(tiny, tmp_path):
    r = pipeline.train(exp(epochs=6), tiny, runs_root=tmp_path, progress=False)
    assert r.metrics["train_accuracy"] > 0.9 and r.metrics["test_accuracy"] > 0.8
    assert [h["epoch"] for h in r.history] == list(range(1, 7))
    assert set(r.history[0]) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds", "lr"}


def test_same_seed_same_history_other_seed_differs(tiny, tmp_path):
    a = pipeline.train(exp(seed=5), tiny, runs_root=tmp_path / "a", progress=False)
    b = pipeline.train(exp(seed=5), tiny, runs_root=tmp_path / "b", progress=False)
    c = pipeline.train(exp(seed=6), tiny, runs_root=tmp_path / "c", progress=False)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    assert strip(a.history) != strip(c.history)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k])


@pytest.mark.parametrize("opt", ["adam", "sgd", "rmsprop"])
def test_each_optimizer_runs_with_keras_default_lr(tiny, tmp_path, opt):
    r = pipeline.train(exp(optimizer=opt, epochs=1), tiny, runs_root=tmp_path, progress=False)
    assert r.history[0]["lr"] == {"adam": 1e-3, "sgd": 1e-2, "rmsprop": 1e-3}[opt]


def test_l2_and_augmentation_and_bf16_train(tiny, tmp_path):
    e = config.from_dict({"name": "r", "model": {"name": "mlp-deep", "options": {"dropout": 0.1}},
                          "train": {"epochs": 2, "batch_size": 32, "l2": 1e-4, "precision": "bf16",
                                    "schedule": "linear", "warmup": 0.2, "label_smoothing": 0.1},
                          "augment": {"flip": True, "rotation": 15, "shift": 0.1}})
    r = pipeline.train(e, tiny, runs_root=tmp_path, progress=False)
    assert all(math.isfinite(h["loss"]) for h in r.history)


def test_early_stopping_stops_and_restores_best():
    class T:  # the slice of a Trainer the callback touches
        stop_training = False
        restored_epoch = None
        model = torch.nn.Linear(1, 1)

        class history:
            rows = [1, 2, 3, 4]
    es = EarlyStopping("val_loss", patience=1)
    t = T()
    for epoch, loss in enumerate([1.0, 0.5, 0.7, 0.8], start=1):
        t.model.weight.data.fill_(epoch)
        es.on_epoch_end(t, epoch, {"val_loss": loss})
    assert t.stop_training and es.best_epoch == 2
    es.on_train_end(t)
    assert t.model.weight.item() == 2 and t.restored_epoch == 2


def test_early_stopping_in_a_run(tiny, tmp_path):
    e = exp(epochs=30, early_stopping={"monitor": "val_accuracy", "patience": 0})
    r = pipeline.train(e, tiny, runs_root=tmp_path, progress=False)
    assert r.metrics["epochs"] < 30


def test_batch_larger_than_training_set_is_an_error(tiny, tmp_path):
    with pytest.raises(ConfigError, match="larger than the training set"):
        pipeline.train(exp(batch_size=10_000), tiny, runs_root=tmp_path, progress=False)


def test_schedules():
    f = lr_factor("linear", 0.25, 100)
    assert f(0) == pytest.approx(1 / 25) and f(24) == 1.0 and f(99) == pytest.approx(1 / 75, abs=0.02)
    assert lr_factor("constant", 0, 10)(5) == 1.0
    assert lr_factor("cosine", 0, 10)(10) == pytest.approx(0.0)


def test_resume_continues_to_the_same_result(tiny, tmp_path):
    full = pipeline.train(exp(epochs=4, seed=3), tiny, runs_root=tmp_path / "full", progress=False)
    # The same run dies in epoch 2 (an exception, standing in for a kill), then resumes.
    e2 = exp(epochs=4, seed=3)

    orig = pipeline._callbacks
    pipeline._callbacks = lambda *a, **k: orig(*a, **k) + [DieAt(2)]
    try:
        with pytest.raises(Died):
            pipeline.train(e2, tiny, run_dir=tmp_path / "part", progress=False)
    finally:
        pipeline._callbacks = orig
    # DieAt(2) fires before the per-epoch saver, so epoch 1 is the last complete epoch.
    resumed = pipeline.resume(tmp_path / "part", tiny, progress=False)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)
    assert resumed.metrics["resumed_from_epoch"] == 1
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k])
