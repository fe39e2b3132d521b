#!/usr/bin/env python3
"""Validation accuracy of a transfer head against the number of feature levels it reads.

The frozen backbone's features are extracted once with every level (`levels` = the backbone's
count: for EfficientNet-Lite0 the head's 1,280 features, then the pooled outputs of its seven
stages, top first), through the feature cache; a model with `levels = L` reads the first
columns of that concatenation, so each L is a prefix. For each L and seed a head of the
experiment's shape (hidden layers, dropout) trains on the training split's features with the
experiment's optimizer settings (Adam, learning rate, label smoothing, epochs, batch size),
choosing the image or its mirror per row and step when the experiment flips, and is scored on
the validation split (with the mirror averaged in when the experiment's tta asks for it). The
test split is not read: this is how the presets' `levels` was chosen.

    python benchmarks/feature_levels.py transfer --levels 1 2 3 4 5 --seeds 0 1 2
    python benchmarks/feature_levels.py transfer-224 --data cifar10.npz --split official --train-images 12000

Prints one JSON object per head, then a table (mean +- std over the seeds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import cifar4
from cifar4 import config, models, runs
from cifar4.data.split import make_split
from cifar4.models.transfer import Head
from cifar4.training.features import feature_precision, feature_views, features
from common import mean_std


def train_head(exp, cols: int, tr: dict[str, torch.Tensor], va: dict[str, torch.Tensor],
               y_tr: torch.Tensor, y_va: torch.Tensor, classes: int, seed: int) -> float:
    torch.manual_seed(seed)
    opts = exp.model.options
    head = Head(cols, opts.get("head", []), classes, float(opts.get("dropout", 0.0)))
    t = exp.train
    opt = torch.optim.Adam(head.parameters(), lr=t.lr or 1e-3)
    n, batch = len(y_tr), t.batch_size
    for _ in range(t.epochs):
        head.train()
        order = torch.randperm(n)
        for i in range(0, n, batch):
            rows = order[i:i + batch]
            x = tr["plain"][rows, :cols]
            if "flip" in tr and exp.augment.flip:
                mirror = torch.rand(len(rows)) < 0.5
                x = torch.where(mirror[:, None], tr["flip"][rows, :cols], x)
            loss = F.cross_entropy(head(x), y_tr[rows], label_smoothing=t.label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    with torch.no_grad():
        views = ["plain", "flip"] if t.tta >= 1 and "flip" in va else ["plain"]
        p = torch.stack([head(va[v][:, :cols]).softmax(1) for v in views]).mean(0)
    return float((p.argmax(1) == y_va).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", help="a transfer experiment with a frozen backbone")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data", default=None)
    ap.add_argument("--split", default="session", choices=["session", "stratified", "official"])
    ap.add_argument("--train-images", type=int, default=None,
                    help="train on this many of the training split's images (spread evenly)")
    ap.add_argument("--resolution", type=int, default=None, help="instead of the experiment's")
    ap.add_argument("--epochs", type=int, default=None, help="instead of the experiment's")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    over: dict = {}
    if a.resolution:
        over["model"] = {"options": {"resolution": a.resolution}}
    if a.epochs:
        over["train"] = {"epochs": a.epochs}
    exp = config.load(a.experiment, over)
    ds = cifar4.load_dataset(a.data)
    sp = make_split(ds, a.split, 42)
    train_rows = sp.train
    if a.train_images and a.train_images < len(train_rows):
        train_rows = train_rows[np.linspace(0, len(train_rows) - 1, a.train_images).round().astype(int)]
    options = {**exp.model.options, "levels": 1}
    deepest = len(models.build("transfer", len(ds.classes), **options).backbone.level_widths())
    model = models.build("transfer", len(ds.classes), **{**options, "levels": deepest})
    model.load_pretrained()
    widths = model.backbone.level_widths()
    device = torch.device("cpu")
    precision = feature_precision(exp.train.precision, device)
    rows = np.concatenate([train_rows, sp.val])
    t0 = time.perf_counter()
    fs = features(model, ds, rows, feature_views(exp), device, precision)
    extraction = time.perf_counter() - t0
    n = len(train_rows)
    tr = {v: torch.from_numpy(f[:n]).float() for v, f in fs.views.items()}
    va = {v: torch.from_numpy(f[n:]).float() for v, f in fs.views.items()}
    y_tr, y_va = torch.from_numpy(ds.Y[train_rows]).long(), torch.from_numpy(ds.Y[sp.val]).long()
    results = []
    for levels in a.levels:
        cols = sum(widths[:levels])
        for seed in a.seeds:
            t = time.perf_counter()
            acc = train_head(exp, cols, tr, va, y_tr, y_va, len(ds.classes), seed)
            r = {"experiment": exp.name, "dataset": Path(ds.source).name, "split": a.split,
                 "train_images": n, "val_images": len(sp.val), "levels": levels, "features": cols,
                 "seed": seed, "val_accuracy": round(acc, 4), "head_seconds": round(time.perf_counter() - t, 2),
                 "extraction_seconds": round(extraction, 1), "views": list(fs.views),
                 "precision": precision, "cache": fs.status, "cpu": runs.machine(torch.device("cpu"))["cpu"]}
            print(json.dumps(r), flush=True)
            results.append(r)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    print("\n| levels | features | validation accuracy |\n|---|---|---|")
    for levels in a.levels:
        rs = [r for r in results if r["levels"] == levels]
        print(f"| {levels} | {rs[0]['features']} | {mean_std([r['val_accuracy'] for r in rs])} |")


if __name__ == "__main__":
    main()
