"""Re-evaluating a finished run (`cifar4 evaluate RUN`): its model, on the parts of the split
recorded in its config, with the data it was trained on or another dataset given by --data."""

from __future__ import annotations

from pathlib import Path

import torch

from . import config as cfgmod
from . import data as datamod
from .evaluate import report
from .pipeline import prepare_data
from .runs import load_model, resolve_run
from .train import bf16_is_fast


def evaluate_run(run: str | Path, data: str | Path | datamod.Dataset | None = None,
                 tta: int | None = None) -> dict:
    folder = resolve_run(run)
    loaded = load_model(folder)
    exp = cfgmod.from_dict(cfgmod.read_toml(folder / "config.toml"), f"'{folder}/config.toml'")
    ds = data if isinstance(data, datamod.Dataset) else datamod.load(data)
    sp, idx = prepare_data(exp, ds)
    tta = exp.train.tta if tta is None else tta
    prec = loaded.precision if bf16_is_fast(torch.device("cpu")) else "fp32"
    out: dict = {"run": str(folder), "data": ds.source, "tta": tta, "precision": prec,
                 "split": {"kind": sp.kind, "seed": sp.seed}}
    for part, rows in idx.items():
        r = report(loaded.model, torch.from_numpy(ds.X[rows]), torch.from_numpy(ds.Y[rows]),
                   loaded.norm, loaded.classes, precision=prec, tta=0 if part == "train" else tta)
        out[part] = {"images": int(len(rows)), **r}
    return out
