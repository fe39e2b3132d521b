"""A folder of your own images becomes a dataset; every command then works with its classes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cifar4 import config, lab
from cifar4.cli import main
from cifar4.data import dataset_name, load
from cifar4.data.folder import import_folder
from cifar4.errors import CheckpointError, ConfigError, DataError
from cifar4.lab.report import write_report
from cifar4.serving.predict import predict
from cifar4.training import pipeline
from cifar4.training.evaluate_run import evaluate_run


def _folder(root, per_class=12, classes=("apple", "pear", "plum")):
    """Classes told apart by colour, at several sizes and formats, one image not square."""
    colours = {"apple": (220, 30, 30), "pear": (40, 200, 40), "plum": (60, 40, 200)}
    for k, c in enumerate(classes):
        (root / c / "nested").mkdir(parents=True)
        for i in range(per_class):
            size = (48 + 8 * i, 40 + 4 * k)
            img = Image.new("RGB", size, colours[c])
            folder = root / c / ("nested" if i % 3 == 0 else ".")
            img.save(folder / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


def test_import_reads_class_folders_and_lists_what_it_skips(tmp_path):
    root = _folder(tmp_path / "photos")
    (root / "apple" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "pear" / "notes.txt").write_text("hello")
    rep = import_folder(root)
    ds = rep.dataset
    assert ds.classes == ("apple", "pear", "plum") and rep.counts == {"apple": 12, "pear": 12, "plum": 12}
    assert ds.X.shape == (36, 32, 32, 3) and ds.X.dtype == np.uint8
    assert sorted(f.rsplit("/", 1)[1] for f, _ in rep.skipped) == ["broken.jpg", "notes.txt"]
    assert abs(int(ds.X[ds.Y == 0][..., 0].mean()) - 220) <= 2  # apples are red
    assert dataset_name(ds) == "3 classes: apple, pear, plum"


def test_import_crops_the_centre_square(tmp_path):
    root = tmp_path / "p"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(10):
            img = Image.new("RGB", (90, 30), (0, 0, 255))
            img.paste((255, 0, 0), (30, 0, 60, 30))  # a red centre square between blue sides
            img.save(root / c / f"{i}.png")
    x = import_folder(root).dataset.X[0]
    assert (x[..., 0] > 200).all() and (x[..., 2] < 50).all()  # only the centre was kept


def test_a_class_with_too_few_images_is_one_line(tmp_path, capsys):
    root = _folder(tmp_path / "p", per_class=12)
    for p in list((root / "plum").rglob("*.png"))[:4]:
        p.unlink()
    with pytest.raises(DataError, match="class 'plum'.*has 8 readable image.*at least 10"):
        import_folder(root)
    assert main(["data", "import", str(root), "--out", str(tmp_path / "x.npz")]) == 2
    assert main(["data", "import", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.npz")]) == 2
    assert main(["data", "import", str(root), "--size", "16", "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("cifar4: error") == 3 and "Traceback" not in err


def test_every_command_works_on_an_imported_folder(tmp_path, capsys):
    root = _folder(tmp_path / "photos", per_class=20)
    out = tmp_path / "fruit.npz"
    assert main(["data", "import", str(root), "--out", str(out)]) == 0
    assert "apple" in capsys.readouterr().out
    ds = load(out)
    assert ds.classes == ("apple", "pear", "plum") and "image folder" in ds.source
    exp = config.from_dict({"name": "f", "model": {"name": "cnn"}, "train": {"epochs": 3, "batch_size": 8}})
    r = pipeline.train(exp, ds, runs_root=tmp_path / "runs", progress=False)
    assert len(r.metrics["per_class_accuracy"]) == 3 and len(r.metrics["confusion"]) == 3
    assert evaluate_run(r.run_dir, ds)["test"]["images"] == r.metrics["split"]["test"]
    Image.new("RGB", (50, 50), (220, 30, 30)).save(tmp_path / "red.png")
    p = predict(r.run_dir, [tmp_path / "red.png"])[0]
    assert set(p.probabilities) == {"apple", "pear", "plum"}
    assert main(["evaluate", str(r.run_dir), "--data", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["per_class_accuracy"].keys() == {"apple", "pear", "plum"}


def test_the_lab_on_three_classes_says_its_numbers_are_not_the_sessions(tmp_path):
    root = _folder(tmp_path / "photos", per_class=60)  # 126 training images: the lab's batches fit
    ds = import_folder(root).dataset
    entries = lab.run_lab(["mlp-20", "cnn"], ds, tmp_path / "lab", quick=True, progress=False)
    page = write_report([(e.name, e.run_dir) for e in entries], ds, tmp_path / "report").read_text()
    assert "3 classes: apple, pear, plum" in page and "not comparable" in page
    assert "session (accuracy)" not in page
    with pytest.raises(ConfigError, match="another dataset"):
        from cifar4.data import from_arrays
        from conftest import make_arrays
        X, Y, t = make_arrays()
        lab.run_lab(["mlp-20"], from_arrays(X, Y, t, source="other"), tmp_path / "lab", quick=True,
                    progress=False)


# ---------------------------------------------------------------- larger sizes

@pytest.mark.parametrize("bad", [16, 31, 225, 1000, "1.5", "abc", "", True, -64])
def test_a_size_out_of_range_or_not_a_whole_number_is_one_line(tmp_path, bad):
    root = _folder(tmp_path / "p")
    with pytest.raises(DataError, match=r"--size .*expected a whole number of pixels from 32 to 224"):
        import_folder(root, bad)


def test_the_largest_size_is_the_largest_transfer_resolution(tmp_path, capsys):
    from cifar4.data.folder import max_size
    assert max_size() == max(config.load(n).model.options.get("resolution", 32)
                             for n in config.builtin_names() if config.load(n).model.name == "transfer")
    root = _folder(tmp_path / "p")
    assert main(["data", "import", str(root), "--size", "225", "--out", str(tmp_path / "x.npz")]) == 2
    assert main(["data", "import", str(root), "--size", "9.5", "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("cifar4: error: --size") == 2 and "from 32 to 224" in err and "Traceback" not in err


def test_import_at_a_larger_size_keeps_the_detail(tmp_path, capsys):
    root = _folder(tmp_path / "photos")
    for c in ("apple", "pear", "plum"):  # a thin stripe: lost at 32 px, kept at 64
        for p in (root / c).rglob("*.png"):
            img = Image.open(p).convert("RGB")
            img.paste((0, 0, 0), (img.width // 2, 0, img.width // 2 + 1, img.height))
            img.save(p)
    out = tmp_path / "big.npz"
    assert main(["data", "import", str(root), "--size", "64", "--out", str(out)]) == 0
    assert "resized to 64x64" in capsys.readouterr().out
    ds = load(out)
    assert ds.X.shape == (36, 64, 64, 3) and ds.size == 64
    small = ds.at_size(32)
    assert small.X.shape == (36, 32, 32, 3) and ds.at_size(32) is small and ds.at_size(64) is ds
    assert small.checksum() == ds.checksum()  # the same data, for runs and caches
    at32 = import_folder(root).dataset.X  # imported at 32 directly: Lanczos both ways, nearly equal
    assert np.abs(small.X.astype(int) - at32.astype(int)).mean() < 3
    assert main(["data", "info", "--data", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["X_shape"] == [36, 64, 64, 3]
    with pytest.raises(DataError, match="only smaller"):
        small.at_size(64)


def test_32_px_models_take_32_px_and_transfer_the_stored_size(tmp_path, monkeypatch):
    """On a 64 px dataset: a CNN trains and predicts on 32 px, a transfer model on 64 px (its
    features cached under that size), and predict gives each the size it was trained on."""
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "photos", per_class=20)
    ds = import_folder(root, 64).dataset
    cnn = config.from_dict({"name": "c", "model": {"name": "cnn"}, "train": {"epochs": 1, "batch_size": 8}})
    r = pipeline.train(cnn, ds, runs_root=tmp_path / "runs", progress=False)
    assert json.loads((r.run_dir / "model.json").read_text())["input_shape"] == [3, 32, 32]
    tr = config.from_dict({"name": "t", "model": {"name": "transfer", "options": {
        "weights": "none", "resolution": 96, "head": []}}, "train": {"epochs": 1, "batch_size": 8}})
    t = pipeline.train(tr, ds, runs_root=tmp_path / "runs", progress=False)
    assert json.loads((t.run_dir / "model.json").read_text())["input_shape"] == [3, 64, 64]
    assert all("from64px" in f for f in t.metrics["features"]["files"])
    assert evaluate_run(t.run_dir, ds)["test"]["accuracy"] == pytest.approx(t.metrics["test_accuracy"])
    from cifar4.data.images import read_image
    from cifar4.runs import load_model
    from cifar4.serving.predict import predict_arrays
    noise = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "red.png")  # detail that 32 px would lose
    for run, size in ((r.run_dir, 32), (t.run_dir, 64)):
        loaded = load_model(run)
        assert loaded.input_size == size
        want = predict_arrays(loaded, read_image(tmp_path / "red.png", size=size)[None])[0]
        got = predict(loaded, [tmp_path / "red.png"])[0]
        assert [got.probabilities[c] for c in loaded.classes] == pytest.approx(want.tolist(), abs=1e-6)
    from cifar4.training.ensemble import make_ensemble  # one batch for both: the smaller size
    e = make_ensemble([r.run_dir, t.run_dir], out=tmp_path / "ens", weights="equal", data=ds)
    assert load_model(e.run_dir).input_size == 32
    assert evaluate_run(e.run_dir, ds)["test"]["accuracy"] == pytest.approx(e.metrics["test_accuracy"])
    onnxruntime = pytest.importorskip("onnxruntime")
    from cifar4.serving.export import export
    assert export(t.run_dir, data=ds).agreement >= 0.999
    session = onnxruntime.InferenceSession(str(t.run_dir / "model.onnx"))
    assert session.get_inputs()[0].shape[1:] == [64, 64, 3]
    meta = json.loads((r.run_dir / "model.json").read_text())
    del meta["input_shape"]  # a model.json from before the size was recorded: 32 px
    (r.run_dir / "model.json").write_text(json.dumps(meta))
    assert load_model(r.run_dir).input_size == 32
    (r.run_dir / "model.json").write_text(json.dumps({**meta, "input_shape": [3, 16, 16]}))
    with pytest.raises(CheckpointError, match=r"input_shape \[3, 16, 16\]; expected \[3, S, S\]"):
        load_model(r.run_dir)
    capped = config.from_dict({"name": "t", "model": {"name": "transfer", "options": {
        "weights": "none", "resolution": 48, "head": []}}, "train": {"epochs": 1, "batch_size": 8}})
    c = pipeline.train(capped, ds, runs_root=tmp_path / "runs", progress=False)
    assert json.loads((c.run_dir / "model.json").read_text())["input_shape"] == [3, 48, 48]


def test_the_feature_cache_tells_the_sizes_of_one_dataset_apart(tmp_path, monkeypatch):
    from cifar4 import models
    from cifar4.training.features import cache_file
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path))
    ds = import_folder(_folder(tmp_path / "p"), 64).dataset
    model = models.build("transfer", num_classes=3, weights="none", resolution=64)
    digest = model.backbone_digest()
    big, small = (cache_file(model, d, "plain", "fp32", digest).path for d in (ds, ds.at_size(32)))
    assert big != small and "from64px" in big.name and "from" not in small.name
