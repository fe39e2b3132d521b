"""Re-evaluating a finished run (`cifar4 evaluate RUN`): its model, on the parts of the split
recorded in its config, with the data it was trained on or another dataset given by --data.

It measures what training's final evaluation measured, the same way, so that it takes a small
part of the training's time:
- the train part is the rows training measured (TRAIN_EVAL_ROWS of the split, a sample of all
  its classes: split.sample_positions), read from the run's predictions.npz when the data
  is the run's; `full_train` measures every train image instead (the whole split went through the model before, 70 % of
  the images: most of the time of a transfer run's evaluation);
- a frozen backbone's features come from the feature cache, as training took them, rather
  than from the backbone again (an EfficientNet at 224 px on every image was the rest of it),
  and so do an ensemble's frozen-backbone members'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from .. import data as datamod
from .. import models, record
from ..data.split import TRAIN_EVAL_ROWS, sample_positions, split_indices
from ..device import inference_precision, pick_device
from ..errors import RunError
from ..models.ensemble import Ensemble
from ..runs import LoadedModel, load_model, read_predictions, resolve_run
from .evaluate import predict_logits, summarize
from .features import CachedFeatures


def evaluate_run(run: str | Path, data: str | Path | datamod.Dataset | None = None,
                 tta: int | None = None, device: str = "auto", full_train: bool = False) -> dict:
    """Loss, accuracy, per-class accuracy and confusion of a run on its split's train, val and
    test parts (train: the rows training measured, or all of them with `full_train`)."""
    folder = resolve_run(run)
    loaded = load_model(folder)
    exp = record.read_experiment(folder)
    ds = data if isinstance(data, datamod.Dataset) else datamod.load(data)
    sp, idx = split_indices(exp.data, ds)
    ds = loaded.images(ds)  # the size it was trained on
    if not full_train:
        idx["train"] = idx["train"][sample_positions(len(idx["train"]), TRAIN_EVAL_ROWS, sp.kind)]
    tta = exp.train.tta if tta is None else tta
    dev = pick_device(device)  # the GPU when there is one
    prec = inference_precision(loaded.precision, dev)
    out: dict = {"run": str(folder), "data": ds.source, "tta": tta, "precision": prec, "device": str(dev),
                 "split": {"kind": sp.kind, "seed": sp.seed}}
    logits = _saved_train(folder, ds, idx)
    todo = {k: v for k, v in idx.items() if k not in logits}
    views = {"train": 0, "val": tta, "test": tta}
    logits.update(part_logits(loaded, exp, folder, ds, todo, dev, prec, views, as_trained=tta == exp.train.tta))
    for part, rows in idx.items():
        out[part] = {"images": int(len(rows)), **summarize(logits[part], torch.from_numpy(ds.Y[rows]),
                                                           loaded.classes)}
    return out


def _saved_train(folder: Path, ds: datamod.Dataset, idx: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The train part's logits from training's final evaluation, when they are of these rows
    of this very data (same checksum); else nothing."""
    saved = read_predictions(folder) or {}
    rows, logits = saved.get("train", (None, None))
    if rows is None or not np.array_equal(rows, idx["train"]):
        return {}
    try:
        run_data = record.read_run_info(folder).get("data_sha256")
    except RunError:
        return {}
    return {"train": torch.from_numpy(logits)} if run_data == ds.checksum() else {}


def part_logits(loaded: LoadedModel, exp: Any, folder: Path, ds: datamod.Dataset, idx: dict[str, np.ndarray],
            dev: torch.device, prec: str, tta: dict[str, int], as_trained: bool) -> dict[str, torch.Tensor]:
    """Each part's logits: a frozen backbone's head on cached features; an ensemble member by
    member (each in its own way); any other model, or views other than the run's (features
    hold the image and its mirror alone), on the images. `as_trained`: `tta` is the run's own
    setting (so cached features and members' own views apply). `cifar4 interpret` comes here too."""
    model = loaded.model.to(dev)
    if as_trained and models.cached_inputs(model):
        cached = CachedFeatures(exp, loaded.model, ds, _every_part(idx), dev, False, loaded.precision)
        head: nn.Module = model.on_cache()
        return {k: cached.logits(head, k, tta[k], prec) for k in idx}
    members = _member_experiments(loaded, folder) if as_trained and not any(tta.values()) else None
    if members is not None:  # as Ensemble.forward: the log of the members' weighted mean probabilities
        ens = cast(Ensemble, model)
        per = [_member_logits(ens, i, m, ds, idx, dev, loaded, prec) for i, m in enumerate(members)]
        w = cast(torch.Tensor, ens.weights).tolist()
        return {k: torch.log(torch.stack([w[i] * torch.softmax(p[k], 1) for i, p in enumerate(per)]).sum(0)
                             .clamp_min(1e-12)) for k in idx}
    return {k: predict_logits(model, torch.from_numpy(ds.X[rows]), loaded.norm, device=dev, precision=prec,
                              tta=tta[k]) for k, rows in idx.items()}


def _every_part(idx: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`idx` with no rows for the parts it leaves out (CachedFeatures takes the three)."""
    return {k: idx.get(k, np.empty(0, np.int64)) for k in ("train", "val", "test")}


def _member_experiments(loaded: LoadedModel, folder: Path) -> list[Any | None] | None:
    """An ensemble's members' experiments, from the member runs it keeps (members/<run>), None
    for a member without one; None for a model that is no ensemble or keeps no member's."""
    if loaded.name != "ensemble":
        return None
    found: list[Any | None] = []
    for spec in loaded.options.get("members", []):
        cfg = folder / "members" / str(spec.get("run", "")) / "config.toml"
        found.append(record.read_experiment(cfg.parent) if cfg.is_file() else None)
    return found if any(m is not None for m in found) else None


class _OneMember(nn.Module):
    """Member i of an ensemble as a model of its own (its normalization, views and precision)."""

    def __init__(self, ensemble: Ensemble, i: int):
        super().__init__()
        self.ensemble, self.i = ensemble, i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ensemble.member_logits(self.i, x)


def _member_logits(model: Ensemble, i: int, exp: Any, ds: datamod.Dataset, idx: dict[str, np.ndarray],
                   dev: torch.device, loaded: LoadedModel, prec: str) -> dict[str, torch.Tensor]:
    net: nn.Module = model.members[i]
    if exp is not None and models.cached_inputs(net):
        cached = CachedFeatures(exp, model.members[i], ds, _every_part(idx), dev, False, model.precisions[i])
        head: nn.Module = net.on_cache()
        return {k: cached.logits(head, k, 0 if k == "train" else model.tta[i], prec) for k in idx}
    one = _OneMember(model, i)
    return {k: predict_logits(one, torch.from_numpy(ds.X[rows]), loaded.norm, device=dev, precision=prec,
                              tta=0) for k, rows in idx.items()}
