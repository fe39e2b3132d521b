"""ONNX export: every model family exports to a file that takes uint8 images and returns
probabilities, agrees with PyTorch, carries its metadata, and runs with onnxruntime, numpy and
Pillow alone."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cifar4 import config
from cifar4.errors import ExportError
from cifar4.serving import export as exp_mod
from cifar4.training import pipeline

pytest.importorskip("onnxruntime")

FAMILIES = {
    "mlp": {"model": {"name": "mlp-deep", "options": {"dropout": 0.1}}, "data": {"standardize": True}},
    "cnn": {"model": {"name": "cnn"}},
    "fast": {"model": {"name": "fast", "options": {"widths": [16, 32, 32]}}, "train": {"tta": 2}},
    "transfer": {"model": {"name": "transfer", "options": {"weights": "none", "resolution": 64, "head": [16]}},
                 "augment": {"flip": True}, "train": {"tta": 1}},
}


def _run(tiny, tmp_path, family):
    d = config.merge({"name": family, "train": {"epochs": 2, "batch_size": 32}}, FAMILIES[family])
    return pipeline.train(config.from_dict(d), tiny, runs_root=tmp_path / "runs", progress=False)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_model_family_exports_and_agrees_with_pytorch(tiny, tmp_path, monkeypatch, family):
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    r = _run(tiny, tmp_path, family)
    rep = exp_mod.export(r.run_dir, data=tiny)
    assert rep.path == str(r.run_dir / "model.onnx") and rep.images == r.metrics["split"]["test"]
    assert rep.agreement >= 0.999 and rep.max_prob_diff < 1e-3
    assert rep.tta == r.metrics["tta"]
    import onnx
    m = onnx.load(rep.path)
    meta = {p.key: p.value for p in m.metadata_props}
    assert json.loads(meta["classes"]) == list(tiny.classes) and meta["experiment"] == family
    assert float(meta["test_accuracy"]) == pytest.approx(r.metrics["test_accuracy"], abs=1e-6)


def test_the_file_runs_with_onnxruntime_numpy_and_pillow_alone(tiny, tmp_path):
    r = _run(tiny, tmp_path, "cnn")
    rep = exp_mod.export(r.run_dir, tmp_path / "out" / "cnn.onnx", tta=True, data=tiny)
    assert rep.tta == 1
    from PIL import Image
    for i in range(5):
        Image.fromarray(tiny.X[i]).resize((64, 48)).save(tmp_path / f"img{i}.png")
    script = textwrap.dedent("""
        import json, sys
        import numpy as np, onnxruntime as ort
        from PIL import Image
        s = ort.InferenceSession(sys.argv[1])
        meta = s.get_modelmeta().custom_metadata_map
        classes = json.loads(meta["classes"])
        x = np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32))) for p in sys.argv[2:]])
        p = s.run(None, {"images": x.astype(np.uint8)})[0]
        assert p.shape == (len(x), len(classes)) and np.allclose(p.sum(1), 1, atol=1e-5)
        assert not any(m.startswith("cifar4") or m == "torch" for m in sys.modules)
        print(json.dumps([classes[k] for k in p.argmax(1)]))
    """)
    out = subprocess.run([sys.executable, "-c", script, rep.path, *[str(tmp_path / f"img{i}.png") for i in range(5)]],
                         capture_output=True, text=True, check=True)
    assert len(json.loads(out.stdout)) == 5


def test_an_export_that_disagrees_is_refused_and_not_kept(tiny, tmp_path, monkeypatch):
    r = _run(tiny, tmp_path, "cnn")
    monkeypatch.setattr(exp_mod, "MIN_AGREEMENT", 1.01)  # no file can agree better than 100 %
    with pytest.raises(ExportError, match="was not kept"):
        exp_mod.export(r.run_dir, data=tiny)
    assert not (r.run_dir / "model.onnx").exists()
    assert not [p for p in r.run_dir.iterdir() if p.name.endswith(".tmp")]


def test_export_cli(tiny_npz, tmp_path, capsys):
    from cifar4.cli import main
    from cifar4.data import load
    r = _run(load(tiny_npz), tmp_path, "cnn")
    assert main(["export", str(r.run_dir), "--data", str(tiny_npz), "--no-tta", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["tta"] == 0 and rep["agreement"] >= 0.999
    assert main(["export", str(tmp_path / "nope"), "--data", str(tiny_npz)]) == 2
    assert main(["export", str(r.run_dir), "--data", str(tiny_npz), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "is a folder" in err and "Traceback" not in err


def test_deployable_takes_uint8_and_returns_probabilities(tiny, tmp_path):
    import torch
    r = _run(tiny, tmp_path, "cnn")
    from cifar4.runs import load_model
    loaded = load_model(r.run_dir)
    net = exp_mod.Deployable(loaded.model, loaded.norm, 0).eval()
    p = net(torch.from_numpy(tiny.X[:7])).detach().numpy()
    assert p.shape == (7, 4) and np.allclose(p.sum(1), 1, atol=1e-6)
