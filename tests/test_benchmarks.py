"""The benchmark scripts' own rules: the Keras reference needs no TensorFlow to say what it needs,
time_to_accuracy.py pairs Keras' runs with cifar4's by experiment and round, presets.py plans
each budget with each seed and sums them up per budget, and recombine.py adds another seed's
member to each ensemble run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks"
# runs a script with TensorFlow hidden, as on a machine where it is not installed
NO_TF = ("import runpy, sys; sys.modules['tensorflow'] = None; sys.argv = sys.argv[1:]; "
         "runpy.run_path(sys.argv[0], run_name='__main__')")


def _env_without_data() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "CIFAR4_DATA"}


def test_keras_reference_without_tensorflow_names_the_install_in_one_line(tiny_npz):
    out = subprocess.run([sys.executable, "-c", NO_TF, str(BENCH / "keras_reference.py"), "cnn",
                          "--data", str(tiny_npz)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "keras_reference.py: TensorFlow/Keras is not installed: pip install tensorflow"]


def test_keras_reference_asks_for_the_dataset_in_one_line():
    out = subprocess.run([sys.executable, str(BENCH / "keras_reference.py"), "mlp-deep"],
                         capture_output=True, text=True, timeout=120, env=_env_without_data())
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "keras_reference.py: no dataset: pass --data PATH or set CIFAR4_DATA to the cifar4 .npz file"]


def test_time_to_accuracy_stops_with_the_keras_reference_error_before_training(tiny_npz, tmp_path):
    wrapper = tmp_path / "python-without-tf"
    wrapper.write_text(f"#!{sys.executable}\n{NO_TF.replace('; ', chr(10))}\n")
    wrapper.chmod(0o755)
    out = subprocess.run([sys.executable, str(BENCH / "time_to_accuracy.py"), "cnn", "--epochs", "1",
                          "--keras", "--keras-python", str(wrapper), "--data", str(tiny_npz),
                          "--out", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "keras_reference.py: TensorFlow/Keras is not installed: pip install tensorflow")
    assert not (tmp_path / "r.json").exists()


def test_speedups_pair_each_keras_run_with_cifar4s_runs_of_its_round(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from time_to_accuracy import speedups
    rows = [{"experiment": "keras:cnn", "round": 1, "train_seconds": 30.0},
            {"experiment": "cnn", "round": 1, "train_seconds": 10.0},
            {"experiment": "cnn", "round": 1, "train_seconds": 20.0},
            {"experiment": "cnn", "round": 2, "train_seconds": 8.0},
            {"experiment": "keras:cnn", "round": 2, "train_seconds": 24.0},
            {"experiment": "fast", "round": 1, "train_seconds": 60.0}]
    assert speedups(rows) == {"cnn": [2.0, 3.0]}


def test_presets_plans_each_budget_with_each_seed_and_sums_up_per_budget(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from presets import plan_runs, table
    assert plan_runs(["fast", "best"], None, [], [60.0, 180.0]) == [("fast", 0, 42, 60.0), ("fast", 0, 42, 180.0)]
    assert plan_runs(["fast"], [0, 1], [], [60.0, 180.0]) == [
        ("fast", 0, 42, 60.0), ("fast", 1, 42, 60.0), ("fast", 0, 42, 180.0), ("fast", 1, 42, 180.0)]
    assert plan_runs(["fast", "best"], None, [7], []) == [
        ("fast", s, 42, None) for s in (0, 1, 2)] + [("fast", 0, 7, None)] + [
        ("best", s, 42, None) for s in (0, 1, 2)] + [("best", 0, 7, None)]
    rows = [{"preset": "fast", "time_budget": b, "test_accuracy": acc, "whole_command_seconds": t, "cold": cold}
            for b, acc, t, cold in ((60.0, 0.80, 58.0, True), (60.0, 0.82, 59.0, False),
                                    (180.0, 0.90, 177.0, False), (180.0, 0.92, 178.0, False))]
    rows.append({"preset": "fast", "seed": 2, "error": "cifar4: error: ..."})
    assert table(rows)[2:] == [
        "| fast --time-budget 60 | 2 | 0.8100 +- 0.0141 | 58.5, 59.0 | 58.0 |",
        "| fast --time-budget 180 | 2 | 0.9100 +- 0.0141 | 177.5, 178.0 |  |"]


def test_recombine_adds_another_seeds_member_to_each_run(tiny_npz, tmp_path, monkeypatch):
    from cifar4 import config, data
    from cifar4.training import pipeline
    monkeypatch.chdir(tmp_path)
    members = {"cnn": {"model": {"name": "cnn"}, "train": {"epochs": 1, "batch_size": 32}},
               "mlp": {"model": {"name": "mlp-20"}, "train": {"epochs": 1, "batch_size": 32}}}
    for name, d in members.items():
        (tmp_path / f"{name}.toml").write_text(config.from_dict({"name": name, **d}).to_toml())
    ds = data.load(tiny_npz)
    folders = []
    for seed in (1, 2):
        exp = config.from_dict({"name": "pair", "ensemble": {"members": ["cnn.toml", "mlp.toml"], "weights": "val"},
                                "train": {"seed": seed}})
        folders.append(pipeline.train(exp, ds, run_dir=tmp_path / f"pair{seed}", progress=False))
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(BENCH / "recombine.py"), *(str(f.run_dir) for f in folders),
                        "--data", str(tiny_npz), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    assert [(x["run"], x["shape"]) for x in rows] == [
        (run, shape) for run in ("pair1", "pair2")
        for shape in ("as trained", "+ cnn", "+ mlp", "+ cnn + mlp")]
    for f in folders:  # as trained: the run's own ensemble, recomputed
        own = next(x for x in rows if x["run"] == f.run_dir.name and x["shape"] == "as trained")
        assert own["test_accuracy"] == pytest.approx(f.metrics["test_accuracy"])
        assert own["weights"] == pytest.approx(f.metrics["model_options"]["weights"])
    assert [len(x["members"]) for x in rows[:4]] == [2, 3, 3, 4]
    assert all(abs(sum(x["weights"]) - 1) < 1e-6 for x in rows)


def test_distill_trains_each_student_and_pairs_it_with_its_teacher(tiny_npz, tmp_path, monkeypatch):
    from cifar4 import config, data
    from cifar4.training import pipeline
    monkeypatch.chdir(tmp_path)
    ds = data.load(tiny_npz)
    teacher = pipeline.train(config.from_dict({"name": "cnn", "model": {"name": "cnn"},
                                               "train": {"epochs": 1, "batch_size": 32, "seed": 1}}),
                             ds, run_dir=tmp_path / "teacher", progress=False)
    (tmp_path / "student.toml").write_text(config.from_dict({
        "name": "student", "model": {"name": "fast", "options": {"widths": [16, 32, 32]}},
        "train": {"epochs": 1, "batch_size": 32}}).to_toml())
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(BENCH / "distill.py"), str(teacher.run_dir), "--student", "student.toml",
           "--weights", "0", "0.5", "--data", str(tiny_npz), "--keep-runs", str(tmp_path / "kept"), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    assert [(x["seed"], x["distill"]) for x in rows] == [(1, 0.0), (1, 0.5)]
    assert rows[0]["targets_seconds"] == 0.0 and rows[1]["targets_seconds"] > 0
    taught = json.loads((tmp_path / "kept" / "student-seed1-split42-distill0.5" / "metrics.json").read_text())
    assert taught["distill"]["teachers"] == ["teacher"] and taught["seed"] == 1
    assert "distill" not in json.loads((tmp_path / "kept" / "student-seed1-split42-distill0" / "metrics.json")
                                       .read_text())
    assert all(abs(sum(x["pair_weights"]) - 1) < 1e-6 for x in rows)
    bad = subprocess.run([*cmd[:6], "0.7"], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [
        "distill.py: --weights [0.7] --temperature 2: expected weights from 0 to 0.5 and a temperature "
        "above 0, at most 10 (as [ensemble] takes them)"]
