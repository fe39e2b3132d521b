"""An ensemble is a run: averaged probabilities, weights given, equal or chosen on validation,
a run folder that evaluate, predict, export and the lab read like any other, and ensemble
experiments that train their members."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cifar4 import config, runs
from cifar4.errors import ConfigError, RunError
from cifar4.serving.predict import predict
from cifar4.training import ensemble as ens
from cifar4.training import pipeline
from cifar4.training.evaluate_run import evaluate_run

MEMBERS = {
    "cnn": {"model": {"name": "cnn"}, "train": {"epochs": 2, "batch_size": 32}},
    "fast": {"model": {"name": "fast", "options": {"widths": [16, 32, 32]}},
             "train": {"epochs": 2, "batch_size": 32, "tta": 2}, "data": {"standardize": True}},
}


@pytest.fixture
def members(tiny, tmp_path):
    out = []
    for name, d in MEMBERS.items():
        r = pipeline.train(config.from_dict({"name": name, **d}), tiny, runs_root=tmp_path / "runs",
                           progress=False)
        out.append(r)
    return out


def test_runs_save_their_final_logits(members, tiny):
    r = members[1]
    saved = runs.read_predictions(r.run_dir)
    assert saved is not None and set(saved) == {"train", "val", "test"}
    rows, logits = saved["test"]
    assert float((logits.argmax(1) == tiny.Y[rows]).mean()) == pytest.approx(r.metrics["test_accuracy"])


def test_equal_weights_average_the_members_probabilities(members, tiny, tmp_path):
    res = ens.make_ensemble([m.run_dir for m in members], out=tmp_path / "e", data=tiny)
    p = [torch.softmax(torch.from_numpy(runs.read_predictions(m.run_dir)["test"][1]), 1) for m in members]
    rows = runs.read_predictions(m.run_dir)["test"][0] if (m := members[0]) else None
    want = ((p[0] + p[1]) / 2).argmax(1).numpy()
    assert res.metrics["test_accuracy"] == pytest.approx(float((want == tiny.Y[rows]).mean()))
    assert res.metrics["model_options"]["weights"] == [0.5, 0.5]
    assert set(runs.RUN_FILES) <= {p.name for p in (tmp_path / "e").iterdir()}
    # the saved model reproduces the recorded numbers from the images alone
    again = evaluate_run(tmp_path / "e", tiny, device="cpu")
    assert again["test"]["accuracy"] == pytest.approx(res.metrics["test_accuracy"], abs=1.5 / len(rows))
    assert again["val"]["accuracy"] == pytest.approx(res.metrics["val_accuracy"], abs=1.5 / len(rows))


def test_weights_chosen_on_validation_never_look_at_test(members, tiny, tmp_path):
    res = ens.make_ensemble([m.run_dir for m in members], out=tmp_path / "v", weights="val", data=tiny)
    w = res.metrics["model_options"]["weights"]
    assert res.metrics["weights_chosen"] == "validation" and sum(w) == pytest.approx(1)
    val = [torch.from_numpy(runs.read_predictions(m.run_dir)["val"][1]) for m in members]
    y = torch.from_numpy(tiny.Y[runs.read_predictions(members[0].run_dir)["val"][0]])
    best = max(float((ens.combine_probs(val, [a, 1 - a]).argmax(1) == y).float().mean())
               for a in np.linspace(0, 1, 21))
    assert res.metrics["val_accuracy"] == pytest.approx(best)


def test_an_ensemble_run_predicts_and_exports(members, tiny, tmp_path):
    res = ens.make_ensemble([m.run_dir for m in members], out=tmp_path / "e", weights=[0.7, 0.3], data=tiny)
    from PIL import Image
    files = []
    for i in range(4):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(tiny.X[i]).save(files[-1])
    preds = predict(tmp_path / "e", files)
    assert len(preds) == 4 and all(abs(sum(p.probabilities.values()) - 1) < 1e-4 for p in preds)
    pytest.importorskip("onnxruntime")
    from cifar4.serving.export import export
    rep = export(tmp_path / "e", data=tiny)
    assert rep.agreement >= 0.999
    assert res.metrics["members"][0]["weight"] == pytest.approx(0.7)


def test_bad_member_lists_are_one_line_errors(members, tiny, tmp_path):
    a, b = members[0].run_dir, members[1].run_dir
    with pytest.raises(ConfigError, match="at least two runs"):
        ens.make_ensemble([a], data=tiny, runs_root=tmp_path)
    with pytest.raises(ConfigError, match="at least one run; got 0"):  # an ensemble experiment's
        ens.make_ensemble([], data=tiny, runs_root=tmp_path, experiment=config.load("fast-long"))
    with pytest.raises(ConfigError, match="named twice"):
        ens.make_ensemble([a, a], data=tiny, runs_root=tmp_path)
    with pytest.raises(ConfigError, match="one weight per member"):
        ens.make_ensemble([a, b], weights=[1.0], data=tiny, runs_root=tmp_path)
    other = pipeline.train(config.from_dict({"name": "cnn", **MEMBERS["cnn"], "data": {"split_seed": 7}}),
                           tiny, runs_root=tmp_path / "runs", progress=False)
    with pytest.raises(RunError, match="expected the same validation and test rows"):
        ens.make_ensemble([a, other.run_dir], data=tiny, runs_root=tmp_path)


def test_a_member_on_fewer_training_rows_joins_on_the_same_validation_and_test_rows(members, tiny, tmp_path):
    """A member trained on a subset of the training rows (as a time limit's fallback does) is
    weighed and tested on the same rows as the others; the ensemble's train accuracy is measured
    on rows that every member trained on, and it records the largest training set."""
    full = members[0]
    few = pipeline.train(config.from_dict({"name": "cnn", **MEMBERS["cnn"], "data": {"train_subset": 64}}),
                         tiny, runs_root=tmp_path / "runs", progress=False)
    assert few.metrics["split"]["train"] == 64 < full.metrics["split"]["train"]
    res = ens.make_ensemble([full.run_dir, few.run_dir], out=tmp_path / "e", data=tiny)
    saved = runs.read_predictions(tmp_path / "e")
    assert set(saved["train"][0]) <= set(runs.read_predictions(few.run_dir)["train"][0])
    for part in ("val", "test"):
        assert np.array_equal(saved[part][0], runs.read_predictions(full.run_dir)[part][0])
    assert res.metrics["split"]["train"] == full.metrics["split"]["train"]
    assert res.metrics["train_accuracy_images"] == 64
    held = pipeline.train(config.from_dict({"name": "cnn", **MEMBERS["cnn"], "data": {"eval_subset": 20}}),
                          tiny, runs_root=tmp_path / "runs", progress=False)
    with pytest.raises(RunError, match="20 validation and test rows.*expected the same validation and test rows"):
        ens.make_ensemble([full.run_dir, held.run_dir], data=tiny, runs_root=tmp_path)


def test_the_command_line(members, tiny_npz, tmp_path):
    a, b = str(members[0].run_dir), str(members[1].run_dir)
    cmd = [sys.executable, "-m", "cifar4", "ensemble", a, b, "--data", str(tiny_npz)]
    p = subprocess.run([*cmd, "--weights", "0.6,x", "--runs-dir", str(tmp_path / "r")], capture_output=True, text=True)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "--weights '0.6,x'" in p.stderr
    p = subprocess.run([*cmd, "--weights", "val", "--run-dir", str(tmp_path / "ens"), "--json"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["weights_chosen"] == "validation"


def test_an_ensemble_experiment_trains_its_members(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, d in MEMBERS.items():
        (tmp_path / f"{name}.toml").write_text(config.from_dict({"name": name, **d}).to_toml())
    exp = config.from_dict({"name": "both", "ensemble": {"members": ["cnn.toml", "fast.toml"], "weights": "val"},
                            "train": {"seed": 3}, "data": {"split_seed": 5}})
    res = pipeline.train(exp, tiny, run_dir=tmp_path / "both", progress=False)
    subs = sorted(p.name for p in (tmp_path / "both" / "members").iterdir())
    assert subs == ["1-cnn", "2-fast"]
    for s in subs:
        m = runs.read_metrics(tmp_path / "both" / "members" / s)
        assert m["seed"] == 3 and m["split"]["seed"] == 5
    assert res.metrics["weights_chosen"] == "validation"
    assert config.from_dict(config.read_toml(tmp_path / "both" / "config.toml")).ensemble is not None


def test_an_ensembles_time_limit_is_shared_by_its_members(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, d in MEMBERS.items():
        (tmp_path / f"{name}.toml").write_text(config.from_dict({"name": name, **d}).to_toml())
    exp = config.from_dict({"name": "both", "ensemble": {"members": ["cnn.toml", "fast.toml"]},
                            "train": {"time_limit": 400}})
    t0 = time.perf_counter()
    res = pipeline.train(exp, tiny, run_dir=tmp_path / "both", progress=False, started=t0 - 50)
    first = runs.read_metrics(tmp_path / "both" / "members" / "1-cnn")
    last = runs.read_metrics(tmp_path / "both" / "members" / "2-fast")
    # the first: what was left of 400 s (50 already spent before the call), less the combining
    # and the least the last member gets; the last: all that was left when it started, less the combining
    most = 400 - 50 - pipeline.ENSEMBLE_SECONDS - pipeline.MIN_MEMBER_SECONDS
    assert most - 2 <= first["time_limit"]["seconds"] <= most
    limit, most = last["time_limit"]["seconds"], 400 - 50 - pipeline.ENSEMBLE_SECONDS
    assert most - (time.perf_counter() - t0) <= limit <= most - first["total_seconds"] + 0.1
    assert last["epochs"] == last["time_limit"]["max_epochs"]  # tiny members fit
    assert res.metrics["total_seconds"] >= 50


def test_ensemble_experiments_set_only_what_they_share():
    with pytest.raises(ConfigError, match="belongs to the members"):
        config.from_dict({"name": "x", "ensemble": {"members": ["fast", "cnn"]}, "train": {"epochs": 3}})
    with pytest.raises(ConfigError, match="itself an ensemble"):
        config.from_dict({"name": "x", "ensemble": {"members": ["fast", "fast-long"]}})
    with pytest.raises(ConfigError, match="one per member"):
        config.from_dict({"name": "x", "ensemble": {"members": ["fast", "cnn"], "weights": [1.0]}})


def test_the_lab_trains_resumes_and_reports_an_ensemble(tiny, tmp_path, monkeypatch):
    from cifar4 import lab
    from cifar4.lab.report import write_report
    monkeypatch.chdir(tmp_path)
    for name, d in MEMBERS.items():
        (tmp_path / f"{name}.toml").write_text(config.from_dict({"name": name, **d}).to_toml())
    (tmp_path / "pair.toml").write_text('name = "pair"\n[ensemble]\nmembers = ["cnn.toml", "fast.toml"]\n')
    # an interruption after the first member: the lab keeps it and trains the second
    exp = lab.quick_version(config.load("pair.toml"))
    folder = tmp_path / "lab" / "runs" / "pair"
    first = pipeline.member_experiment(exp, "cnn.toml")
    pipeline.train(first, tiny, run_dir=folder / "members" / "1-cnn", progress=False)
    (folder / pipeline.ENSEMBLE_FILE).write_text(exp.to_toml())
    kept = (folder / "members" / "1-cnn" / "metrics.json").read_text()
    entries = lab.run_lab(["pair.toml", "cnn.toml"], tiny, tmp_path / "lab", quick=True, progress=False)
    assert entries[0].status == "resumed" and (folder / "members" / "1-cnn" / "metrics.json").read_text() == kept
    assert entries[0].metrics["model"] == "ensemble"
    index = write_report([(e.name, e.run_dir) for e in entries], tiny, tmp_path / "report")
    html = index.read_text()
    md = (tmp_path / "report" / "report.md").read_text()
    assert "pair" in html and "What a minute buys" in html and "frontier.png" in md


def test_an_earlier_member_leaves_a_later_one_half_its_own_limit():
    """fast-long: transfer first may take what fast-15 (175 s of its own) does not need, less
    half of fast-15's limit; a later member without a limit of its own keeps the least (30 s)."""
    first, later = config.load("transfer"), config.load("fast-15")
    got = pipeline._member_limit(first, 355, [later]).train.time_limit
    assert got == 355 - pipeline.ENSEMBLE_SECONDS - later.train.time_limit / 2
    unlimited = later.model_copy(update={"train": later.train.model_copy(update={"time_limit": 0})})
    assert pipeline._member_limit(first, 355, [unlimited]).train.time_limit == \
        355 - pipeline.ENSEMBLE_SECONDS - pipeline.MIN_MEMBER_SECONDS
    # the last member gets all that is left, up to its own limit
    assert pipeline._member_limit(later, 100, []).train.time_limit == 100 - pipeline.ENSEMBLE_SECONDS
    assert pipeline._member_limit(later, 400, []).train.time_limit == later.train.time_limit


def _pair(tmp_path, **ensemble):
    for name, d in MEMBERS.items():
        (tmp_path / f"{name}.toml").write_text(config.from_dict({"name": name, **d}).to_toml())
    return config.from_dict({"name": "pair", "ensemble": {"members": ["cnn.toml", "fast.toml"], **ensemble}})


def test_a_distilled_member_learns_from_the_earlier_ones(tiny, tmp_path, monkeypatch):
    """ensemble.distill: the later member's targets mix its labels with the earlier member's
    softened probabilities on its training rows; it trains otherwise as it would alone."""
    from cifar4.training.distill import teacher_targets
    monkeypatch.chdir(tmp_path)
    plain = pipeline.train(_pair(tmp_path), tiny, run_dir=tmp_path / "plain", progress=False)
    exp = _pair(tmp_path, distill=0.4, distill_temperature=3.0)
    pipeline.train(exp, tiny, run_dir=tmp_path / "taught", progress=False)
    first = runs.read_metrics(tmp_path / "taught" / "members" / "1-cnn")
    second = runs.read_metrics(tmp_path / "taught" / "members" / "2-fast")
    assert "distill" not in first and "distill" not in runs.read_metrics(plain.run_dir / "members" / "2-fast")
    d = second["distill"]
    assert d["weight"] == 0.4 and d["temperature"] == 3.0 and d["teachers"] == ["1-cnn"] and d["seconds"] > 0
    # the first member trained as it does without distillation; the second learned other weights
    assert first["val_accuracy"] == runs.read_metrics(plain.run_dir / "members" / "1-cnn")["val_accuracy"]
    taught = runs.read_predictions(tmp_path / "taught" / "members" / "2-fast")["val"][1]
    alone = runs.read_predictions(plain.run_dir / "members" / "2-fast")["val"][1]
    assert not np.allclose(taught, alone)
    # the targets: probabilities, the label's share at least 1 - distill
    member = pipeline.member_experiment(exp, "fast.toml")
    t = teacher_targets([tmp_path / "taught" / "members" / "1-cnn"], member, tiny, exp.ensemble)
    assert t is not None
    torch.testing.assert_close(t.probs.sum(1), torch.ones(len(t.rows)))
    labels = torch.from_numpy(tiny.Y[t.rows]).long()
    assert bool((t.probs.gather(1, labels[:, None]) >= 0.6 - 1e-6).all())
    assert bool((t.probs.argmax(1) == labels).all())
    # a fallback's subset of the rows takes their targets; rows outside them are refused
    sub = t.rows[::3]
    torch.testing.assert_close(t.for_rows(sub), t.probs[::3])
    with pytest.raises(ConfigError, match="do not cover this member's training rows"):
        t.for_rows(np.array([-1]))


def test_soft_targets_of_the_labels_train_as_the_labels(tiny):
    """A row of probabilities that is the label's one-hot trains exactly as the label does
    (cross-entropy against a distribution), so distillation changes nothing but the targets."""
    from cifar4.data.transforms import Normalization
    from cifar4.models.registry import build
    from cifar4.training.train import Trainer, seed_everything
    exp = config.from_dict({"name": "cnn", **MEMBERS["cnn"], "train": {"epochs": 1, "batch_size": 32,
                                                                       "label_smoothing": 0.1}})
    x, y = torch.from_numpy(tiny.X[:128]), torch.from_numpy(tiny.Y[:128]).long()
    norm = Normalization.from_config(exp.data.scale, exp.data.standardize, tiny.X[:128])
    weights = []
    for target in (y, torch.nn.functional.one_hot(y, tiny.num_classes).float()):
        gen = seed_everything(0)
        model = build(exp.model.name, num_classes=tiny.num_classes, **exp.model.options)
        tr = Trainer(model, exp.train, norm, generator=gen)
        tr.fit(x, target, x[:32], y[:32])
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert tr.history.rows[-1]["accuracy"] > 0
    torch.testing.assert_close(weights[0], weights[1])


def test_distill_is_checked_by_the_schema():
    for bad, what in (({"distill": 0.6}, "distill"), ({"distill": -0.1}, "distill"),
                      ({"distill_temperature": 0}, "distill_temperature")):
        with pytest.raises(ConfigError, match=what):
            config.from_dict({"name": "x", "ensemble": {"members": ["fast", "cnn"], **bad}})
