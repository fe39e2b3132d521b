"""Why a model fails and what it learned (`cifar4 interpret RUN`): for a finished run of any
kind, on one part of its split (test by default),

- the pairs of classes it confuses most, with counts, and per-class precision, recall and F1
  (scikit-learn's classification_report);
- its top losses: the images it got most wrong, with their true class, predicted class and the
  probability it gave that prediction;
- calibration: the expected calibration error (ECE) and a reliability diagram, as trained and
  after temperature scaling fitted on the validation split;
- attention maps (attribution.py): Grad-CAM on the last convolution (CNN, fast net, transfer
  backbone; an ensemble's members under its averaged output), gradient saliency for an MLP;
- for the session's CNN, its first-layer filters and the feature maps of one image.

It sits after evaluation in the flow (it reads a finished run and its saved predictions) and
before the report and the page, which show what it computes. Figures are PNG files and the
numbers one JSON file, `interpretation.json`, in `<run>/interpret/` unless told otherwise.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import config as cfgmod
from .. import data as datamod
from .. import io as cio
from ..data.split import split_indices
from ..device import pick_device
from ..errors import ConfigError, RunError
from ..models.ensemble import Ensemble
from ..runs import LoadedModel, load_model, read_metrics, read_predictions, resolve_run
from ..training.evaluate import softmax, summarize
from ..training.evaluate_run import part_logits
from . import calibration, figures
from .attribution import Maps, attention, captum_available, member_attention, require_captum

__all__ = ["FOLDER", "STEPS", "attention", "attention_maps", "cached", "captum_available", "heat_image",
           "interpret_run", "model_checksum", "read_interpretation", "sentence"]

RESULT_FILE = "interpretation.json"
FOLDER = "interpret"          # under the run directory, by default
PARTS = ("train", "val", "test")
STEPS = ("predictions", "confusion and top losses", "calibration", "attention maps", "figures")
TOP_LOSSES = 16
ATTENTION_IMAGES = 12


def interpret_run(run: str | Path, out: str | Path | None = None, split: str = "test",
                  data: str | Path | datamod.Dataset | None = None, device: str = "auto",
                  with_attention: bool = True, on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Interpret a finished run on the `split` part of its split; writes the figures and
    interpretation.json into `out` (default `<run>/interpret/`) and returns the numbers.
    `on_step(name)` is called as each of STEPS begins. `with_attention=False` leaves the
    maps out (they need the 'interpret' extra)."""
    if split not in PARTS:
        raise ConfigError(f"--split '{split}' is not a part of a run's split; expected one of {', '.join(PARTS)}")
    step = on_step or (lambda name: None)
    if with_attention:  # before any work: a missing extra is said at once
        require_captum()
    folder = resolve_run(run)
    target = Path(out) if out is not None else folder / FOLDER
    loaded = load_model(folder, device=pick_device(device))
    exp = cfgmod.from_dict(cfgmod.read_toml(folder / "config.toml"), f"'{folder}/config.toml'")
    ds = data if isinstance(data, datamod.Dataset) else datamod.load(data)
    if tuple(ds.classes) != loaded.classes:
        raise ConfigError(f"dataset '{ds.source}' has classes {', '.join(ds.classes)}; run '{folder}' "
                          f"was trained on {', '.join(loaded.classes)}")
    _, idx = split_indices(exp.data, ds)
    ds = loaded.images(ds)  # the size it was trained on
    if len(idx[split]) == 0 or len(idx["val"]) == 0:
        raise RunError(f"run '{folder}': its split has no {split if len(idx[split]) == 0 else 'val'} images "
                       f"to interpret")
    step(STEPS[0])
    trained_on = read_metrics(folder).get("data", {}).get("sha256")
    saved = read_predictions(folder) if trained_on == ds.checksum() else None  # else: computed here
    logits = {p: _logits(loaded, exp, folder, ds, idx[p], saved, p) for p in {split, "val"}}
    rows, y = idx[split], ds.Y[idx[split]]
    step(STEPS[1])
    res: dict[str, Any] = {"run": str(folder), "experiment": exp.name, "model": loaded.name, "split": split,
                           "images": int(len(rows)), "data": {"file": Path(ds.source.split(" (")[0]).name,
                                                              "sha256": ds.checksum()},
                           "model_sha256": model_checksum(folder)}
    res.update(_errors(logits[split], y, loaded.classes))
    step(STEPS[2])
    res["calibration"], rels = _calibration(logits[split], y, logits["val"], ds.Y[idx["val"]])
    step(STEPS[3])
    x = torch.from_numpy(ds.X[rows[:ATTENTION_IMAGES]])
    maps = _attention(loaded, x) if with_attention else []
    res["attention"] = [{"label": label, "method": m.method, "layer": m.layer} for label, m in maps]
    step(STEPS[4])
    res["figures"] = _figures(loaded, ds, rows, logits[split], res, rels, maps, target)
    res["summary"] = sentence(res)
    cio.write_json(target / RESULT_FILE, res)
    return res


def _logits(loaded: LoadedModel, exp: cfgmod.Experiment, folder: Path, ds: datamod.Dataset, rows: np.ndarray,
            saved: dict[str, tuple[np.ndarray, np.ndarray]] | None, part: str) -> torch.Tensor:
    """The split part's logits: those the run saved at its final evaluation when they are of
    these very rows of the data it was trained on, else computed as `cifar4 evaluate` computes
    them (a frozen backbone's head on cached features, an ensemble member by member), with the
    run's own views and precision."""
    if saved is not None and part in saved and np.array_equal(saved[part][0], rows):
        return torch.from_numpy(saved[part][1])
    tta = 0 if part == "train" else exp.train.tta
    return part_logits(loaded, exp, folder, ds, {part: rows}, loaded.device, loaded.inference_precision,
                       {part: tta}, as_trained=True)[part]


def _errors(logits: torch.Tensor, y: np.ndarray, classes: tuple[str, ...]) -> dict[str, Any]:
    """Accuracy, confusion, the most confused pairs (both directions together), per-class
    precision / recall / F1, and the top losses."""
    from sklearn.metrics import classification_report
    s = summarize(logits, y, classes)
    cm = np.asarray(s["confusion"])
    pairs: list[dict[str, Any]] = [{"classes": [classes[i], classes[j]], "count": int(cm[i, j] + cm[j, i]),
                                     f"{classes[i]} as {classes[j]}": int(cm[i, j]),
                                     f"{classes[j]} as {classes[i]}": int(cm[j, i])}
                                    for i in range(len(classes)) for j in range(i + 1, len(classes))]
    pairs.sort(key=lambda p: -p["count"])
    probs = softmax(logits)
    pred = probs.argmax(1)
    report = classification_report(y, pred, labels=list(range(len(classes))), target_names=list(classes),
                                   output_dict=True, zero_division=0)
    loss = -np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))
    top = np.argsort(-loss, kind="stable")[:TOP_LOSSES]
    return {"accuracy": s["accuracy"], "loss": s["loss"], "confusion": s["confusion"], "confused_pairs": pairs,
            "classification_report": report,
            "top_losses": [{"position": int(i), "true": classes[y[i]], "predicted": classes[pred[i]],
                            "probability": round(float(probs[i, pred[i]]), 4), "loss": round(float(loss[i]), 4)}
                           for i in top]}


def _calibration(logits: torch.Tensor, y: np.ndarray, val_logits: torch.Tensor,
                 val_y: np.ndarray) -> tuple[dict[str, Any], tuple[calibration.Reliability, calibration.Reliability]]:
    t = calibration.fit_temperature(val_logits, val_y)
    before = calibration.reliability(softmax(logits), y)
    after = calibration.reliability(softmax(logits / t), y)
    return ({"temperature": round(t, 4), "fitted_on": "val", "bins": calibration.BINS,
             "ece_before": before.ece, "ece_after": after.ece,
             "nll_before": calibration.nll(logits, y), "nll_after": calibration.nll(logits, y, t),
             "val_nll_before": calibration.nll(val_logits, val_y),
             "val_nll_after": calibration.nll(val_logits, val_y, t)}, (before, after))


def attention_maps(loaded: LoadedModel, x_uint8: torch.Tensor, target: torch.Tensor | None = None) -> Maps:
    """One map per uint8 image (N, 32, 32, 3) for the class `target` (default: the one the
    model predicts): Grad-CAM on the last convolution (for an ensemble, the mean of its
    members' maps), saliency for an MLP."""
    rows = _attention(loaded, x_uint8, target)
    if len(rows) == 1:
        return rows[0][1]
    mean = np.mean([m.maps for _, m in rows], axis=0)
    return Maps(rows[0][1].method, "members", mean / np.maximum(mean.max((1, 2), keepdims=True), 1e-12),
                rows[0][1].target)


def heat_image(heat: np.ndarray, opacity: float = 0.7) -> np.ndarray:
    """A map (H, W) in [0, 1] as an RGBA uint8 image to lay over its picture: jet colours,
    transparent where the map is low, `opacity` where it is highest."""
    from matplotlib import colormaps
    rgba = colormaps["jet"](np.clip(heat, 0, 1))
    rgba[..., 3] = opacity * np.clip(heat, 0, 1)
    return (rgba * 255).round().astype(np.uint8)


def _attention(loaded: LoadedModel, x_uint8: torch.Tensor,
               target: torch.Tensor | None = None) -> list[tuple[str, Maps]]:
    x = loaded.norm.apply(x_uint8.to(loaded.device)).contiguous()
    if target is not None:
        target = target.to(loaded.device)
    if isinstance(loaded.model, Ensemble):
        names = [str(m.get("model", "")) for m in loaded.options.get("members", [])]
        rows = member_attention(loaded.model, x, target)
        return [(f"member {i + 1} ({names[i] if i < len(names) else label})", maps)
                for i, (label, maps) in enumerate(rows)]
    return [(loaded.name, attention(loaded.model, x, target=target))]


def _figures(loaded: LoadedModel, ds: datamod.Dataset, rows: np.ndarray, logits: torch.Tensor,
             res: dict[str, Any], rels: tuple[calibration.Reliability, calibration.Reliability],
             maps: list[tuple[str, Maps]], target: Path) -> dict[str, str]:
    classes, y = loaded.classes, ds.Y[rows]
    name, split = res["experiment"], res["split"]
    out = {"top_losses": "top_losses.png", "reliability": "reliability.png"}
    probs = softmax(logits)
    pos = np.array([t["position"] for t in res["top_losses"]], dtype=np.int64)
    figures.top_losses(ds.X[rows[pos]], y[pos], probs[pos].argmax(1), probs[pos].max(1), classes,
                       target / out["top_losses"], f"{name}: the {len(pos)} {split} images with the highest loss")
    cal = res["calibration"]
    figures.reliability(*rels, cal["temperature"], target / out["reliability"],
                        f"{name}: reliability on {split} (temperature fitted on val)")
    if maps:
        n = min(ATTENTION_IMAGES, len(rows))
        out["attention"] = "attention.png"
        figures.attention(ds.X[rows[:n]], maps, y[:n], probs[:n].max(1), classes, target / out["attention"],
                          f"{name}: {maps[0][1].method} for the predicted class")
    if loaded.name == "cnn":
        out.update(_cnn_figures(loaded, ds.X[rows[0]], target, name))
    return out


def _cnn_figures(loaded: LoadedModel, image: np.ndarray, target: Path, name: str) -> dict[str, str]:
    """The session CNN's first convolution: its kernels, and its output for one image."""
    first = next(m for m in loaded.model.modules() if isinstance(m, torch.nn.Conv2d))
    figures.filters(first.weight.detach().float().cpu().numpy(), target / "filters.png",
                    f"{name}: the first layer's {first.out_channels} filters (3x3 RGB, each on its own scale)")
    with torch.no_grad():
        x = loaded.norm.apply(torch.from_numpy(image[None]).to(loaded.device))
        fmap = torch.relu(first(x.float()))[0].float().cpu().numpy()
    figures.feature_maps(image, fmap, target / "feature_maps.png",
                         f"{name}: the first layer's feature maps (after ReLU) for one image")
    return {"filters": "filters.png", "feature_maps": "feature_maps.png"}


def model_checksum(run: str | Path) -> str:
    """sha256 of a run's model.safetensors: names the weights an interpretation explains, so a
    run trained again over the same folder is not shown its old interpretation."""
    return hashlib.sha256((Path(run) / "model.safetensors").read_bytes()).hexdigest()


def cached(run: str | Path, ds: datamod.Dataset, split: str = "test") -> dict[str, Any] | None:
    """The interpretation already in `<run>/interpret/` when it is of this run's weights, this
    dataset and split (and has its attention maps where Captum is installed), else None."""
    res = read_interpretation(Path(run) / FOLDER)
    if res is None or res.get("split") != split or res.get("data", {}).get("sha256") != ds.checksum() \
            or res.get("model_sha256") != model_checksum(run) or (captum_available() and not res.get("attention")):
        return None
    return res


def read_interpretation(folder: str | Path) -> dict[str, Any] | None:
    """What interpret_run wrote in `folder` (a run's interpret/ folder), or None."""
    path = Path(folder) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"'{path}' is not valid JSON ({e}); run 'cifar4 interpret' again") from None


def sentence(res: dict[str, Any]) -> str:
    """What the numbers say, in one or two sentences."""
    pair = res["confused_pairs"][0] if res["confused_pairs"] else None
    cal = res["calibration"]
    a, b = (pair["classes"] if pair else ("", ""))
    text = (f"The most confused pair is {a}/{b} ({pair['count']} of {res['images']} {res['split']} images: "
            f"{pair[f'{a} as {b}']} {a} taken for {b}, {pair[f'{b} as {a}']} the other way)" if pair and pair["count"]
            else f"No {res['split']} image is confused")
    direction = "lowers" if cal["ece_after"] < cal["ece_before"] else "does not lower"
    verb = "overconfident" if cal["temperature"] > 1 else "underconfident"
    return (f"{text}; temperature scaling (T = {cal['temperature']:.2f}, fitted on val: the model was {verb}) "
            f"{direction} the ECE from {cal['ece_before']:.3f} to {cal['ece_after']:.3f}.")
