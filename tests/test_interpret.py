"""Interpreting runs: every kind of run (MLP, CNN, fast net, transfer, ensemble) gets its
confused pairs, top losses, per-class report, calibration before and after temperature
scaling, and attention maps; the maps depend on what was learned (Adebayo et al.'s
randomisation check); the learning-rate range test suggests a rate inside its range."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("captum", reason="the 'interpret' extra (captum) is not installed: pip install 'cifar4[interpret]'")

from cifar4 import config
from cifar4.interpret import attribution, calibration, interpret_run, sentence
from cifar4.training import pipeline
from cifar4.training.ensemble import make_ensemble

KINDS = {
    "mlp": {"model": {"name": "mlp-20"}, "train": {"epochs": 2, "batch_size": 32, "precision": "fp32"}},
    "cnn": {"model": {"name": "cnn"}, "train": {"epochs": 2, "batch_size": 32, "precision": "fp32"}},
    "fast": {"model": {"name": "fast", "options": {"widths": [16, 32, 32]}},
             "train": {"epochs": 2, "batch_size": 32, "tta": 1, "precision": "fp32"}, "data": {"standardize": True}},
    "transfer": {"model": {"name": "transfer", "options": {"weights": "none", "resolution": 32}},
                 "train": {"epochs": 1, "batch_size": 32, "precision": "fp32"}},
}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    from cifar4.data import from_arrays
    from conftest import make_arrays
    X, Y, t = make_arrays()
    ds = from_arrays(X, Y, t, source="tiny")
    root = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("CIFAR4_CACHE", str(root / "cache"))
    out = {name: pipeline.train(config.from_dict({"name": name, **d}), ds, run_dir=root / name,
                                progress=False).run_dir for name, d in KINDS.items()}
    out["ensemble"] = make_ensemble([out["cnn"], out["fast"]], out=root / "ensemble", data=ds, device="cpu").run_dir
    yield ds, out
    mp.undo()


@pytest.mark.parametrize("kind", ["mlp", "cnn", "fast", "transfer", "ensemble"])
def test_every_kind_of_run_is_interpreted(tiny_runs, kind):
    ds, folders = tiny_runs
    steps = []
    res = interpret_run(folders[kind], data=ds, device="cpu", on_step=steps.append)
    out = folders[kind] / "interpret"
    saved = json.loads((out / "interpretation.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert steps == ["predictions", "confusion and top losses", "calibration", "attention maps", "figures"]
    for f in res["figures"].values():
        assert (out / f).stat().st_size > 1000 and (out / f).read_bytes()[:4] == b"\x89PNG"
    assert {"top_losses", "reliability", "attention"} <= set(res["figures"])
    assert ("filters" in res["figures"]) == (kind == "cnn")
    n = res["images"]
    cm = np.asarray(res["confusion"])
    assert cm.sum() == n and n == len(res["top_losses"]) + 20
    assert sum(p["count"] for p in res["confused_pairs"]) == n - np.trace(cm)
    assert res["accuracy"] == pytest.approx(np.trace(cm) / n)
    rep = res["classification_report"]
    assert set(ds.classes) <= set(rep) and rep["weighted avg"]["support"] == n
    losses = [t["loss"] for t in res["top_losses"]]
    assert len(losses) == 16 and losses == sorted(losses, reverse=True)
    cal = res["calibration"]
    assert 0 <= cal["ece_before"] <= 1 and 0 <= cal["ece_after"] <= 1 and cal["temperature"] > 0
    assert cal["val_nll_after"] <= cal["val_nll_before"] + 1e-6
    want = {"mlp": "saliency"}.get(kind, "grad-cam")
    assert [a["method"] for a in res["attention"]] == [want] * (2 if kind == "ensemble" else 1)
    assert res["summary"] == sentence(res) and "ECE" in res["summary"]


def test_the_attention_layer_is_the_last_convolution():
    from cifar4 import models
    assert attribution.last_conv(models.build("cnn"))[0] == "conv2d_1"
    assert attribution.last_conv(models.build("fast"))[0] == "group3.conv2"
    assert attribution.last_conv(models.build("transfer", weights="none"))[0] == "backbone._conv_head"
    assert attribution.last_conv(models.build("mlp-20")) is None


def test_top_losses_are_the_images_most_wrong(tiny_runs):
    from cifar4 import runs
    ds, folders = tiny_runs
    res = interpret_run(folders["cnn"], data=ds, device="cpu", with_attention=False)
    rows, logits = runs.read_predictions(folders["cnn"])["test"]
    loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(ds.Y[rows]),
                                             reduction="none").numpy()
    assert [t["loss"] for t in res["top_losses"]] == pytest.approx(np.sort(loss)[::-1][:16], abs=1e-3)
    assert [t["position"] for t in res["top_losses"][:3]] == list(np.argsort(-loss, kind="stable")[:3])
    assert "attention" not in res["figures"] and res["attention"] == []


def test_other_data_is_predicted_afresh_and_the_same_data_reads_the_saved_predictions(tiny_runs, tmp_path):
    from cifar4.data import from_arrays
    ds, folders = tiny_runs
    X = ds.X.copy()
    train_row = int(np.flatnonzero(~ds.is_test)[0])
    X[train_row] = 255 - X[train_row]  # another dataset (its checksum differs), the same test images
    other = from_arrays(X, ds.Y, ds.is_test, source="other")
    saved = interpret_run(folders["fast"], tmp_path / "a", data=ds, device="cpu", with_attention=False)
    fresh = interpret_run(folders["fast"], tmp_path / "b", data=other, device="cpu", with_attention=False)
    assert fresh["data"]["sha256"] != saved["data"]["sha256"]
    assert fresh["confusion"] == saved["confusion"]
    assert fresh["loss"] == pytest.approx(saved["loss"], abs=2e-2)  # computed in fp32, saved in bf16 or fp32


def test_temperature_scaling_recovers_an_overconfident_model():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (2000,), generator=g)
    calibrated = torch.randn(2000, 4, generator=g) + 2.0 * torch.nn.functional.one_hot(y, 4)
    # draw labels from the calibrated probabilities, then make the model 3x overconfident
    y = torch.multinomial(torch.softmax(calibrated, 1), 1, generator=g)[:, 0]
    logits = 3.0 * calibrated
    t = calibration.fit_temperature(logits, y)
    assert t == pytest.approx(3.0, rel=0.15)
    assert calibration.nll(logits, y, t) < calibration.nll(logits, y)
    probs = torch.softmax(logits, 1).numpy()
    assert calibration.ece(torch.softmax(logits / t, 1).numpy(), y.numpy()) < calibration.ece(probs, y.numpy()) / 2


def test_ece_is_zero_for_calibrated_bins_and_the_gap_otherwise():
    probs = np.array([[0.8, 0.2]] * 10)
    y = np.array([0] * 8 + [1] * 2)  # 80 % right at 80 % confidence
    assert calibration.ece(probs, y) == pytest.approx(0.0)
    assert calibration.ece(probs, np.zeros(10, int)) == pytest.approx(0.2)
    # bins weigh by their images: 10 at 0.8 all right (gap 0.2), 30 at 0.6 with 60 % right
    probs = np.array([[0.8, 0.2]] * 10 + [[0.6, 0.4]] * 30)
    y = np.array([0] * 10 + [0] * 18 + [1] * 12)
    assert calibration.ece(probs, y) == pytest.approx(10 / 40 * 0.2)


def test_without_captum_the_maps_name_the_extra_and_the_rest_still_works(tiny_runs, tiny_npz, tmp_path, monkeypatch,
                                                                          capsys):
    import sys

    from cifar4.cli import main
    from cifar4.errors import MissingExtraError
    ds, folders = tiny_runs
    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'cifar4\[interpret\]'"):
        interpret_run(folders["cnn"], tmp_path / "a", data=ds, device="cpu")
    assert not (tmp_path / "a").exists()  # said before any work
    res = interpret_run(folders["cnn"], tmp_path / "b", data=ds, device="cpu", with_attention=False)
    assert "ECE" in res["summary"] and not attribution.captum_available()
    assert main(["interpret", str(folders["cnn"]), "--data", str(tiny_npz), "--out-dir", str(tmp_path / "c"),
                 "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'cifar4[interpret]'" in err


def test_a_bad_split_is_one_line_error(tiny_runs):
    from cifar4.errors import ConfigError
    ds, folders = tiny_runs
    with pytest.raises(ConfigError, match="expected one of train, val, test"):
        interpret_run(folders["cnn"], data=ds, split="holdout")


# ---------------------------------------------------------------- the maps depend on what was learned

def _trained_cnn(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 20) -> torch.nn.Module:
    from cifar4 import models
    torch.manual_seed(seed)
    model = models.build("cnn")
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(len(x), (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_grad_cam_maps_change_when_the_learned_weights_are_randomised(tiny):
    """Adebayo et al.'s check: a trained CNN's Grad-CAM maps agree with those of the same CNN
    trained from another seed, and much less with those of the CNN whose weights are drawn
    afresh, whole or from the top layer down (cascading)."""
    x = torch.from_numpy(tiny.X).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(tiny.Y)
    model, twin = _trained_cnn(x, y, 0), _trained_cnn(x, y, 1)
    xs, ys = x[1::8], y[1::8]
    assert float((model(xs).argmax(1) == ys).float().mean()) > 0.9
    maps = attribution.attention(model, xs, target=ys).maps
    assert attribution.rank_correlation(maps, attribution.attention(model, xs, target=ys).maps) == 1.0
    same = attribution.rank_correlation(maps, attribution.attention(twin, xs, target=ys).maps)
    assert same > 0.5

    def randomised(top: int | None) -> float:  # over three draws of the new weights
        return float(np.mean([attribution.rank_correlation(
            maps, attribution.attention(attribution.randomized(model, top, seed=s), xs, target=ys).maps)
            for s in range(3)]))
    cascade = [randomised(top) for top in (1, 2)] + [randomised(None)]
    assert all(r < same - 0.25 for r in cascade), (same, cascade)


# ---------------------------------------------------------------- the command line

def test_interpret_command_writes_into_the_folder_it_is_given(tiny_runs, tiny_npz, tmp_path, capsys):
    from cifar4.cli import main
    _, folders = tiny_runs
    assert main(["interpret", str(folders["mlp"]), "--data", str(tiny_npz), "--out-dir", str(tmp_path / "i"),
                 "-q"]) == 0
    said = capsys.readouterr().out
    assert "temperature scaling" in said and str(tmp_path / "i") in said
    assert json.loads((tmp_path / "i" / "interpretation.json").read_text())["attention"][0]["method"] == "saliency"
    assert main(["interpret", str(folders["mlp"]), "--part", "holdout"]) == 2
    assert "'holdout' is not one of train, val, test" in capsys.readouterr().err


# ---------------------------------------------------------------- the learning-rate range test

def _lr_exp(tmp_path, **train):
    exp = config.from_dict({"name": "cnn-tiny", "model": {"name": "cnn"},
                            "train": {"batch_size": 32, "precision": "fp32", **train}})
    path = tmp_path / "cnn-tiny.toml"
    path.write_text(exp.to_toml())
    return path


def test_lr_find_suggests_a_rate_inside_its_range_and_writes_only_its_plot(tiny, tmp_path, monkeypatch):
    from cifar4.training.lr_find import lr_find, suggest
    monkeypatch.chdir(tmp_path)
    exp = _lr_exp(tmp_path)
    res = lr_find(exp, tiny, tmp_path / "out", start=1e-5, end=1.0, steps=30)
    assert 1e-5 <= res.suggested <= 1.0 and 1e-6 <= res.min_over_10 <= 0.1
    assert res.lrs[0] == pytest.approx(1e-5) and len(res.lrs) == len(res.losses) == len(res.smoothed)
    assert np.all(np.diff(np.log(res.lrs)) == pytest.approx(np.log(1e5) / 29))  # exponential steps
    assert res.default_lr == 1e-3 and res.suggested == suggest(res.lrs, res.smoothed)[0]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == \
        ["cnn-tiny-lr-find.json", "cnn-tiny-lr-find.png", "cnn-tiny.toml"]
    assert (tmp_path / "out" / "cnn-tiny-lr-find.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "out" / "cnn-tiny-lr-find.json").read_text())
    assert saved["suggested"] == res.suggested and saved["settings"]["optimizer"] == "adam"


def test_lr_find_stops_when_the_loss_diverges(tiny, tmp_path):
    from cifar4.training.lr_find import lr_find
    res = lr_find(_lr_exp(tmp_path, optimizer="sgd"), tiny, tmp_path, start=1e-3, end=1e4, steps=40)
    assert res.diverged and len(res.lrs) < 40
    assert res.smoothed[-1] > 4 * min(res.smoothed[:-1]) or not np.isfinite(res.smoothed[-1])


def test_the_suggestion_is_the_steepest_descent_of_the_smoothed_loss():
    from cifar4.training.lr_find import suggest
    lrs = list(np.logspace(-6, 0, 61))
    loss = [2.0 - 1.0 / (1 + np.exp(-4 * (np.log10(r) + 3))) for r in lrs]  # falls fastest at 1e-3
    steep, min10 = suggest(lrs, loss)
    assert steep == pytest.approx(1e-3, rel=0.3)
    assert min10 == pytest.approx(lrs[-2] / 10)  # the last point is left out


def test_lr_find_command_prints_the_train_command(tiny_npz, tmp_path, capsys):
    from cifar4.cli import main
    exp = _lr_exp(tmp_path)
    assert main(["lr-find", str(exp), "--data", str(tiny_npz), "--out-dir", str(tmp_path / "o"), "--steps", "20",
                 "--start", "1e-4", "--end", "1", "-q"]) == 0
    said = capsys.readouterr().out
    res = json.loads((tmp_path / "o" / "cnn-tiny-lr-find.json").read_text())
    assert f"cifar4 train -e {exp} --lr {res['suggested']:.3g}" in said
    assert main(["lr-find", str(exp), "--start", "1", "--end", "0.1"]) == 2


# ---------------------------------------------------------------- the lab report

def test_the_report_shows_each_runs_interpretation_and_overfitting_beside_its_cure(tiny_runs, tmp_path):
    import shutil

    from cifar4.data import from_arrays
    from cifar4.lab.report import write_report
    ds, folders = tiny_runs
    over, cured = tmp_path / "cnn-overfit", tmp_path / "cnn-augmented"
    shutil.copytree(folders["cnn"], over)
    shutil.copytree(folders["cnn"], cured)
    m = json.loads((over / "metrics.json").read_text())
    (over / "metrics.json").write_text(json.dumps({**m, "train_accuracy": 1.0, "val_accuracy": 0.8}))
    d = config.read_toml(cured / "config.toml")
    (cured / "config.toml").write_text(config.from_dict(config.merge(d, {"augment": {"flip": True}})).to_toml())
    locked = tmp_path / "mlp-locked"  # a run folder where nothing can be written
    shutil.copytree(folders["mlp"], locked, ignore=shutil.ignore_patterns("interpret"))
    (locked / "interpret").write_text("a file where the folder would go")
    placed = from_arrays(ds.X, ds.Y, ds.is_test, source="/home/someone/data/cifar4.npz")
    entries = [("mlp", folders["mlp"]), ("cnn-overfit", over), ("cnn-augmented", cured),
               ("ensemble", folders["ensemble"]), ("mlp-locked", locked)]
    page = write_report(entries, placed, tmp_path / "report").read_text()
    md = (tmp_path / "report" / "report.md").read_text()
    assert md.count("Interpretation (test split") == 5 and md.count("temperature scaling") >= 5
    assert (tmp_path / "report" / "interpret" / "mlp-locked" / "interpretation.json").is_file()
    for name in ("mlp", "cnn-overfit", "cnn-augmented", "ensemble", "mlp-locked"):
        assert f"(figures/{name}-top-losses.png)" in md and f"(figures/{name}-attention.png)" in md
    assert "saliency maps" in md and "grad-cam maps" in md
    assert "## What overfitting gets wrong" in md and " nan" not in md and "made no mistake" in md
    assert ("![cnn-overfit: top losses](figures/cnn-overfit-top-losses.png) "
            "![cnn-augmented: top losses](figures/cnn-augmented-top-losses.png)") in md
    assert 'class="side-by-side"' in page
    assert "/home/someone" not in md and "cifar4.npz (sha256 of its pixels and labels" in md
    assert "each training image is used 2 times" in md


def test_one_epoch_reads_once_and_its_curves_have_whole_epoch_ticks(tmp_path, monkeypatch):
    from cifar4 import plots
    from cifar4.lab.report import times
    assert (times(1), times(2), times(1200)) == ("once", "2 times", "1,200 times")
    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig))
    row = {"epoch": 1, "loss": 1.0, "accuracy": 0.5, "val_loss": 1.1, "val_accuracy": 0.4}
    plots.curves([row], tmp_path / "c.png")
    plots.compare([("a", [row])], tmp_path / "d.png")
    for fig in figs:
        for ax in fig.axes:
            ticks = ax.get_xticks()
            assert len(ticks) and np.all(ticks == np.round(ticks)), ticks


# ---------------------------------------------------------------- the page's attention overlay

@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_the_api_returns_an_attention_overlay_on_request(tiny_runs, kind):
    import base64
    import io

    from PIL import Image
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from cifar4.serving.server import create_app
    ds, folders = tiny_runs
    client = TestClient(create_app([folders[kind]]))
    buf = io.BytesIO()
    Image.fromarray(ds.X[5]).save(buf, format="PNG")
    files = [("files", ("a.png", buf.getvalue(), "image/png"))] * 2
    plain = client.post("/api/predict", files=files).json()["predictions"]
    assert all("attention" not in p for p in plain)
    got = client.post("/api/predict", files=files, data={"attention": "true"}).json()["predictions"]
    assert [p["class"] for p in got] == [p["class"] for p in plain]
    assert got[0]["attention_method"] == {"cnn": "grad-cam", "mlp": "saliency"}[kind]
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(got[0]["attention"].split(",", 1)[1]))))
    assert heat.shape == (32, 32, 4) and heat[..., 3].max() > 100 and heat[..., 3].min() < heat[..., 3].max()
    assert got[0]["attention"] == got[1]["attention"]  # the same image, the same map


def test_a_transfer_run_without_saved_predictions_reads_the_feature_cache(tiny_runs, tmp_path, monkeypatch):
    """Where the run kept no predictions, the frozen backbone's features come from the cache
    training filled (as `cifar4 evaluate` reads them), not from the backbone again."""
    import shutil

    from cifar4.models.transfer import TransferNet
    from cifar4.runs import PREDICTIONS_FILE
    ds, folders = tiny_runs
    saved = interpret_run(folders["transfer"], tmp_path / "a", data=ds, device="cpu", with_attention=False)
    bare = tmp_path / "bare"
    shutil.copytree(folders["transfer"], bare)
    (bare / PREDICTIONS_FILE).unlink()

    def no_backbone(self, x):
        raise AssertionError("the backbone ran: the cached features were not used")
    monkeypatch.setattr(TransferNet, "embed", no_backbone)
    fresh = interpret_run(bare, tmp_path / "b", data=ds, device="cpu", with_attention=False)
    assert fresh["confusion"] == saved["confusion"]
    assert fresh["loss"] == pytest.approx(saved["loss"], abs=1e-4)
