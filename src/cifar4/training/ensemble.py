"""Runs combined into a run (`cifar4 ensemble RUN RUN ...`, or an experiment with an
[ensemble] table): the weighted average of the members' class probabilities.

The members must have been trained on the same data and split. Their final evaluation's logits
(predictions.npz) are combined directly, so making an ensemble costs no inference; a member
without them is evaluated once here. Weights are given, equal, or chosen on the validation
split alone ("val": a grid over the weight simplex, best validation accuracy, then lowest
validation loss); the test split is never looked at to choose.

The result is an ordinary run folder: config.toml (model "ensemble", its members in the
options), model.json + model.safetensors (every member's weights: the run stands alone),
metrics.json, history.csv (no epochs of its own), curves.png (the members' validation curves),
confusion.png, summary.txt and predictions.npz. `evaluate`, `predict`, `compare`, the lab, the
server and `export` take it like any run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import config as cfgmod
from .. import data as datamod
from .. import io as cio
from .. import models, plots, record, runs
from ..config import Experiment
from ..data import Dataset
from ..data.split import sample_positions, split_indices
from ..data.transforms import Normalization
from ..device import inference_precision, pick_device
from ..errors import ConfigError, RunError
from .evaluate import accuracy_lines, predict_logits, summarize
from .features import CachedFeatures

PARTS = ("train", "val", "test")


@dataclass
class Member:
    folder: Path
    exp: Experiment
    metrics: dict[str, Any]
    loaded: runs.LoadedModel

    @property
    def spec(self) -> dict[str, Any]:
        """What the Ensemble model needs to rebuild and feed this member."""
        return {"run": self.folder.name, "experiment": self.exp.name, "model": self.loaded.name,
                "options": self.loaded.options, "normalization": self.loaded.norm.to_dict(),
                "tta": int(self.exp.train.tta), "precision": self.loaded.precision}


def _member(folder: str | Path) -> Member:
    path = runs.resolve_run(folder)
    metrics = runs.read_metrics(path)
    exp = record.read_experiment(path)
    return Member(path, exp, metrics, runs.load_model(path))


def _check_compatible(members: list[Member]) -> None:
    first = members[0]
    for m in members[1:]:
        if m.loaded.classes != first.loaded.classes:
            raise RunError(f"run '{m.folder}' has classes {', '.join(m.loaded.classes)}; "
                           f"'{first.folder}' has {', '.join(first.loaded.classes)}: expected the same")
        if m.metrics["data"]["sha256"] != first.metrics["data"]["sha256"]:
            raise RunError(f"run '{m.folder}' was trained on other data than '{first.folder}'; "
                           f"expected members of one dataset")
        # the same validation and test rows; a member may train on a subset of the training rows
        # (a time limit's fallback does where a frozen backbone's features of all would not fit)
        a, b = m.exp.data, first.exp.data
        if (a.split, a.split_seed, a.eval_subset) != (b.split, b.split_seed, b.eval_subset):
            def rows(d: cfgmod.DataConfig) -> str:
                return f"split {d.split} (seed {d.split_seed}" + \
                    (f", {d.eval_subset} validation and test rows)" if d.eval_subset else ")")
            raise RunError(f"run '{m.folder}' uses {rows(a)}, '{first.folder}' {rows(b)}; "
                           f"expected the same validation and test rows")


def _logits(m: Member, ds: Dataset, idx: dict[str, np.ndarray], device: torch.device,
            as_trained: bool = True) -> dict[str, torch.Tensor]:
    """The member's final-evaluation logits on each part, on the rows `idx` holds (the train
    part: the sample training evaluated), read from predictions.npz or computed (always
    computed where `ds` is not the size the member was evaluated at: `as_trained`)."""
    saved = (runs.read_predictions(m.folder) or {}) if as_trained else {}
    out = {}
    cached: CachedFeatures | None = None
    for part, rows in idx.items():
        if part in saved and len(saved[part][0]) == len(rows) and np.array_equal(saved[part][0], rows):
            out[part] = torch.from_numpy(saved[part][1])
            continue
        model = m.loaded.model
        tta = 0 if part == "train" else m.exp.train.tta
        if models.cached_inputs(model):  # a frozen backbone: its cache, as training read it
            cached = cached or CachedFeatures(m.exp, m.loaded.model, ds, idx, device, False, m.loaded.precision)
            out[part] = cached.logits(model.on_cache(), part, tta, "fp32")
            continue
        m.loaded.model.to(device)
        out[part] = predict_logits(m.loaded.model, torch.from_numpy(ds.X[rows]), m.loaded.norm,
                                   device=device, precision=inference_precision(m.loaded.precision, device),
                                   tta=tta)
    m.loaded.model.cpu()
    return out


def combine_probs(logits: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """log of the weighted mean of softmax(logits): what the Ensemble model outputs."""
    total = float(sum(weights))
    probs = sum(float(w) / total * torch.softmax(lg.float(), 1) for w, lg in zip(weights, logits, strict=True))
    assert isinstance(probs, torch.Tensor)
    return torch.log(probs.clamp_min(1e-12))


def choose_weights(val_logits: Sequence[torch.Tensor], y: torch.Tensor, step: float = 0.05) -> list[float]:
    """The weights (on a grid over the simplex) with the best validation accuracy, then the
    lowest validation loss. Coarser grid for more than three members."""
    k = len(val_logits)
    steps = round(1 / step) if k <= 3 else 10
    best: tuple[float, float] | None = None
    chosen = [1.0 / k] * k
    for c in itertools.product(range(steps + 1), repeat=k - 1):
        if sum(c) > steps:
            continue
        w = [v / steps for v in (*c, steps - sum(c))]
        if all(x == 0 for x in w):
            continue
        out = combine_probs(val_logits, w)
        acc = float((out.argmax(1) == y).float().mean())
        loss = float(torch.nn.functional.nll_loss(out, y))
        if best is None or (acc, -loss) > best:
            best, chosen = (acc, -loss), w
    return chosen


def parse_weights(weights: Sequence[float] | str | None, n: int) -> Sequence[float] | str:
    if weights is None or weights in ("equal", "val"):
        return weights or "equal"
    if isinstance(weights, str):
        raise ConfigError(f"ensemble weights '{weights}' are unknown; expected numbers, 'equal' or 'val'")
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ConfigError(f"{len(w)} ensemble weights for {n} members; expected one weight per member")
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ConfigError(f"ensemble weights {w}: expected non-negative numbers with a positive sum")
    return w


def make_ensemble(members: Sequence[str | Path], out: str | Path | None = None, runs_root: str | Path = "runs",
                  weights: Sequence[float] | str | None = None, data: Dataset | str | Path | None = None,
                  name: str = "ensemble", overwrite: bool = False, device: str = "auto",
                  experiment: Experiment | None = None, started: float | None = None,
                  extra: dict[str, Any] | None = None) -> runs.Result:
    """Combine finished runs into a new run folder (`out`, or runs_root/<name>-<stamp>).
    `experiment` and `started` (a perf_counter time): an ensemble experiment that trained the
    members itself; its total_seconds then runs from `started`, and one member may be all that
    is left (the others skipped under its time limit; `extra`: metrics.json keys saying so)."""
    t0 = time.perf_counter()
    started_at = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    ms = _check_members(members, one_is_enough=experiment is not None)
    w_spec = parse_weights(weights, len(ms))
    ds = data if isinstance(data, Dataset) else datamod.load(data)
    if ds.checksum() != ms[0].metrics["data"]["sha256"]:
        raise RunError(f"the members were trained on other data (sha256 {ms[0].metrics['data']['sha256'][:12]}...) "
                       f"than '{ds.source}'; pass the same --data")
    c = _combine(ms, ds, w_spec, pick_device(device))
    options = {"members": [m.spec for m in ms], "weights": c.weights}
    model = _ensemble_model(ms, options, len(ds.classes))
    exp = _ensemble_experiment(ms, name, options, experiment)
    with contextlib.ExitStack() as held:
        folder = runs.open_run(held, runs_root, name, out, overwrite)
        _write_files(folder, exp, model, options, ms, ds, c)
        metrics = _ensemble_metrics(ms, ds, c, model, name, w_spec, started_at)
        # a trained ensemble: from its start; runs combined afterwards: the members' own, added
        own = time.perf_counter() - t0
        metrics["ensemble_seconds"] = round(own, 3)
        metrics["total_seconds"] = round(time.perf_counter() - started, 3) if started is not None \
            else round(sum(float(m.metrics.get("total_seconds") or 0) for m in ms) + own, 3)
        summ = models.summary(model, "ensemble").text()
        cio.write_text(folder / "summary.txt", summ + "\n\n" + _text(metrics) + "\n")
        metrics.update(extra or {})
        metrics["finished_at"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        record.write_metrics(folder, metrics)  # last: its presence means finished
        return runs.Result(folder, metrics, [], model)


def _check_members(members: Sequence[str | Path], one_is_enough: bool) -> list[Member]:
    """The member runs, read and checked to share classes, data and split (an ensemble
    experiment's members may have been skipped: there one is enough)."""
    fewest, words = (1, "one run") if one_is_enough else (2, "two runs")
    if len(members) < fewest:
        raise ConfigError(f"an ensemble needs at least {words}; got {len(members)}")
    if len({Path(m).resolve() for m in members}) != len(members):
        raise ConfigError("the same run is named twice; expected distinct member runs")
    ms = [_member(m) for m in members]
    _check_compatible(ms)
    return ms


@dataclass
class _Combined:
    """The members' logits on each part, their weights and the weighted average's numbers."""

    split: Any
    idx: dict[str, np.ndarray]
    weights: list[float]
    combined: dict[str, torch.Tensor]
    res: dict[str, dict[str, Any]]
    member_res: list[dict[str, float]]
    device: torch.device
    size: int  # the side of the images the ensemble takes


def _combine(ms: list[Member], ds: Dataset, w_spec: Sequence[float] | str, dev: torch.device) -> _Combined:
    """Each member's final-evaluation logits, the weights (given, equal, or chosen on the
    validation split) and the combined probabilities' numbers on every part."""
    ref = min(ms, key=_train_split)  # its training rows are training rows of every member
    sp, idx = split_indices(ref.exp.data, ds)
    idx["train"] = idx["train"][sample_positions(len(idx["train"]), _train_rows(ref), sp.kind)]
    # One batch goes to every member: the smallest size any member takes (a transfer member
    # trained on larger images resizes inside; a 32 px member cannot take more)
    sized = ds.at_size(min(ds.size, *(m.loaded.input_size for m in ms)))
    logits = [_logits(m, sized, idx, dev, m.loaded.images(ds) is sized) for m in ms]
    y = {k: torch.from_numpy(ds.Y[v]) for k, v in idx.items()}
    w: list[float] = choose_weights([lg["val"] for lg in logits], y["val"]) if w_spec == "val" else \
        ([1.0] * len(ms) if w_spec == "equal" else [float(x) for x in w_spec])
    total = sum(w)
    w = [x / total for x in w]
    combined = {k: combine_probs([lg[k] for lg in logits], w) for k in PARTS}
    res = {k: summarize(combined[k], y[k], ds.classes) for k in PARTS}
    member_res = [{k: float((lg[k].argmax(1) == y[k]).float().mean()) for k in PARTS} for lg in logits]
    return _Combined(sp, idx, w, combined, res, member_res, dev, sized.size)


def _ensemble_model(ms: list[Member], options: dict[str, Any], num_classes: int) -> torch.nn.Module:
    """One model holding every member's weights: the run stands alone."""
    model = models.build("ensemble", num_classes=num_classes, **options)
    nets: torch.nn.ModuleList = model.members  # type: ignore[assignment]
    for net, m in zip(nets, ms, strict=True):
        net.load_state_dict(m.loaded.model.state_dict())
    return model


def _ensemble_experiment(ms: list[Member], name: str, options: dict[str, Any],
                         experiment: Experiment | None) -> Experiment:
    """config.toml of the ensemble: the experiment that trained it, else one naming its members."""
    description = "ensemble of " + ", ".join(f"{m.exp.name} ({m.folder.name})" for m in ms)
    if experiment is not None:  # the experiment that made it, so that `cifar4 train -e config.toml` repeats it
        return cfgmod.from_dict({**experiment.to_dict(), "description": description}, "ensemble")
    return cfgmod.from_dict({
        "name": name, "description": description,
        "model": {"name": "ensemble", "options": options},
        "data": ms[0].exp.data.model_dump(),
        "train": {"seed": ms[0].exp.train.seed, "epochs": 1, "tta": 0},
    }, "ensemble")


def _write_files(folder: Path, exp: Experiment, model: torch.nn.Module, options: dict[str, Any],
                 ms: list[Member], ds: Dataset, c: _Combined) -> None:
    """config.toml, run.json, the model, an empty history, the figures and predictions.npz."""
    record.write_experiment(folder, exp)
    record.write_run_info(folder, ds.source, ds.checksum())
    name = exp.name
    runs.save_model(folder, model, "ensemble", options, ds.classes, Normalization(), "fp32", c.size)
    runs.write_history(folder, [])
    plots.member_curves([(m.exp.name, runs.read_history(m.folder)) for m in ms], folder / "curves.png",
                        title=f"{name}: the members' validation accuracy")
    plots.confusion(c.res["test"]["confusion"], ds.classes, folder / "confusion.png",
                    title=f"{name}: test accuracy {c.res['test']['accuracy']:.4f}")
    runs.write_predictions(folder, {k: (c.idx[k], c.combined[k].numpy()) for k in PARTS})


def _ensemble_metrics(ms: list[Member], ds: Dataset, c: _Combined, model: torch.nn.Module, name: str,
                      w_spec: Sequence[float] | str, started_at: str) -> dict[str, Any]:
    """metrics.json of the ensemble (record.Metrics), before its timings."""
    res, w = c.res, c.weights
    trainable, non_trainable = models.count_params(model)

    def summed(key: str) -> float:
        return round(sum(float(m.metrics.get(key) or 0) for m in ms), 3)
    return record.metrics(
        experiment=name, model="ensemble", model_options={"weights": w},
        members=[{"run": str(m.folder), "experiment": m.exp.name, "weight": wi,
                  **{f"{k}_accuracy": r[k] for k in PARTS},
                  **{k: m.metrics.get(k) for k in ("fit_seconds", "warmup_seconds", "feature_seconds",
                                                   "total_seconds")}}
                 for m, wi, r in zip(ms, w, c.member_res, strict=True)],
        weights_chosen="validation" if w_spec == "val" else ("equal" if w_spec == "equal" else "given"),
        train_accuracy=res["train"]["accuracy"], val_accuracy=res["val"]["accuracy"],
        test_accuracy=res["test"]["accuracy"], train_loss=res["train"]["loss"],
        val_loss=res["val"]["loss"], test_loss=res["test"]["loss"],
        per_class_accuracy=res["test"]["per_class_accuracy"], confusion=res["test"]["confusion"],
        train_seconds=summed("train_seconds"),
        # the members' fits one after the other (a frozen backbone's feature extraction, which
        # its cache saves on later runs, is feature_seconds beside it)
        fit_seconds=summed("fit_seconds"), feature_seconds=summed("feature_seconds"),
        warmup_seconds=summed("warmup_seconds"),
        epochs=0, params=trainable + non_trainable, trainable_params=trainable,
        seed=ms[0].exp.train.seed,
        split={"kind": c.split.kind, "seed": c.split.seed,
               "train": max(_train_split(m) for m in ms),
               "val": len(c.idx["val"]), "test": len(c.idx["test"])},
        train_accuracy_images=len(c.idx["train"]),
        data={"source": ds.source, "sha256": ds.checksum(), "images": len(ds)},
        normalization=Normalization().to_dict(), precision="fp32", tta=0,
        versions=runs.versions(), machine=runs.machine(c.device), started_at=started_at)


def _train_split(m: Member) -> int:
    """How many training rows the member trained on (fewer than the split's where a subset)."""
    return int(m.metrics["split"]["train"])


def _train_rows(m: Member) -> int:
    """How many train rows the member's final evaluation measured (split.sample_positions)."""
    n = m.metrics.get("train_accuracy_images")
    return int(n) if n else _train_split(m)


def _text(m: dict[str, Any]) -> str:
    lines = [f"{mm['experiment']:<20} weight {mm['weight']:.2f}  val {mm['val_accuracy']:.4f}  "
             f"test {mm['test_accuracy']:.4f}  ({mm['run']})" for mm in m["members"]]
    return "\n".join([*lines, *accuracy_lines(m)])
