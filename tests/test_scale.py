"""Recipes follow the data they train on: the number of classes and of training images, not
CIFAR-4's four and 16,800 (the plan's outputs, evaluation, data-dependent start and the steps a
time limit's fallback needs)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from cifar4 import config
from cifar4.data import from_arrays
from cifar4.training import pipeline

SMALL_FAST = {"model": {"name": "fast", "options": {"widths": [16, 32, 32]}},
              "train": {"epochs": 1, "batch_size": 8, "optimizer": "sgd", "lr": 0.2, "momentum": 0.85,
                        "nesterov": True, "schedule": "linear", "warmup": 0.2, "precision": "fp32", "tta": 1},
              "data": {"split": "official"}}


def sorted_classes(classes: int = 10, per_class: int = 24):
    """A learnable dataset of `classes` classes stored class by class (as CIFAR-10's .npz is),
    a sixth of each class marked as test."""
    rng = np.random.default_rng(0)
    Y = np.repeat(np.arange(classes), per_class)
    X = rng.integers(0, 80, size=(len(Y), 32, 32, 3), dtype=np.uint8)
    for k in range(classes):
        r, c = divmod(k % 16, 4)
        X[k == Y, r * 8:r * 8 + 8, c * 8:c * 8 + 8, k % 3] = 230
    is_test = np.zeros(len(Y), bool)
    is_test[np.arange(len(Y)) % 6 == 5] = True
    return from_arrays(X, Y.astype(np.int64), is_test, source="sorted",
                       classes=[f"c{k}" for k in range(classes)])


def test_a_ten_class_dataset_is_planned_for_its_classes_and_images(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pipeline, "TRAIN_EVAL_ROWS", 50)  # a sample, smaller than the training split
    ds = sorted_classes()
    r = pipeline.train(config.from_dict({"name": "ten", **SMALL_FAST}), ds, run_dir=tmp_path / "run", progress=False)
    plan = json.loads((r.run_dir / "run.json").read_text())["plan"]
    s = r.metrics["split"]
    assert plan["classes"] == 10 and plan["train_images"] == s["train"]
    assert plan["eval_images"] == 50 + 2 * (s["val"] + s["test"])  # the train sample, val and test x 2 views
    assert plan["steps_per_epoch"] == -(-s["train"] // 8) == r.metrics["steps_per_epoch"]
    assert f"{s['train']:,} training images, 10 classes" in plan["reasons"][0]
    assert "10 outputs" in plan["reasons"][0] and f"final evaluation {plan['eval_images']:,} image views" \
        in plan["reasons"][0]
    assert r.model.head.out_features == 10 and len(r.metrics["per_class_accuracy"]) == 10
    # the train numbers come from a sample of every class, not from the file's first class
    train_rows = np.load(r.run_dir / "predictions.npz")["train_rows"]
    assert r.metrics["train_accuracy_images"] == len(train_rows) == 50
    assert len(np.unique(ds.Y[train_rows])) == 10


def test_the_data_dependent_start_reads_every_class_of_a_file_stored_class_by_class(tmp_path, monkeypatch):
    ds = sorted_classes()
    monkeypatch.setattr(pipeline, "INIT_IMAGES", 40)
    exp = config.from_dict({"name": "ten", **SMALL_FAST})
    run = pipeline._prepare(exp, ds, tmp_path)
    rows = pipeline._init_rows(run)
    assert len(rows) == 40 and len(np.unique(ds.Y[rows])) == 10
    # a shuffled split's first rows are already a random sample: kept as they were
    shuffled = pipeline._prepare(config.from_dict({"name": "ten", **config.merge(SMALL_FAST, {
        "data": {"split": "session"}})}), ds, tmp_path)
    assert np.array_equal(pipeline._init_rows(shuffled), shuffled.idx["train"][:40])
    # the whole training split where it is smaller than the sample
    monkeypatch.setattr(pipeline, "INIT_IMAGES", 10_000)
    assert np.array_equal(pipeline._init_rows(run), run.idx["train"])


def test_the_whitening_is_the_samples(tmp_path, monkeypatch):
    """The fast net's whitening is computed from the sampled rows (all classes), not the first."""
    ds = sorted_classes()
    monkeypatch.setattr(pipeline, "INIT_IMAGES", 40)
    run = pipeline._prepare(config.from_dict({"name": "ten", **SMALL_FAST}), ds, tmp_path)
    pipeline._build_model(run)
    from cifar4.models.fast import Whiten
    want = Whiten()
    want.init_from_data(run.norm.apply(torch.from_numpy(ds.X[pipeline._init_rows(run)])))
    first = Whiten()
    first.init_from_data(run.norm.apply(torch.from_numpy(ds.X[run.idx["train"][:40]])))
    got = run.model.whiten.weight
    assert torch.allclose(got, want.weight) and not torch.allclose(got, first.weight)


@pytest.mark.parametrize("train, reference, batch, needed", [
    (16800, 16800, 256, 297),   # CIFAR-4: 3/4 of 6 epochs of 66 steps, as before
    (42500, 16800, 256, 297),   # CIFAR-10: the steps of CIFAR-4's epochs, not 3/4 of 6 x 167
    (42500, None, 256, 747),    # no reference: 6 epochs of 166 steps (the 4 left join the last batch)
    (1000, 16800, 256, 18),     # a smaller set: its own epochs (3/4 of 6 x 4 steps)
    (42500, 16800, 128, 594),   # a variant's own batch size: twice the steps
])
def test_a_fallback_needs_the_steps_of_the_epochs_on_at_most_the_reference_images(train, reference, batch, needed):
    exp = config.from_dict({"name": "f", "train": {"epochs": 6, "batch_size": 256, "reference_images": reference}})
    cand = exp.model_copy(update={"train": exp.train.model_copy(update={"batch_size": batch})})
    assert pipeline._fit_steps(exp, cand, train) == needed


@pytest.mark.parametrize("reference, used", [(None, 0), (40, None)])
def test_a_time_limit_counts_the_steps_on_the_reference_images(tmp_path, monkeypatch, reference, used):
    """Timed at 0.7 s a step, a 100 s limit fits about 130 steps. 3/4 of 8 epochs of this
    data's 204 training images (26 steps each) are 156 steps: the experiment does not fit and
    its fallback runs. Counted on a reference of 40 images (5 steps an epoch) they are 30: it
    fits. The step time is fixed here so that the rule, not the machine's speed, decides."""
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pipeline, "step_times", lambda *a, **k: [0.7, 0.7, 0.7])
    monkeypatch.setattr(pipeline, "_forward_seconds", lambda *a, **k: 1e-6)
    ds = sorted_classes(4, 72)  # 288 images: 48 test, 36 val, 204 train
    exp = config.from_dict({"name": "f", **config.merge(SMALL_FAST, {
        "train": {"epochs": 8, "time_limit": 100, "reference_images": reference}}),
        "fallbacks": [{"model": {"options": {"widths": [8, 8, 8]}}, "train": {"epochs": 1}}]})
    run = pipeline._prepare(exp, ds, tmp_path)
    assert len(run.idx["train"]) == 204
    chosen, record, _ = pipeline._fit_to_limit(run, time.perf_counter(), None)
    t = record["tried"][0]
    assert t["steps_needed"] == (156 if reference is None else 30) and 30 < t["steps_fit"] < 156
    assert record["used"] == used
    assert chosen.model.options["widths"] == ([8, 8, 8] if used == 0 else [16, 32, 32])


@pytest.mark.parametrize("left, total", [
    (12.0, 70),    # shorter than an epoch: 70 steps and the whole validation (7 + 5 s), not 80 (8 + 5)
    (100.0, 650),  # ends part-way through the 7th epoch: 65 s of steps, 7 validations of 5 s
    (16.2, 100),   # the 2nd epoch's validation would leave 62 steps, fewer than ending with the 1st
    (45.0, 300),   # whole epochs: exactly the spread count (3 x (10 + 5) s)
])
def test_a_time_limit_counts_the_whole_validation_of_an_epoch_cut_part_way(left, total):
    """100 steps an epoch of 0.1 s, a validation pass of 5 s (a large validation split): the
    trainer validates a last, partial epoch whole, so the plan counts that whole pass."""
    from cifar4.training.budget import SAFETY, WRITE_SECONDS, Budget
    b = Budget.starting(1000.0, time.perf_counter(), eval_images=0)
    b.deadline = time.perf_counter() + (left + WRITE_SECONDS) / (1 - SAFETY) + 0.05  # (the clock runs on)
    assert b.fit(0, 0.1, 0.001, 5000, 100) == total


def test_evaluate_and_an_ensemble_measure_the_train_sample_training_measured(tmp_path, monkeypatch):
    """On the official split of a file stored class by class, `cifar4 evaluate` and an ensemble
    take the train rows the final evaluation took (every class), not the split's first ones."""
    from cifar4.training.ensemble import make_ensemble
    from cifar4.training.evaluate_run import evaluate_run
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    import cifar4.training.evaluate_run as er
    monkeypatch.setattr(pipeline, "TRAIN_EVAL_ROWS", 50)
    monkeypatch.setattr(er, "TRAIN_EVAL_ROWS", 50)
    ds = sorted_classes()
    exps = [config.from_dict({"name": f"s{seed}", **config.merge(SMALL_FAST, {"train": {"seed": seed}})})
            for seed in (0, 1)]
    runs = [pipeline.train(e, ds, run_dir=tmp_path / e.name, progress=False) for e in exps]
    rows = np.load(runs[0].run_dir / "predictions.npz")["train_rows"]
    got = evaluate_run(runs[0].run_dir, ds, device="cpu")
    assert got["train"]["images"] == 50 and got["train"]["accuracy"] == pytest.approx(runs[0].metrics["train_accuracy"])
    assert all(sum(row) > 0 for row in got["train"]["confusion"])  # every class among them
    ens = make_ensemble([r.run_dir for r in runs], out=tmp_path / "ens", data=ds, weights="equal")
    assert np.array_equal(np.load(ens.run_dir / "predictions.npz")["train_rows"], rows)


@pytest.mark.parametrize("reference, tta", [(None, 1), (1000, 1), (40, 0)])
def test_a_limits_views_are_chosen_again_where_the_data_outgrew_their_reference(tmp_path, monkeypatch,
                                                                                reference, tta):
    """The final evaluation at the experiment's views (the train sample, and val and test twice:
    372 image views here) at 0.05 s an image would take 18.6 s, over 15% of a 100 s limit; its
    image alone (288 views) fits. The views are cut only where the training set outgrew the
    images they were chosen on: without a reference, or with a larger one, they stay."""
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pipeline, "_forward_seconds", lambda *a, **k: 0.05)
    ds = sorted_classes(4, 72)  # 204 train, 36 val, 48 test
    exp = config.from_dict({"name": "f", **config.merge(SMALL_FAST, {
        "train": {"epochs": 1, "time_limit": 100, "reference_images": reference}})})
    run = pipeline._prepare(exp, ds, tmp_path)
    assert pipeline._eval_images(run) == 372 and pipeline._eval_images(run, tta=0) == 288
    assert pipeline._limit_eval_images(run, exp, time.perf_counter(), 0.05) == (372 if tta else 288)
    plan = pipeline._make_plan(run, time.perf_counter(), None, skippable=False, resumed=False)
    assert plan.exp.train.tta == tta
    assert any("instead of 1" in r for r in plan.reasons) == (tta == 0)


@pytest.mark.parametrize("recalibrate, model", [(2, "fast"), (0, "fast"), (2, "cnn")])
def test_a_deadline_reserves_the_last_epochs_second_validation_where_batch_norm_is_recalibrated(
        tmp_path, monkeypatch, recalibrate, model):
    """The last epoch validates the recalibrated statistics and the running averages (and keeps
    the better): the deadline's final reserve counts that second pass over the validation split
    with the final evaluation, and only where it happens (the fast net has batch norm, the plain
    cnn none)."""
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    ds = sorted_classes(4, 72)  # 204 train, 36 val, 48 test
    recipe = config.merge(SMALL_FAST, {"train": {"time_limit": 100, "bn_recalibrate": recalibrate}})
    if model == "cnn":
        recipe["model"] = {"name": "cnn", "options": {}}
    exp = config.from_dict({"name": "f", **recipe})
    run = pipeline._prepare(exp, ds, tmp_path)
    pipeline._make_plan(run, time.perf_counter(), None, skippable=False, resumed=False)
    run.x = {k: torch.from_numpy(run.ds.X[v]) for k, v in run.idx.items()}
    deadline = pipeline._deadline(run, time.perf_counter(), None, run.norm)
    second = 36 if recalibrate and model == "fast" else 0
    assert deadline.budget.eval_images == pipeline._eval_images(run) + second
