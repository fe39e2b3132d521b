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


# ---------------------------------------------------------------- the run record (record.py)

def _models_in(schema) -> list:
    """`schema` and every record model its fields hold."""
    from typing import get_args

    from pydantic import BaseModel
    out, todo = [], [schema]
    while todo:
        s = todo.pop()
        if s in out:
            continue
        out.append(s)
        for f in s.model_fields.values():
            stack = [f.annotation]
            while stack:
                t = stack.pop()
                if isinstance(t, type) and issubclass(t, BaseModel):
                    todo.append(t)
                stack.extend(get_args(t))
    return out


def _undeclared(schema, value, where: str) -> list[str]:
    """Keys of `value` that `schema` (recursively) does not declare."""
    from typing import get_args

    from pydantic import BaseModel
    if not isinstance(value, dict):
        return []
    out = []
    for k, v in value.items():
        field = schema.model_fields.get(k)
        if field is None:
            out.append(f"{where}{k}")
            continue
        stack = [field.annotation]
        while stack:
            t = stack.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                items = v if isinstance(v, list) else [v]
                for item in items:
                    out += _undeclared(t, item, f"{where}{k}.")
            stack.extend(get_args(t))
    return out


def test_every_record_file_of_a_run_is_declared_key_by_key(tiny, tmp_path):
    from cifar4 import record
    exp = config.from_dict({**EXP, "train": {**EXP["train"], "time_limit": 600, "checkpoint_best": True}})
    folder = pipeline.train(exp, tiny, runs_root=tmp_path / "runs", progress=False).run_dir
    for name, schema in record.RECORD_FILES.items():
        if name.endswith(".toml"):
            assert record.read_experiment(folder) == exp
            continue
        d = json.loads((folder / name).read_text())
        schema.model_validate(d)
        assert _undeclared(schema, d, "") == [], name
    m = record.read_metrics(folder)
    assert m["time_limit"]["max_epochs"] == 2 and m["time_limit"]["plans"]


def test_every_record_key_has_a_description():
    from cifar4 import record
    for name, schema in record.RECORD_FILES.items():
        if name.endswith(".toml"):
            continue
        for s in _models_in(schema):
            missing = [k for k, f in s.model_fields.items() if not f.description]
            assert not missing, f"{name}: {s.__name__}.{missing}"


def test_an_older_run_record_keeps_loading(tmp_path):
    from cifar4 import record
    old = dict(OLD_METRICS, a_key_from_another_version=[1, 2])
    (tmp_path / "metrics.json").write_text(json.dumps(old))
    assert record.read_metrics(tmp_path) == old == runs.read_metrics(tmp_path)


# what an early run wrote: the keys every version has had
OLD_METRICS = {"experiment": "cnn", "model": "cnn", "train_accuracy": 0.5, "val_accuracy": 0.4,
               "test_accuracy": 0.4, "train_loss": 1.0, "val_loss": 1.1, "test_loss": 1.1,
               "train_seconds": 3.0, "epochs": 1, "params": 10, "seed": 0,
               "split": {"kind": "session", "seed": 42, "train": 10, "val": 5, "test": 5},
               "data": {"source": "x.npz", "sha256": "ab", "images": 20}}


def test_a_record_value_of_the_wrong_kind_is_named(tmp_path):
    from cifar4 import record
    (tmp_path / "metrics.json").write_text(json.dumps({**OLD_METRICS, "val_accuracy": "high"}))
    with pytest.raises(RunError, match="metrics.json': val_accuracy: .*'high'"):
        record.read_metrics(tmp_path)
    with pytest.raises(RuntimeError, match="split.train: .*'many'"):
        record.write_metrics(tmp_path, {**OLD_METRICS, "split": {**OLD_METRICS["split"], "train": "many"}})


def test_every_experiment_key_has_a_description():
    from cifar4 import record
    for s in _models_in(record.RECORD_FILES["config.toml"]):
        missing = [k for k, f in s.model_fields.items() if not f.description]
        assert not missing, f"{s.__name__}.{missing}"
