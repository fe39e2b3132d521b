"""An accuracy is stated over seeds (`--seeds`, `train.seeds`), and runs can be watched in
TensorBoard (`--tensorboard`)."""

from __future__ import annotations

import json
import statistics

import pytest

from cifar4 import config
from cifar4.cli import _expand_seeds, main
from cifar4.lab.seeds import train_seeds


def test_seeds_train_one_run_each_and_summarize(tiny, tmp_path):
    exp = config.from_dict({"name": "s", "model": {"name": "cnn"}, "train": {"epochs": 2, "batch_size": 32}})
    res = train_seeds(exp, tiny, [0, 1, 2], tmp_path / "runs", progress=False)
    assert [r.metrics["seed"] for r in res.runs] == [0, 1, 2]
    assert len({r.run_dir for r in res.runs}) == 3 and all("-seed" in r.run_dir.name for r in res.runs)
    s = json.loads(res.path.read_text())
    vals = [r.metrics["val_accuracy"] for r in res.runs]
    assert s["val_accuracy"]["values"] == vals and s["val_accuracy"]["mean"] == pytest.approx(statistics.mean(vals))
    assert s["test_accuracy"]["std"] == pytest.approx(statistics.stdev(r.metrics["test_accuracy"] for r in res.runs))
    assert set(s["per_class_accuracy"]) == set(tiny.classes)


def test_seeds_from_the_command_line_and_from_the_experiment(tiny_npz, tmp_path, capsys):
    assert _expand_seeds(["train", "--seeds", "0", "1", "2", "--epochs", "1"]) == \
        ["train", "--seeds", "0", "--seeds", "1", "--seeds", "2", "--epochs", "1"]
    assert _expand_seeds(["--seeds", "3,4"]) == ["--seeds", "3", "--seeds", "4"]
    code = main(["train", "--model", "cnn", "--epochs", "1", "--batch-size", "32", "--data", str(tiny_npz),
                 "--runs-dir", str(tmp_path / "a"), "--seeds", "0", "1", "--json", "-q"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["seeds"] == [0, 1] and len(out["runs"]) == 2
    toml = tmp_path / "e.toml"
    toml.write_text('name = "e"\n[model]\nname = "cnn"\n[train]\nepochs = 1\nbatch_size = 32\nseeds = [5, 6, 7]\n')
    assert main(["train", "-e", str(toml), "--data", str(tiny_npz), "--runs-dir", str(tmp_path / "b"),
                 "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["seeds"] == [5, 6, 7]
    assert main(["train", "--model", "cnn", "--seed", "1", "--seeds", "2", "3", "--data", str(tiny_npz)]) == 2
    assert main(["train", "--model", "cnn", "--seeds", "2", "2", "--data", str(tiny_npz), "-q",
                 "--runs-dir", str(tmp_path / "c"), "--epochs", "1", "--batch-size", "32"]) == 2
    err = capsys.readouterr().err
    assert "--seed and --seeds" in err and "repeats a seed" in err


def test_tensorboard_event_files_hold_the_curves_and_the_final_metrics(tiny_npz, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert main(["train", "--model", "cnn", "--epochs", "3", "--batch-size", "32", "--data", str(tiny_npz),
                 "--run-dir", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb"), "-q"]) == 0
    logdir = tmp_path / "tb" / "run"
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr"} <= set(tags)
    assert [e.step for e in acc.Scalars("val_accuracy")] == [1, 2, 3]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert acc.Scalars("final/val_accuracy")[0].value == pytest.approx(metrics["val_accuracy"], abs=1e-6)

