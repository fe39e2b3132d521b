"""The engine learns, is deterministic for a seed on the CPU, and its callbacks behave as in Keras."""

from __future__ import annotations

import math

import pytest
import torch

from cifar4 import config
from cifar4.errors import ConfigError
from cifar4.training import pipeline
from cifar4.training.callbacks import Callback, CallbackList, EarlyStopping
from cifar4.training.train import lr_factor
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
    seen = _Seen()
    r = pipeline.train(e, tiny, runs_root=tmp_path, progress=False, callbacks=[seen])
    assert all(math.isfinite(h["loss"]) for h in r.history)
    assert seen.logits_dtype == torch.bfloat16  # the steps ran under bf16 autocast


class _Seen(Callback):
    """What the first training step's forward pass was given and gave back."""

    inputs: torch.Tensor | None = None
    logits_dtype: torch.dtype | None = None
    initial: dict[str, torch.Tensor] = {}

    def on_train_begin(self, logs=None):
        self.initial = {k: v.clone() for k, v in self.model.state_dict().items()}

        def seen(module, args, out):
            if module.training and self.inputs is None:
                self.inputs, self.logits_dtype = args[0].detach().clone(), out.dtype
        self.model.register_forward_hook(seen)


def _one_step(tiny, tmp_path, **train):
    """A one-step run (the whole training split is one batch), plain SGD, dropout off."""
    e = config.from_dict({"name": "one", "model": {"name": "mlp-deep", "options": {"dropout": 0.0}},
                          "data": {"train_subset": 64},
                          "train": {"epochs": 1, "batch_size": 64, "optimizer": "sgd", "lr": 0.1,
                                    "precision": "fp32", **train.pop("train", {})}, **train})
    seen = _Seen()
    r = pipeline.train(e, tiny, runs_root=tmp_path, progress=False, callbacks=[seen])
    assert r.metrics["iterations"] == 1
    return seen, {k: v.detach() for k, v in r.model.state_dict().items()}


def test_l2_adds_its_exact_decay_to_the_kernels_and_leaves_biases_alone(tiny, tmp_path):
    """Keras' l2(lam) adds lam * sum(w^2) to the loss: one SGD step at rate lr moves each
    kernel by a further -2 * lr * lam * w, and no bias."""
    lam, lr = 0.05, 0.1
    seen, plain = _one_step(tiny, tmp_path / "a")
    _, l2 = _one_step(tiny, tmp_path / "b", train={"l2": lam})
    kernels = [k for k, v in plain.items() if k.endswith("weight") and v.ndim > 1]
    assert kernels
    for k, v in plain.items():
        expected = -2 * lr * lam * seen.initial[k] if k in kernels else torch.zeros_like(v)
        torch.testing.assert_close(l2[k] - v, expected, atol=1e-6, rtol=1e-4)


def test_augmentation_changes_the_batches_the_model_sees(tiny, tmp_path):
    """The same seed draws the same first batch; with flips, each of its images is the plain
    one or its mirror, and some are mirrored."""
    plain, _ = _one_step(tiny, tmp_path / "a")
    flipped, _ = _one_step(tiny, tmp_path / "b", augment={"flip": True})
    a, b = plain.inputs, flipped.inputs
    assert a is not None and b is not None and a.shape == b.shape and a.ndim == 4
    same = (a == b).flatten(1).all(1)
    mirrored = (a.flip(3) == b).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 0 < int((mirrored & ~same).sum()) < len(a)
    assert plain.logits_dtype == torch.float32  # fp32 asked: no autocast


def _stop_epoch(losses, **kw):
    """Feed val_loss values to EarlyStopping as a fit loop would; (last epoch trained, weight
    left in the model: each epoch's weight is its epoch number)."""
    model = torch.nn.Linear(1, 1)
    es = EarlyStopping("val_loss", **kw)
    CallbackList([es], model, {"epochs": len(losses), "steps": 1, "initial_epoch": 0}, None)
    model.stop_training = False
    es.on_train_begin()
    last = 0
    for epoch, loss in enumerate(losses, start=1):
        if model.stop_training:
            break
        model.weight.data.fill_(epoch)
        es.on_epoch_end(epoch, {"val_loss": loss})
        last = epoch
    es.on_train_end()
    return last, model.weight.item(), es


@pytest.mark.parametrize("patience,stops_at", [(0, 3), (1, 3), (2, 4), (3, 5)])
def test_early_stopping_stops_where_keras_does(patience, stops_at):
    # Keras: `wait` counts epochs without improvement; training stops at the end of the first
    # epoch where wait >= patience (never the first). Best val_loss at epoch 2.
    last, _, es = _stop_epoch([1.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99], patience=patience)
    assert last == stops_at and es.stopped_epoch == stops_at and es.best_epoch == 2


def test_early_stopping_restores_the_best_epoch_only_when_it_stops_training():
    _, weight, es = _stop_epoch([1.0, 0.5, 0.7, 0.8], patience=1, restore_best_weights=True)
    assert weight == 2 and es.stopped_epoch == 3
    _, weight, _ = _stop_epoch([1.0, 0.5, 0.7, 0.8], patience=1)  # Keras' default: no restore
    assert weight == 3
    _, weight, es = _stop_epoch([1.0, 0.5, 0.7], patience=5, restore_best_weights=True)
    assert weight == 3 and es.stopped_epoch is None  # ran out of epochs: last weights, as Keras


def test_early_stopping_has_keras_defaults_and_min_delta():
    es = EarlyStopping()
    assert (es.monitor, es.patience, es.min_delta, es.restore_best_weights) == ("val_loss", 0, 0.0, False)
    last, _, _ = _stop_epoch([1.0, 0.95, 0.9, 0.85], patience=1, min_delta=0.1)
    assert last == 2  # improvements smaller than min_delta do not count


def test_early_stopping_warns_when_the_monitored_key_is_missing():
    es = EarlyStopping("val_auc")
    with pytest.warns(UserWarning, match="val_auc"):
        es.on_epoch_end(1, {"val_loss": 1.0})


def test_model_checkpoint_writes_the_best_epoch_and_the_run_keeps_it(tiny, tmp_path):
    e = exp(epochs=4, checkpoint_best=True)
    r = pipeline.train(e, tiny, runs_root=tmp_path, progress=False)
    best = max(range(4), key=lambda i: (r.history[i]["val_accuracy"], -i))
    assert (r.run_dir / "best.safetensors").is_file()
    assert r.metrics["restored_epoch"] == best + 1
    from cifar4.models.weights import read_weights
    saved = read_weights(r.run_dir / "best.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in r.model.state_dict().items())


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


def test_the_gpu_warm_up_leaves_the_run_as_it_was(tiny, tmp_path, monkeypatch):
    """The warm-up a GPU does before the fit (a copy's steps and a validation pass), done here
    on the CPU: the run's numbers and weights are those of a run without it, dropout,
    augmentation, weight decay and the epoch's partial last batch included."""
    from cifar4.training.train import Trainer
    e = config.from_dict({"name": "w", "model": {"name": "mlp-deep", "options": {"dropout": 0.2}},
                          "train": {"epochs": 2, "batch_size": 48, "optimizer": "sgd", "momentum": 0.9,
                                    "weight_decay": 5e-4, "seed": 3},
                          "augment": {"flip": True, "translate": 2}})
    plain = pipeline.train(e, tiny, runs_root=tmp_path / "plain", progress=False)
    assert plain.metrics["warmup_seconds"] == 0.0  # a CPU does none
    calls = []

    def warm(self, *args):
        calls.append([len(a) for a in args])
        return self._warm(*args)
    monkeypatch.setattr(Trainer, "warm_up", warm)
    warmed = pipeline.train(e, tiny, runs_root=tmp_path / "warmed", progress=False)
    assert calls and warmed.metrics["warmup_seconds"] > 0
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(warmed.history) == strip(plain.history)
    for k, v in plain.model.state_dict().items():
        assert torch.equal(v, warmed.model.state_dict()[k])


def test_the_confusion_matrix_counts_true_classes_by_row_as_scikit_learn_does():
    import numpy as np
    from sklearn.metrics import confusion_matrix

    from cifar4.training.evaluate import summarize
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (500,), generator=g)
    logits = torch.randn(500, 4, generator=g)
    logits[:100, 3] += 5.0  # many predicted as the last class, whatever their label
    out = summarize(logits, y, ("a", "b", "c", "d"))
    want = confusion_matrix(y.numpy(), logits.argmax(1).numpy(), labels=[0, 1, 2, 3])
    assert out["confusion"] == want.tolist()
    assert out["per_class_accuracy"]["b"] == pytest.approx(want[1, 1] / want[1].sum())
    assert np.array(out["confusion"]).sum() == 500


def test_a_callback_sees_the_model_params_and_plan_and_stops_training_as_in_keras(tiny, tmp_path):
    class Watch(Callback):
        def __init__(self):
            self.seen = []

        def on_epoch_end(self, epoch, logs=None):
            self.seen.append((epoch, dict(self.params), self.plan.precision.precision, logs["val_loss"]))
            if epoch == 2:
                self.model.stop_training = True

    w = Watch()
    r = pipeline.train(exp(epochs=5), tiny, runs_root=tmp_path, progress=False, callbacks=[w])
    assert [s[0] for s in w.seen] == [1, 2] and r.metrics["epochs"] == 2  # stopped where it asked
    assert w.seen[0][1]["epochs"] == 5 and w.seen[0][1]["steps"] == r.metrics["steps_per_epoch"]
    assert w.seen[0][1]["initial_epoch"] == 0 and w.seen[0][2] == r.metrics["precision"]
    assert w.model is r.model


def test_a_callback_written_for_the_trainer_still_works_with_a_deprecation_note(tiny, tmp_path):
    class Old(Callback):
        epochs: list[int] = []

        def on_epoch_end(self, trainer, epoch, logs):
            self.epochs = [*self.epochs, epoch]
            trainer.stop_training = epoch == 1

    old = Old()
    with pytest.warns(DeprecationWarning, match="Old: callback hooks that take the trainer are deprecated"):
        r = pipeline.train(exp(epochs=3), tiny, runs_root=tmp_path, progress=False, callbacks=[old])
    assert old.epochs == [1] and r.metrics["epochs"] == 1


def test_a_callback_changes_the_runs_length_through_params_and_the_schedule_follows(tiny, tmp_path):
    """`params["total_steps"]` is the one door through which a callback (the deadline callback
    under a time budget) changes the run's length: the trainer stops there, its epochs follow,
    and the learning-rate schedule is fitted to the new total."""
    class Shorten(Callback):
        def on_batch_begin(self, batch, logs=None):
            self.params["total_steps"] = min(self.params["total_steps"], self.params["steps"] + 3)

        def on_epoch_end(self, epoch, logs=None):
            self.epochs_seen = self.params["epochs"]

    cb = Shorten()
    r = pipeline.train(exp(epochs=5, schedule="linear", optimizer="sgd", lr=0.1), tiny, runs_root=tmp_path,
                       progress=False, callbacks=[cb])
    spe, m = r.metrics["steps_per_epoch"], r.metrics
    assert m["steps"] == spe + 3 and m["epochs"] == m["epochs_planned"] == cb.epochs_seen == 2
    assert r.history[1]["lr"] == pytest.approx(0.1 * lr_factor("linear", 0.0, spe + 3)(spe))


def test_a_run_under_a_time_limit_resumes_to_the_same_result_with_the_plans_it_made(tiny, tmp_path, monkeypatch):
    """The deadline callback's state goes with the run's: a resumed run keeps the steps it had
    planned (the deadline was the interrupted command's) and reports the plans made before."""
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    e = exp(epochs=3, seed=3, time_limit=600)
    full = pipeline.train(e, tiny, runs_root=tmp_path / "full", progress=False)
    with pytest.raises(Died):  # after epoch 2's save
        pipeline.train(e, tiny, run_dir=tmp_path / "part", progress=False, callbacks=[DieAt(2)])
    resumed = pipeline.resume(tmp_path / "part", tiny, progress=False)
    spe, plans = resumed.metrics["steps_per_epoch"], resumed.metrics["time_limit"]["plans"]
    assert plans and all(p["after_steps"] <= 2 * spe for p in plans)  # all from before the interruption
    assert resumed.metrics["steps"] == full.metrics["steps"] == 3 * spe
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k])


def test_a_last_batch_under_a_quarter_joins_the_one_before_and_every_image_is_stepped_on():
    """42,500 images at 256 would end each epoch on a batch of 4: it joins the last full batch
    (166 steps); a larger remainder keeps its own step (CIFAR-4's 16,800: 66 steps)."""
    from cifar4 import models
    from cifar4.data.transforms import Augment, Normalization
    from cifar4.training.callbacks import Callback
    from cifar4.training.train import Trainer, epoch_steps, seed_everything

    assert epoch_steps(42_500, 256) == 166 and epoch_steps(16_800, 256) == 66
    assert epoch_steps(16_800, 32) == 525 and epoch_steps(100, 256) == 1 and epoch_steps(320, 256) == 2
    assert epoch_steps(300, 256) == 1  # 44 left: under a quarter (64)

    class Sizes(Callback):
        def __init__(self):
            self.sizes = []

        def on_batch_end(self, batch, logs=None):
            self.sizes.append(batch)

    n, bs = 2 * 32 + 5, 32
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 4, (n,), generator=g)
    cfg = config.from_dict({"name": "t", "model": {"name": "mlp-20"},
                            "train": {"epochs": 1, "batch_size": bs, "precision": "fp32"}}).train
    seen = []
    model = models.build("mlp-20", num_classes=4)
    forward = model.forward
    model.forward = lambda xb: (seen.append(len(xb)), forward(xb))[1]
    norm = Normalization.from_config("unit", False, x.numpy())
    sizes = Sizes()
    Trainer(model, cfg, norm, Augment(), callbacks=[sizes], generator=seed_everything(0)).fit(x, y, x[:8], y[:8])
    assert sizes.sizes == [1, 2]
    assert seen[:2] == [32, 37]  # the 5 left joined the second batch
