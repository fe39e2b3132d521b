"""Re-evaluating a finished run (`cifar4 evaluate RUN`): its model, on the parts of the split
recorded in its config, with the data it was trained on or another dataset given by --data."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import data as datamod
from .. import record
from ..data.split import split_indices
from ..device import inference_precision, pick_device
from ..runs import load_model, resolve_run
from .evaluate import report


def evaluate_run(run: str | Path, data: str | Path | datamod.Dataset | None = None,
                 tta: int | None = None, device: str = "auto") -> dict:
    folder = resolve_run(run)
    loaded = load_model(folder)
    exp = record.read_experiment(folder)
    ds = data if isinstance(data, datamod.Dataset) else datamod.load(data)
    sp, idx = split_indices(exp.data, ds)
    tta = exp.train.tta if tta is None else tta
    dev = pick_device(device)  # the GPU when there is one
    prec = inference_precision(loaded.precision, dev)
    loaded.model.to(dev)
    out: dict = {"run": str(folder), "data": ds.source, "tta": tta, "precision": prec, "device": str(dev),
                 "split": {"kind": sp.kind, "seed": sp.seed}}
    for part, rows in idx.items():
        r = report(loaded.model, torch.from_numpy(ds.X[rows]), torch.from_numpy(ds.Y[rows]),
                   loaded.norm, loaded.classes, device=dev, precision=prec,
                   tta=0 if part == "train" else tta)
        out[part] = {"images": int(len(rows)), **r}
    return out
