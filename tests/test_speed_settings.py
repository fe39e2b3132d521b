"""Speed settings are measured, not assumed: the precision a CPU run uses (timed once per
machine and model, cached), and `--time-budget`, which fits the number of steps and the
schedule to what the machine does in the time given."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cifar4 import config, models
from cifar4.data.split import split_indices
from cifar4.errors import ConfigError
from cifar4.models import native
from cifar4.training import pipeline, precision
from cifar4.training.train import lr_factor

SMALL_FAST = {"model": {"name": "fast", "options": {"widths": [16, 32, 32]}},
              "train": {"epochs": 2, "batch_size": 32, "optimizer": "sgd", "lr": 0.2, "momentum": 0.85,
                        "nesterov": True, "schedule": "linear", "warmup": 0.2}}


def test_auto_precision_is_measured_once_per_machine_and_model(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "bf16_is_fast", lambda device: True)  # timed even on an AVX2-only CPU
    monkeypatch.setattr(precision, "machine_busy", lambda: False)  # whatever the test machine is doing
    model = models.build("cnn")
    cfg = config.TrainConfig(batch_size=64)
    x = torch.rand(64, 3, 32, 32)
    first = precision.choose("auto", torch.device("cpu"), model, cfg, x)
    assert not first.cached and set(first.seconds) == {"fp32", "bf16"}
    faster = min(first.seconds, key=first.seconds.get)
    if first.precision == "bf16":
        assert faster == "bf16" and first.seconds["bf16"] < (1 - precision.MARGIN) * first.seconds["fp32"]
    assert first.reason.startswith("a training step took")
    again = precision.choose("auto", torch.device("cpu"), model, cfg, x)
    assert again.cached and again.precision == first.precision
    table = json.loads((tmp_path / "precision.json").read_text())
    (key, entry), = table.items()
    assert precision.cpu_name() in key and precision.cpu_features() in key and torch.__version__ in key
    assert entry["precision"] == first.precision
    # another model is measured for itself; an explicit choice is used as given
    assert not precision.choose("auto", torch.device("cpu"), models.build("mlp-20"), cfg,
                                x).cached
    assert precision.choose("fp32", torch.device("cpu"), model, cfg, x).reason == "as asked"


def test_a_precision_measured_on_a_busy_machine_is_used_but_not_kept(tmp_path, monkeypatch):
    """Under a neighbour's load the two precisions are timed in different conditions: the
    answer serves its run, and the next run measures again."""
    import os
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "bf16_is_fast", lambda device: True)
    model, cfg, x = models.build("cnn"), config.TrainConfig(batch_size=32), torch.rand(32, 3, 32, 32)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    monkeypatch.setattr(os, "getloadavg", lambda: (precision.BUSY_LOAD * cores + 1, 0.0, 0.0))
    busy = precision.choose("auto", torch.device("cpu"), model, cfg, x)
    assert not busy.cached and busy.precision in ("fp32", "bf16") and "busy, so not kept" in busy.reason
    assert not (tmp_path / "precision.json").exists()
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert not precision.choose("auto", torch.device("cpu"), model, cfg, x).cached  # measured again, kept
    assert precision.choose("auto", torch.device("cpu"), model, cfg, x).cached


def test_matmul_weight_gradients_match_the_librarys(monkeypatch):
    from cifar4.models import layers
    torch.manual_seed(0)
    calls: list[int] = []
    plain = layers._MatmulWeightGrad.apply
    monkeypatch.setattr(layers._MatmulWeightGrad, "apply", lambda *a: calls.append(1) or plain(*a))
    for c_in, c_out, side, used in [(64, 96, 7, True), (128, 64, 3, True), (32, 64, 7, False), (64, 64, 9, False)]:
        conv = layers.Conv3x3(c_in, c_out).to(memory_format=torch.channels_last)
        x = torch.randn(8, c_in, side, side).to(memory_format=torch.channels_last)
        g = torch.randn(8, c_out, side, side)
        results = []
        for on in (False, True):
            calls.clear()
            layers.matmul_weight_grads(conv, on)
            conv.zero_grad()
            xi = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = conv(xi)
            y.backward(g.to(y.dtype))
            assert bool(calls) == (on and used)  # only small, wide maps take the matmul path
            results.append((y.float(), xi.grad.clone(), conv.weight.grad.clone()))
        (y0, gx0, gw0), (y1, gx1, gw1) = results
        assert torch.equal(y0, y1) and torch.equal(gx0, gx1)  # forward and input gradient: the library's
        assert gw1.dtype == torch.float32 and gw1.shape == gw0.shape
        assert (gw1 - gw0).norm() / gw0.norm() < 1e-2  # bf16 sums in another order
    # in fp32, or without gradients, the layer is the plain convolution
    layers.matmul_weight_grads(conv, True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(conv(x), torch.nn.functional.conv2d(x.bfloat16(), conv.weight.bfloat16(), padding=1))


def test_a_cpu_without_bf16_arithmetic_takes_fp32_untimed(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "bf16_is_fast", lambda device: False)  # as on an AVX2-only CPU
    monkeypatch.setattr(precision, "measure", lambda *a, **k: pytest.fail("measured"))
    choice = precision.choose("auto", torch.device("cpu"), models.build("fast", widths=[16, 32, 32]),
                              config.TrainConfig(batch_size=16), torch.rand(16, 3, 32, 32))
    assert (choice.precision, choice.seconds, choice.matmul_weight_grads) == ("fp32", {}, False)
    assert "no bf16 arithmetic" in choice.reason and precision.cpu_features() in choice.reason
    assert not (tmp_path / "precision.json").exists()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert precision.choose("auto", torch.device("cpu"), models.build("cnn"), config.TrainConfig(),
                            torch.rand(4, 3, 32, 32)).reason.startswith("this CPU (")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # an AVX-512 CPU held below it: the reason says so
    assert precision.choose("auto", torch.device("cpu"), models.build("cnn"), config.TrainConfig(),
                            torch.rand(4, 3, 32, 32)).reason.startswith("oneDNN, held to AVX2 by ONEDNN_MAX_CPU_ISA")
    assert precision.choose("bf16", torch.device("cpu"), models.build("cnn"), config.TrainConfig(),
                            torch.rand(4, 3, 32, 32)).precision == "bf16"  # --precision still rules


def test_a_fast_net_is_also_timed_with_matmul_weight_gradients(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "machine_busy", lambda: False)  # kept, whatever the test machine is doing
    monkeypatch.setattr(precision, "bf16_is_fast", lambda device: True)
    # On a CPU without bf16 arithmetic the bf16 steps are emulated, and whether their warm-up
    # passes for "emulated" (and ends the measurement early) depends on the load: never here
    monkeypatch.setattr(precision, "EMULATED", float("inf"))
    model = models.build("fast", widths=[16, 64, 64])
    seconds = precision.measure(model, torch.rand(16, 3, 32, 32), torch.device("cpu"))
    assert set(seconds) == {"fp32", "bf16", precision.MATMUL}
    choice = precision.choose("auto", torch.device("cpu"), model, config.TrainConfig(batch_size=16),
                              torch.rand(16, 3, 32, 32))
    assert choice.matmul_weight_grads == (choice.precision == "bf16" and choice.seconds[precision.MATMUL]
                                          < (1 - precision.MARGIN) * choice.seconds["bf16"])
    assert "weight gradients as matmuls" in choice.reason
    again = precision.choose("auto", torch.device("cpu"), model, config.TrainConfig(batch_size=16),
                             torch.rand(16, 3, 32, 32))
    assert again.cached and again.matmul_weight_grads == choice.matmul_weight_grads


def test_the_matmul_variant_can_be_asked_for_and_repeats_a_run_without_the_cache(tiny, tmp_path, monkeypatch):
    from cifar4.models import layers
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "measure", lambda *a, **k: pytest.fail("measured"))
    choice = precision.choose(precision.MATMUL, torch.device("cpu"), models.build("fast", widths=[16, 64, 64]),
                              config.TrainConfig(batch_size=16), torch.rand(16, 3, 32, 32))
    assert (choice.precision, choice.seconds, choice.matmul_weight_grads, choice.reason) == \
        ("bf16", {}, True, "as asked")
    assert not precision.choose("bf16", torch.device("cpu"), models.build("fast", widths=[16, 64, 64]),
                                config.TrainConfig(batch_size=16)).matmul_weight_grads
    calls: list[int] = []
    plain = layers._MatmulWeightGrad.apply
    monkeypatch.setattr(layers._MatmulWeightGrad, "apply", lambda *a: calls.append(1) or plain(*a))
    spec = {**SMALL_FAST, "model": {"name": "fast", "options": {"widths": [16, 64, 64]}}}
    runs = {}
    for asked in (precision.MATMUL, "bf16", precision.MATMUL):
        exp = config.from_dict({"name": "f", **spec, "train": {**spec["train"], "precision": asked}})
        del calls[:]
        r = pipeline.train(exp, tiny, runs_root=tmp_path / f"r{len(runs)}", progress=False)
        runs[len(runs)] = r
        assert r.metrics["precision"] == "bf16"
        assert r.metrics["precision_choice"]["asked"] == asked
        assert r.metrics["precision_choice"]["matmul_weight_grads"] == (asked == precision.MATMUL)
        assert bool(calls) == (asked == precision.MATMUL)  # the matmul weight gradients ran, or did not
    assert not (tmp_path / "cache" / "precision.json").exists()
    assert runs[0].history == [{**h, "seconds": runs[0].history[i]["seconds"]} for i, h in enumerate(runs[2].history)]
    with pytest.raises(ConfigError, match="bf16-matmul-wgrad"):
        config.from_dict({"name": "f", **spec, "train": {**spec["train"], "precision": "bf16-matmul"}})


def test_the_measurement_leaves_the_run_untouched(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path))
    model = models.build("cnn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(32, 3, 32, 32)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    precision.choose("auto", torch.device("cpu"), model, config.TrainConfig(batch_size=32), x)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_run_records_its_precision_choice_and_is_reproducible(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "machine_busy", lambda: False)  # the second run reads the first's answer
    exp = config.from_dict({"name": "f", **SMALL_FAST})
    a = pipeline.train(exp, tiny, runs_root=tmp_path / "a", progress=False)
    b = pipeline.train(exp, tiny, runs_root=tmp_path / "b", progress=False)
    assert a.metrics["precision_choice"]["chosen"] == a.metrics["precision"]
    choice = b.metrics["precision_choice"]
    assert choice["cached"] or "no bf16 arithmetic" in choice["reason"]  # AVX2 only: nothing to measure
    assert a.metrics["test_accuracy"] == b.metrics["test_accuracy"] and a.history == [
        {**r, "seconds": a.history[i]["seconds"]} for i, r in enumerate(b.history)]


def test_on_an_avx2_only_cpu_the_run_works_and_measures_there(bigger_npz, tmp_path):
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "CIFAR4_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-m", "cifar4", "train", "-m", "cnn", "--epochs", "1", "--data",
                        str(bigger_npz), "--runs-dir", str(tmp_path / "runs"), "--json", "-q"],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    m = json.loads(p.stdout)
    choice = m["precision_choice"]
    assert choice["chosen"] == m["precision"]
    assert m["machine"]["cpu_features"]
    if "no bf16 arithmetic" in choice["reason"]:  # an AVX2-only CPU: nothing to time
        assert choice["chosen"] == "fp32" and not (tmp_path / "cache" / "precision.json").exists()
    else:  # an AVX-512 CPU held to AVX2: timed (emulated bf16 loses), cached under that limit
        assert "isa=AVX2" in next(iter(json.loads((tmp_path / "cache" / "precision.json").read_text())))
    if choice["chosen"] == "bf16":
        assert choice["step_seconds"]["bf16"] < choice["step_seconds"]["fp32"]
    if native._compiler() is not None:  # the CNN's pooling kernel, built for AVX2 (and cached apart)
        assert m["kernels"]["pool2x2"]["compiled"], m["kernels"]
        assert "-mno-avx512f" in "".join(f.read_text() for f in (tmp_path / "cache").glob("kernels/*/build.ninja"))


def test_a_time_budget_fits_the_steps_and_the_schedule(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    # fp32 as given: on a fresh cache "auto" first times bf16, whose first emulated steps took
    # 6 of the 8 s on a 2-core Cascade Lake Xeon (no bf16 instructions)
    exp = config.from_dict({"name": "f", **config.merge(SMALL_FAST, {"train": {"time_budget": 8,
                                                                                "precision": "fp32"}})})
    r = pipeline.train(exp, tiny, runs_root=tmp_path, progress=False)
    m = r.metrics
    plans = m["time_budget"]["plans"]
    assert plans and plans[0]["after_steps"] == 4
    total = plans[-1]["total_steps"]
    assert m["steps"] == m["iterations"] == total
    spe = m["steps_per_epoch"]
    assert m["epochs"] == -(-total // spe) and m["epochs"] > 2  # tiny epochs: the budget allows many
    assert lr_factor("linear", 0.2, total)(total) == 0.0       # the schedule ends where training does
    assert m["epochs_planned"] == m["epochs"]


@pytest.mark.parametrize("epochs", [2, 4])
def test_a_run_that_falls_behind_within_an_epoch_is_planned_again_there(tiny, tmp_path, monkeypatch, epochs):
    """A host that slows down in the second epoch, the last (2) or not (4): the trainer notices
    at its next check (every REPLAN_EVERY steps), not at the epoch's end, and the run ends there."""

    from cifar4.training.budget import REPLAN_EVERY, Deadline

    class TimeRunsOut(Deadline):
        """The run's own deadline callback, whose deadline is suddenly behind it before the
        sixth step of the second epoch."""

        epoch = 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
            super().on_epoch_begin(epoch, logs)

        def on_batch_begin(self, batch, logs=None):
            if self.epoch == 2 and batch == 5 and self.budget is not None:
                self.budget.deadline = time.perf_counter() - 1000
            super().on_batch_begin(batch, logs)

    monkeypatch.setattr(pipeline, "Deadline", TimeRunsOut)
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    exp = config.from_dict({"name": "f", **config.merge(SMALL_FAST, {"train": {"batch_size": 4, "time_limit": 600,
                                                                               "epochs": epochs}})})
    m = pipeline.train(exp, tiny, runs_root=tmp_path, progress=False).metrics
    spe, plans = m["steps_per_epoch"], m["time_limit"]["plans"]
    assert spe > 2 * REPLAN_EVERY
    assert m["steps"] == spe + REPLAN_EVERY == plans[-1]["total_steps"] == plans[-1]["after_steps"]
    assert m["epochs"] == 2 and plans[-2]["total_steps"] == epochs * spe  # the limit fitted until then


def test_plans_before_the_first_validation_time_the_inference_once(tiny, tmp_path, monkeypatch):
    """A one-epoch run under a limit is planned after 4 steps and again every REPLAN_EVERY
    steps; the inference pass those plans need is timed once, then validation counts (twice
    after the last epoch: with the recalibrated batch-norm statistics and with the running
    averages, the model keeping the better)."""
    from cifar4.training import budget as budgetmod
    from cifar4.training import train as trainmod

    calls: list[int] = []
    real = trainmod.evaluate

    def counted(model, x, *a, **k):
        calls.append(len(x))
        return real(model, x, *a, **k)

    for module in (trainmod, budgetmod):  # the validation, and the deadline callback's timing
        monkeypatch.setattr(module, "evaluate", counted)
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    exp = config.from_dict({"name": "f", **config.merge(SMALL_FAST, {"train": {"batch_size": 4, "epochs": 1,
                                                                               "time_limit": 600}})})
    m = pipeline.train(exp, tiny, runs_root=tmp_path, progress=False).metrics
    assert len(m["time_limit"]["plans"]) >= 3 and m["steps"] == m["steps_per_epoch"]  # plans at 4, 16, 32, ...
    val = m["split"]["val"]
    assert calls == [min(256, val), val, val]  # one probe, then the last epoch's two validations


def test_a_budget_spent_before_training_is_a_clear_error(tiny, tmp_path):
    exp = config.from_dict({"name": "f", **config.merge(SMALL_FAST, {"train": {"time_budget": 1}})})
    with pytest.raises(ConfigError, match="time budget 1 s"):
        pipeline.train(exp, tiny, runs_root=tmp_path, progress=False, started=time.perf_counter() - 5)


def test_a_time_limit_spent_before_training_ends_the_run_with_one_epoch(tiny, tmp_path, monkeypatch):
    """A limit is a ceiling (an ensemble member's share, after a slow feature extraction on a
    busy host, found it spent): the run ends with one epoch instead of an error after minutes."""
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    exp = config.from_dict({"name": "f", **config.merge(SMALL_FAST, {"train": {"epochs": 4, "time_limit": 2}})})
    m = pipeline.train(exp, tiny, runs_root=tmp_path, progress=False, started=time.perf_counter() - 5).metrics
    assert m["epochs"] == 1 and m["steps"] == m["steps_per_epoch"]
    assert m["time_limit"]["max_epochs"] == 1 and m["time_limit"]["spent_before_training"] >= 5
    assert m["test_accuracy"] is not None


def test_a_time_limit_that_fits_keeps_the_epochs_and_their_numbers(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    # three epochs of small batches: the checks between plans run in the middle epoch too
    small = config.merge(SMALL_FAST, {"train": {"epochs": 3, "batch_size": 4}})
    plain = config.from_dict({"name": "f", **small})
    limited = config.from_dict({"name": "f", **config.merge(small, {"train": {"time_limit": 600}})})
    a = pipeline.train(plain, tiny, runs_root=tmp_path / "a", progress=False).metrics
    b = pipeline.train(limited, tiny, runs_root=tmp_path / "b", progress=False).metrics
    assert "time_limit" not in a and b["time_limit"]["max_epochs"] == 3 and b["time_limit"]["plans"]
    assert b["epochs"] == a["epochs"] == 3 and b["steps"] == a["steps"] == 3 * a["steps_per_epoch"]
    assert b["test_accuracy"] == a["test_accuracy"] and b["val_loss"] == a["val_loss"]  # the same run


def test_a_time_limit_keeps_its_epochs_while_early_plans_fall_a_little_short():
    """The first plans rest on the slowest steps: a limit keeps its epochs while the shortfall
    is within a tolerance that shrinks as the run goes on, so a run that fits in the end is the
    unlimited run (its schedule not cut and restored). Late, or by much, it cuts; a --time-budget
    (a target, not a ceiling) follows every plan."""
    from cifar4.training.budget import LIMIT_TOLERANCE, Budget

    def plan(max_epochs, done, fits):  # 10 steps a second, 100 a epoch; time for `fits` more steps
        b = Budget.starting(1.0, time.perf_counter(), eval_images=0, max_epochs=max_epochs)
        b.deadline = time.perf_counter() + (fits * 0.1 + 2.5) / (1 - 0.03)  # (WRITE_SECONDS, SAFETY)
        return b.steps(done, 0.1, 0.0, 0, 100)

    assert plan(6, 4, 596 * (1 - LIMIT_TOLERANCE / 2)) == 600  # early, a little short: all 6 epochs
    assert plan(6, 4, 596 * (1 - 2 * LIMIT_TOLERANCE)) < 600 - 0.2 * 596  # early, far short: cut
    assert plan(6, 500, 100 * (1 - LIMIT_TOLERANCE / 2)) < 600  # in the last epoch: cut to what fits
    assert plan(None, 4, 596 * (1 - LIMIT_TOLERANCE / 2)) < 600  # a budget follows the plan


def test_a_time_limit_that_does_not_fit_shortens_the_run(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    exp = config.from_dict({"name": "f", **config.merge(SMALL_FAST, {"train": {"epochs": 5000, "time_limit": 6}})})
    m = pipeline.train(exp, tiny, runs_root=tmp_path, progress=False).metrics
    spe, total = m["steps_per_epoch"], m["time_limit"]["plans"][-1]["total_steps"]
    assert m["steps"] == total < 5000 * spe and m["epochs"] == -(-total // spe)
    assert lr_factor("linear", 0.2, total)(total) == 0.0  # the schedule still ends where training does


def test_a_budget_cuts_the_test_time_views_that_would_take_too_much_of_it():
    """At its first plan a budget keeps the most test-time views whose final evaluation takes at
    most EVAL_SHARE of the time left (the fewest where none does), and plans with their cost; a
    time limit's views are the experiment's."""
    from cifar4.training.budget import EVAL_SHARE, SAFETY, WRITE_SECONDS, Budget

    views = {2: 6000, 1: 2000, 0: 1000}

    def first_plan(image_seconds, limit=False):
        b = Budget.starting(1.0, time.perf_counter(), 6000 if limit else views, max_epochs=6 if limit else None)
        b.deadline = time.perf_counter() + (100 + WRITE_SECONDS) / (1 - SAFETY)  # 100 s left to train and evaluate
        b.steps(4, 0.01, image_seconds, 0, 100)
        return b

    share = EVAL_SHARE * 100 * 0.99  # (the clock moves a little between the deadline and the plan)
    b = first_plan(share / 6000)
    assert b.tta == 2 and not b.views_cut() and b.plans[0]["tta"] == 2
    b = first_plan(share / 2000)  # six views too slow, two fit
    assert b.tta == 1 and b.views_cut() and b.eval_images == 2000
    assert b.plans[0]["final_eval_seconds"] == pytest.approx(share, rel=0.01)
    b = first_plan(10 * share / 1000)  # none fits: the fewest
    assert b.tta == 0 and b.summary()["tta"] == 0
    more = b.steps(50, 0.01, 10 * share / 1000, 0, 100)  # later plans keep the choice
    assert b.tta == 0 and len(b.plans) == 2 and "tta" not in b.plans[1] and more >= 50
    b = first_plan(share / 1000 * 10, limit=True)  # a limit: the experiment's views, whatever they cost
    assert b.tta is None and b.eval_images == 6000 and "tta" not in b.summary()


@pytest.mark.parametrize("share, tta", [(0.0, 0), (1e9, 2)])
def test_a_budget_run_is_evaluated_and_recorded_with_the_views_it_chose(tiny, tmp_path, monkeypatch, share, tta):
    """The views a budget chose are the run's: its final numbers, metrics.json, config.toml (so
    that `cifar4 evaluate` gives the same numbers) and, for a run interrupted after the choice,
    the resumed run's."""
    from cifar4.training import budget as budgetmod
    from cifar4.training.evaluate_run import evaluate_run
    from conftest import DieAt, Died

    monkeypatch.setattr(budgetmod, "EVAL_SHARE", share)
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    exp = config.from_dict({"name": "f", **config.merge(SMALL_FAST, {"train": {"time_budget": 8, "tta": 2}})})
    m = pipeline.train(exp, tiny, runs_root=tmp_path / "a", progress=False).metrics
    assert m["tta"] == m["time_budget"]["tta"] == m["time_budget"]["plans"][0]["tta"] == tta
    folder = next((tmp_path / "a").iterdir())
    assert config.read_toml(folder / "config.toml")["train"]["tta"] == tta
    again = evaluate_run(folder, tiny)
    assert again["tta"] == tta and again["val"]["accuracy"] == m["val_accuracy"]
    assert again["val"]["loss"] == pytest.approx(m["val_loss"], rel=1e-6)

    orig = pipeline._callbacks
    monkeypatch.setattr(pipeline, "_callbacks", lambda *a, **k: orig(*a, **k) + [DieAt(2)])
    with pytest.raises(Died):
        pipeline.train(exp, tiny, run_dir=tmp_path / "part", progress=False)
    monkeypatch.setattr(pipeline, "_callbacks", orig)
    # the plan chose the views before training, and config.toml holds them from the start
    assert config.read_toml(tmp_path / "part" / "config.toml")["train"]["tta"] == tta
    resumed = pipeline.resume(tmp_path / "part", tiny, progress=False).metrics
    assert resumed["tta"] == tta and config.read_toml(tmp_path / "part" / "config.toml")["train"]["tta"] == tta


def test_seeds_under_a_budget_start_from_the_first_seeds_views(tiny, tmp_path, monkeypatch):
    """`--seeds` with `--time-budget`: the first seed's budget chooses the views, the later seeds
    start from that choice (their own budget may only cut further), so the summary's mean is
    over runs evaluated alike; the summary lists each run's level."""
    from cifar4.lab.seeds import train_seeds
    from cifar4.training import budget as budgetmod

    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(budgetmod, "EVAL_SHARE", 0.0)  # the first seed cuts to one view
    orig = pipeline.train

    def then_views_are_free(*a, **k):  # after the first run, a budget would keep all six
        r = orig(*a, **k)
        monkeypatch.setattr(budgetmod, "EVAL_SHARE", 1e9)
        return r

    monkeypatch.setattr(pipeline, "train", then_views_are_free)
    exp = config.from_dict({"name": "f", **config.merge(SMALL_FAST, {"train": {"time_budget": 8, "tta": 2}})})
    res = train_seeds(exp, tiny, [0, 1], tmp_path / "runs", progress=False)
    assert [r.metrics["tta"] for r in res.runs] == res.summary["tta"] == [0, 0]
    assert config.read_toml(res.runs[1].run_dir / "config.toml")["train"]["tta"] == 0


def test_epochs_given_lift_a_presets_time_limit():
    assert config.load("fast").train.time_limit == 87
    assert config.load("fast", {"train": {"epochs": 9}}).train.time_limit == 0
    assert config.from_flags("fast", {"epochs": 9}).train.time_limit == 0
    assert config.from_flags("fast", {"epochs": 9, "time_limit": 50}).train.time_limit == 50
    assert config.from_flags("fast", {"time_limit": 0}).train.time_limit == 0
    assert config.from_flags("fast", {"epochs": 9}, sets=["train.time_limit=40"]).train.time_limit == 40
    with pytest.raises(ConfigError, match="time_limit"):
        config.from_flags("fast", {"time_limit": -1})


def test_fallbacks_are_checked_as_variants_of_the_experiment(tmp_path):
    base = {"name": "f", **config.merge(SMALL_FAST, {"train": {"time_limit": 60}})}
    for fallbacks, expected in [([{"data": {"split": "official"}}], "fallbacks[0] sets data.split; a fallback's "
                                 "data table sets only data.train_subset"),
                                ([{"dataset": {}}], "fallbacks[0] sets 'dataset'"),
                                ([{"data": {"train_subset": 0}}], "experiment fallbacks[0]: data.train_subset"),
                                ([{"train": {"tta": 1}}, {"model": {"options": {"widths": [8, 8]}}}],
                                 "experiment fallbacks[1]: model 'fast' cannot be built"),
                                ([{"train": {"epochs": 0}}], "experiment fallbacks[0]: train.epochs")]:
        with pytest.raises(ConfigError, match=re.escape(expected)):
            config.from_dict({**base, "fallbacks": fallbacks})
    exp = config.from_dict({**base, "fallbacks": [{"model": {"options": {"widths": [8, 8, 8]}}}]})
    assert exp.fallback(0).model.options["widths"] == [8, 8, 8] and exp.fallback(0).fallbacks == []
    (tmp_path / "f.toml").write_text(exp.to_toml())
    assert config.load(tmp_path / "f.toml").fallbacks == exp.fallbacks
    assert "fallbacks" not in config.from_dict(base).to_dict()  # runs without them write as before
    assert config.load("fast").fallbacks  # the preset has them


def test_a_fallbacks_training_subset_is_a_ceiling():
    """A lighter variant never reads more training rows than the experiment it stands in for."""
    base = {"name": "f", **config.merge(SMALL_FAST, {"train": {"time_limit": 60}}),
            "fallbacks": [{"data": {"train_subset": 500}}]}
    assert config.from_dict(base).fallback(0).data.train_subset == 500
    small = config.from_dict({**base, "data": {"train_subset": 200}})
    assert small.fallback(0).data.train_subset == 200
    assert config.from_dict({**base, "data": {"train_subset": 900}}).fallback(0).data.train_subset == 500
    assert small.fallback(0).fallbacks == [] and small.fallbacks == base["fallbacks"]


def test_a_fallback_on_fewer_training_images_trains_on_those(tiny, tmp_path, monkeypatch):
    """Where no variant fits, the last one runs: here one that reads 96 of the training rows. The
    plan is made for it (steps per epoch, its timing's epochs), the run trains and evaluates on
    those rows, validation and test stay the experiment's, and config.toml holds the subset, so
    that --resume and cifar4 evaluate read the same rows."""
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    exp = config.from_dict({"name": "f", **config.merge(SMALL_FAST, {"train": {"epochs": 100000, "time_limit": 600}}),
                            "fallbacks": [{"model": {"options": {"widths": [8, 8, 8]}}, "train": {"epochs": 1},
                                           "data": {"train_subset": 96}}]})
    full = split_indices(exp.data, tiny)[1]
    assert len(full["train"]) > 96
    r = pipeline.train(exp, tiny, runs_root=tmp_path, progress=False)
    plan = json.loads((r.run_dir / "run.json").read_text())["plan"]
    assert plan["fallback"] == 0 and plan["train_images"] == 96 and plan["steps_per_epoch"] == 3
    assert any("data.train_subset=96" in why for why in plan["reasons"])
    assert config.load(r.run_dir / "config.toml").data.train_subset == 96
    assert r.metrics["split"]["train"] == 96 and r.metrics["train_accuracy_images"] == 96
    assert [r.metrics["split"][part] for part in ("val", "test")] == [len(full["val"]), len(full["test"])]
    assert r.metrics["steps_per_epoch"] == 3 and r.metrics["iterations"] == 3


@pytest.mark.parametrize("epochs, used", [(1, None), (100000, 1)])
def test_a_time_limit_takes_the_first_variant_that_fits(tiny, tmp_path, monkeypatch, epochs, used):
    """One epoch of tiny data fits 600 s on any machine; 75,000 epochs fit none: then the last
    fallback runs, untimed, after the experiment and the first fallback were timed."""
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    exp = config.from_dict({"name": "f", **config.merge(SMALL_FAST, {"train": {"epochs": epochs, "time_limit": 600}}),
                            "fallbacks": [{"model": {"options": {"widths": [8, 16, 16]}}},
                                          {"model": {"options": {"widths": [8, 8, 8]}}, "train": {"epochs": 1}}]})
    from cifar4 import io as cio
    written, atomic_open = [], cio.atomic_open
    monkeypatch.setattr(cio, "atomic_open", lambda path, *a, **k: (written.append(Path(path).name),
                                                                   atomic_open(path, *a, **k))[1])
    r = pipeline.train(exp, tiny, runs_root=tmp_path, progress=False)
    assert written.count("config.toml") == written.count("run.json") == 1  # the plan, written once
    plan = json.loads((r.run_dir / "run.json").read_text())["plan"]
    assert plan["fallback"] == used and plan["precision"] == r.metrics["precision"]
    assert any("fallbacks[1] instead" in why for why in plan["reasons"]) == (used is not None)
    fb = r.metrics["fallback"]
    assert fb["used"] == used and fb["fits"] == config.FALLBACK_FITS
    assert [t["fallback"] for t in fb["tried"]] == ([None] if used is None else [None, 0])
    assert all(t["step_seconds"] > 0 and t["image_seconds"] > 0 for t in fb["tried"])
    widths = [16, 32, 32] if used is None else [8, 8, 8]
    assert r.metrics["model_options"]["widths"] == widths and r.metrics["epochs"] == 1
    ran = config.load(r.run_dir / "config.toml")
    assert ran.model.options["widths"] == widths and ran.fallbacks == []  # what ran; --resume continues it
    # without a limit the experiment runs as written
    r = pipeline.train(exp.model_copy(update={"train": exp.train.model_copy(update={"time_limit": 0, "epochs": 1})}),
                       tiny, runs_root=tmp_path / "nolimit", progress=False)
    assert "fallback" not in r.metrics and r.metrics["model_options"]["widths"] == [16, 32, 32]


def test_a_gpu_table_is_checked_and_yields_to_what_the_user_sets(tmp_path):
    base = {"name": "f", **SMALL_FAST}
    for gpu, expected in [({"data": {"split": "official"}}, "gpu sets 'data'"),
                          ({"train": {"batch_size": 0}}, "experiment gpu: train.batch_size")]:
        with pytest.raises(ConfigError, match=re.escape(expected)):
            config.from_dict({**base, "gpu": gpu})
    with pytest.raises(ConfigError, match="ensemble's gpu table"):
        config.from_dict({"name": "e", "ensemble": {"members": ["fast", "cnn"]}, "gpu": {"train": {"lr": 1.0}}})
    exp = config.from_dict({**base, "gpu": {"train": {"batch_size": 64, "lr": 0.5}}})
    g = exp.on_gpu()
    assert (g.train.batch_size, g.train.lr, g.gpu) == (64, 0.5, {})
    assert (exp.train.batch_size, exp.train.lr) == (SMALL_FAST["train"]["batch_size"], SMALL_FAST["train"]["lr"])
    (tmp_path / "f.toml").write_text(exp.to_toml())
    assert config.load(tmp_path / "f.toml").gpu == exp.gpu
    assert "gpu" not in config.from_dict(base).to_dict()
    # a key the user sets holds on a GPU too; the rest of the table stays
    for e in (config.load(tmp_path / "f.toml", {"train": {"batch_size": 32}}),
              config.from_flags(tmp_path / "f.toml", {"batch_size": 32}),
              config.from_flags(tmp_path / "f.toml", sets=["train.batch_size=32"])):
        assert e.gpu == {"train": {"lr": 0.5}} and e.on_gpu().train.batch_size == 32
    assert config.from_flags(tmp_path / "f.toml", {"model": "cnn"}).gpu == {}  # another model
    # an ensemble's shared keys hold in its members' GPU variants
    (tmp_path / "m.toml").write_text(config.from_dict(
        {**base, "name": "m", "gpu": {"train": {"precision": "bf16", "epochs": 9, "lr": 0.3}}}).to_toml())
    ens = config.from_dict({"name": "e", "ensemble": {"members": [str(tmp_path / "m.toml"), "cnn"],
                                                       "epochs_scale": 0.5}, "train": {"precision": "fp32"}})
    m = pipeline.member_experiment(ens, str(tmp_path / "m.toml"))
    assert m.gpu == {"train": {"lr": 0.3}}
    # so do the lab's quick settings and a sweep trial's sampled values
    from cifar4.lab import quick_version
    from cifar4.lab.sweep import trial_experiment
    q = quick_version(config.load(tmp_path / "m.toml"))
    assert q.gpu == {"train": {"precision": "bf16", "lr": 0.3}} and q.on_gpu().train.epochs == q.train.epochs == 1
    t = trial_experiment(config.load(tmp_path / "m.toml"), {"train.lr": 0.05}, 3)
    assert t.gpu == {"train": {"precision": "bf16", "epochs": 9}} and t.on_gpu().train.lr == 0.05


def test_a_run_on_a_gpu_trains_and_records_the_gpu_variant(tiny, tmp_path, monkeypatch):
    """The device is a CPU here: only the check for a GPU is replaced, the run is real."""
    exp = config.from_dict({"name": "f", **config.merge(SMALL_FAST, {"train": {"epochs": 1}}),
                            "gpu": {"train": {"batch_size": 40}, "model": {"options": {"widths": [8, 8, 8]}}}})
    r = pipeline.train(exp, tiny, runs_root=tmp_path, progress=False)
    assert "gpu" not in r.metrics and r.metrics["model_options"]["widths"] == [16, 32, 32]
    monkeypatch.setattr(pipeline, "_on_gpu", lambda e: True)
    r = pipeline.train(exp, tiny, runs_root=tmp_path, progress=False)
    assert r.metrics["gpu"] == exp.gpu and r.metrics["model_options"]["widths"] == [8, 8, 8]
    ran = config.load(r.run_dir / "config.toml")
    assert ran.train.batch_size == 40 and ran.gpu == {}  # what ran: a resume continues it as it ran


def test_a_budget_given_to_a_trainer_is_still_followed_with_a_deprecation_note(tiny, tmp_path):
    """Trainer(budget=...) from before the Deadline callback: the trainer adds one at fit, says
    so once, and the run is fitted to the budget."""
    from cifar4.data.transforms import Augment, Normalization
    from cifar4.training.budget import Budget
    from cifar4.training.train import Trainer, seed_everything

    cfg = config.from_dict({"name": "f", **config.merge(SMALL_FAST, {"train": {"epochs": 50,
                                                                               "precision": "fp32"}})}).train
    x = torch.from_numpy(tiny.X)
    y = torch.from_numpy(tiny.Y)
    model = models.build("fast", num_classes=4, widths=[16, 32, 32])
    norm = Normalization.from_config("unit", True, tiny.X)
    trainer = Trainer(model, cfg, norm, Augment(), callbacks=[], generator=seed_everything(0),
                      budget=Budget.starting(4.0, time.perf_counter(), eval_images=0, max_epochs=50))
    with pytest.warns(DeprecationWarning, match=r"Trainer\(budget=...\) is deprecated"):
        history = trainer.fit(x, y, x[:64], y[:64])
    spe = -(-len(x) // cfg.batch_size)
    assert trainer.total_steps < 50 * spe and len(history.rows) == trainer.epochs  # cut to the 4 s
