"""Run directories hold every artifact, never clobber each other, and load back safely."""

from __future__ import annotations

import json

import pytest
import torch

from cifar4 import config, runs
from cifar4.errors import CheckpointError, RunError
from cifar4.training import pipeline

EXP = {"name": "r", "model": {"name": "cnn"}, "train": {"epochs": 2, "batch_size": 32}}


@pytest.fixture
def run(tiny, tmp_path):
    return pipeline.train(config.from_dict(EXP), tiny, runs_root=tmp_path / "runs", progress=False)


def test_a_run_leaves_every_artifact(run):
    names = {p.name for p in run.run_dir.iterdir()}
    assert set(runs.RUN_FILES) <= names and "state" not in names
    m = json.loads((run.run_dir / "metrics.json").read_text())
    for k in ("train_accuracy", "val_accuracy", "test_accuracy", "train_loss", "test_loss",
              "train_seconds", "epochs", "params", "seed", "versions", "machine", "split"):
        assert k in m
    assert m["params"] == 28_612 and m["split"]["kind"] == "session"
    assert runs.read_history(run.run_dir)[-1]["epoch"] == 2
    assert "Total params: 28,612" in (run.run_dir / "summary.txt").read_text()
    assert (run.run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_model_loads_back_with_the_same_predictions(run, tiny):
    loaded = runs.load_model(run.run_dir)
    x = loaded.norm.apply(torch.from_numpy(tiny.X[:8]))
    run.model.eval()
    assert torch.allclose(loaded.model(x), run.model(x))
    assert loaded.classes == ("bird", "cat", "frog", "horse")


def test_run_dir_collisions(tmp_path, tiny):
    (tmp_path / "taken").mkdir()
    with pytest.raises(RunError, match="already exists"):
        pipeline.train(config.from_dict(EXP), tiny, run_dir=tmp_path / "taken", progress=False)
    a = runs.create_run_dir(tmp_path, "same")
    b = runs.create_run_dir(tmp_path, "same")
    assert a != b


def test_damaged_weights_are_named(run, tmp_path):
    w = run.run_dir / "model.safetensors"
    good = w.read_bytes()
    w.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        runs.load_model(run.run_dir)
    w.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError):
        runs.load_model(run.run_dir)
    w.write_bytes(good)
    meta = json.loads((run.run_dir / "model.json").read_text())
    (run.run_dir / "model.json").write_text(json.dumps({**meta, "model": "mlp-20", "options": {}}))
    with pytest.raises(CheckpointError, match="do not fit the architecture"):
        runs.load_model(run.run_dir)
    (run.run_dir / "model.json").write_text(json.dumps({**meta, "model": "mlp-20"}))
    with pytest.raises(CheckpointError, match="no buildable model"):
        runs.load_model(run.run_dir)
    (run.run_dir / "model.json").write_text(json.dumps({**meta, "num_classes": 10,
                                                         "classes": list("abcdefghij")}))
    with pytest.raises(CheckpointError, match="dense.weight has shape"):
        runs.load_model(run.run_dir)
    (run.run_dir / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        runs.load_model(run.run_dir)


def test_pth_with_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    p = tmp_path / "evil.pth"
    torch.save({"w": Evil()}, p)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        runs.read_weights(p)
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pth")
    assert torch.equal(runs.read_weights(tmp_path / "ok.pth")["w"], torch.ones(2))


def test_list_runs(run, tmp_path):
    rows = runs.list_runs(tmp_path / "runs")
    assert len(rows) == 1 and rows[0]["status"] == "finished" and rows[0]["epochs"] == 2
    (tmp_path / "runs" / "broken").mkdir()
    assert {r["status"] for r in runs.list_runs(tmp_path / "runs")} == {"finished", "incomplete"}


def test_missing_run(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        runs.load_model(tmp_path / "nope")
