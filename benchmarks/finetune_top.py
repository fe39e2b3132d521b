#!/usr/bin/env python3
"""Validation accuracy of a transfer model whose top blocks are fine-tuned on cached
activations, against the same model with its backbone frozen.

Fine-tuning through the whole backbone at 224 px costs some 0.4 G multiply-adds per image and
step: far beyond two CPU cores. Everything below the top blocks can still be frozen and run
once: the script extracts the activations that enter the top `--blocks` blocks of
EfficientNet-Lite0 (7x7x192 at 224 px below the last block, stored in fp16), then trains on
them, for each seed:

- frozen: the top blocks and head convolution as ImageNet left them; a head of the
  experiment's shape on their pooled output, the pooled output of the last stage and the
  pooled activations themselves (the `levels = 3` features when one block is on top), trained
  for the experiment's epochs;
- tuned: the same, with the top blocks and the head convolution trained too (their batch
  norms keep ImageNet's statistics), at `--lr-top`, for `--epochs`.

Both arms use Adam with a one-cycle schedule at the experiment's rate, batch size and label
smoothing, and the same augmentation, a mirror view: by default (`--mirror map`) the cached
activation map mirrored, which costs no second extraction; `--mirror image` extracts the
activations of the mirror images too, as the frozen presets' mirror view is made. Validation
averages the two views. The test split is not read.

    python benchmarks/finetune_top.py transfer-224 --seeds 0 1 2
    python benchmarks/finetune_top.py transfer-224 --seeds 0 1 2 --arms frozen --mirror image
    python benchmarks/finetune_top.py transfer-224 --data cifar10.npz --split official --train-images 12000

Prints one JSON object per arm and seed (the tuned arm's per epoch), then a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import cifar4
from cifar4 import config, models, runs
from cifar4.data.split import make_split
from cifar4.models.efficientnet import STAGE_ENDS
from cifar4.models.transfer import Head
from cifar4.training.features import feature_precision
from common import mean_std


def activations(model, ds, rows: np.ndarray, bf16: bool, mirror: bool = False) -> torch.Tensor:
    """The activation maps entering the tuned blocks of `model` (a transfer model with
    `tune_blocks`: its `cache_embed`, batch norms folded) for the rows' images, or their mirror
    images (fp16)."""
    out = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(rows), model.max_batch):
            x = torch.from_numpy(ds.X[rows[i:i + model.max_batch]]).permute(0, 3, 1, 2).float() / 255
            x = x.flip(3) if mirror else x
            out.append(model.cache_embed(x).view(len(x), *model.cache_shape).to(torch.float16))
    return torch.cat(out)


class Top(nn.Module):
    """The backbone above block `cut` and a head on three pooled levels: the head
    convolution's, the last block's and the cached activations'."""

    def __init__(self, backbone, cut: int, hidden, classes: int, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList([backbone._blocks[i] for i in range(cut + 1, len(backbone._blocks))])
        self.conv_head, self.bn1 = backbone._conv_head, backbone._bn1
        widths = (backbone._conv_head.out_channels, backbone._conv_head.in_channels,
                  backbone._blocks[cut]._project_conv.out_channels)
        self.head = Head(sum(widths), hidden, classes, dropout)

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [*self.blocks.parameters(), *self.conv_head.parameters(), *self.bn1.parameters()]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for block in self.blocks:
            h = block(h)
        top = F.relu6(self.bn1(self.conv_head(h)))
        return torch.cat([top.mean((2, 3)), h.mean((2, 3)), x.mean((2, 3))], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def train(self, mode: bool = True) -> Top:
        super().train(mode)
        for m in (*self.blocks, self.bn1):  # ImageNet's batch statistics are kept
            m.eval()
        return self


def _mirror(acts: torch.Tensor, images: torch.Tensor | None, rows) -> torch.Tensor:
    """The mirror view of cached activations: those of the mirror images where extracted,
    else the mirrored activation map."""
    return (images[rows] if images is not None else acts[rows].flip(3)).float()


def fit(arm: str, exp, make_top, a_tr, y_tr, a_va, y_va, epochs: int, lr_top: float, bf16: bool,
        seed: int, report, m_tr: torch.Tensor | None = None, m_va: torch.Tensor | None = None) -> float:
    torch.manual_seed(seed)
    top = make_top()
    tuned = arm == "tuned"
    for p in top.backbone_parameters():
        p.requires_grad_(tuned)
    t = exp.train
    groups = [{"params": list(top.head.parameters()), "lr": t.lr or 1e-3}]
    if tuned:
        groups.append({"params": top.backbone_parameters(), "lr": lr_top})
    opt = torch.optim.Adam(groups)
    n, batch = len(y_tr), t.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], pct_start=0.15,
                                                total_steps=epochs * -(-n // batch))
    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    start = time.perf_counter()
    if not tuned:  # the top is fixed: its features once, for the image map and its mirror
        top.eval()
        with torch.no_grad(), cast:
            plain = torch.cat([top.features(a_tr[i:i + 512].float()).float() for i in range(0, n, 512)])
            mirror = torch.cat([top.features(_mirror(a_tr, m_tr, slice(i, i + 512))).float() for i in range(0, n, 512)])
    acc = 0.0
    for epoch in range(epochs):
        top.train()
        order = torch.randperm(n)
        for i in range(0, n, batch):
            rows = order[i:i + batch]
            flip = torch.rand(len(rows)) < 0.5
            if tuned:
                with cast:
                    out = top(torch.where(flip[:, None, None, None], _mirror(a_tr, m_tr, rows),
                                          a_tr[rows].float())).float()
            else:
                out = top.head(torch.where(flip[:, None], mirror[rows], plain[rows]))
            loss = F.cross_entropy(out, y_tr[rows], label_smoothing=t.label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if tuned or epoch == epochs - 1:
            top.eval()
            with torch.no_grad(), cast:
                p = torch.cat([top(a_va[i:i + 256].float()).float().softmax(1)
                               + top(_mirror(a_va, m_va, slice(i, i + 256))).float().softmax(1)
                               for i in range(0, len(a_va), 256)])
            acc = float((p.argmax(1) == y_va).float().mean())
            report({"arm": arm, "seed": seed, "epoch": epoch + 1, "val_accuracy": round(acc, 4),
                    "train_seconds": round(time.perf_counter() - start, 1)})
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", help="a transfer experiment on efficientnet-lite0")
    ap.add_argument("--blocks", type=int, default=1, help="top backbone blocks to fine-tune")
    ap.add_argument("--epochs", type=int, default=6, help="epochs of the tuned arm")
    ap.add_argument("--lr-top", type=float, default=5e-4, help="peak rate of the tuned blocks")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=["frozen", "tuned"], choices=["frozen", "tuned"])
    ap.add_argument("--data", default=None)
    ap.add_argument("--split", default="session", choices=["session", "stratified", "official"])
    ap.add_argument("--train-images", type=int, default=None,
                    help="train on this many of the training split's images (spread evenly)")
    ap.add_argument("--resolution", type=int, default=None, help="instead of the experiment's")
    ap.add_argument("--mirror", default="map", choices=["map", "image"],
                    help="the mirror view: the cached map mirrored, or the mirror image's activations "
                         "(a second extraction)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    exp = config.load(a.experiment, {"model": {"options": {"resolution": a.resolution}}} if a.resolution else None)
    ds = cifar4.load_dataset(a.data)
    sp = make_split(ds, a.split, 42)
    train_rows = sp.train
    if a.train_images and a.train_images < len(train_rows):
        train_rows = train_rows[np.linspace(0, len(train_rows) - 1, a.train_images).round().astype(int)]
    opts = exp.model.options
    if opts.get("backbone", "efficientnet-lite0") != "efficientnet-lite0":
        raise SystemExit(f"{a.experiment}: expected an efficientnet-lite0 backbone")
    model = models.build("transfer", len(ds.classes), **{**opts, "levels": 1, "tune_blocks": a.blocks})
    model.load_pretrained()
    cut = model.cut - 1  # the block whose output is cached
    bf16 = feature_precision(exp.train.precision, torch.device("cpu")) == "bf16"
    t0 = time.perf_counter()
    a_tr, a_va = (activations(model, ds, r, bf16) for r in (train_rows, sp.val))
    m_tr = m_va = None
    if a.mirror == "image":
        m_tr, m_va = (activations(model, ds, r, bf16, mirror=True) for r in (train_rows, sp.val))
    extraction = time.perf_counter() - t0
    y_tr, y_va = torch.from_numpy(ds.Y[train_rows]).long(), torch.from_numpy(ds.Y[sp.val]).long()
    common = {"experiment": exp.name, "dataset": Path(ds.source).name, "split": a.split,
              "train_images": len(train_rows), "val_images": len(sp.val), "blocks": a.blocks,
              "cut_block": cut, "activation_shape": list(a_tr.shape[1:]), "lr_top": a.lr_top, "mirror": a.mirror,
              "extraction_seconds": round(extraction, 1), "precision": "bf16" if bf16 else "fp32",
              "cpu": runs.machine(torch.device("cpu"))["cpu"], "stage_ends": list(STAGE_ENDS)}
    results: list[dict] = []

    def report(r: dict) -> None:
        r = {**common, **r}
        print(json.dumps(r), flush=True)
        results.append(r)

    def make_top() -> Top:
        fresh = models.build("transfer", len(ds.classes), **{**opts, "levels": 1, "tune_blocks": 0})
        fresh.load_pretrained()
        return Top(fresh.backbone, cut, opts.get("head", []), len(ds.classes), float(opts.get("dropout", 0.0)))

    final: dict[str, list[float]] = {arm: [] for arm in a.arms}
    for seed in a.seeds:
        for arm in a.arms:
            epochs = a.epochs if arm == "tuned" else exp.train.epochs
            final[arm].append(fit(arm, exp, make_top, a_tr, y_tr, a_va, y_va, epochs, a.lr_top, bf16, seed, report,
                                  m_tr, m_va))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    print("\n| arm | epochs | validation accuracy |\n|---|---|---|")
    for arm in a.arms:
        print(f"| {arm} | {a.epochs if arm == 'tuned' else exp.train.epochs} | {mean_std(final[arm])} |")


if __name__ == "__main__":
    main()
