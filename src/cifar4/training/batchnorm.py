"""Batch-norm recalibration: running statistics recomputed at the current weights.

Running averages lag the weights they describe, and with a high learning rate they lag far
(the fast nets move their batch-norm shifts at 64 times a learning rate of 0.75 and average
with momentum 0.4): validation on them can sit near chance while the weights already classify
well. Recomputed from a few training batches at the weights as they are, the validation
accuracy is the weights' own: it then matches the same model's accuracy on training images
(docs/explanation/training-flow.md gives the measurements). The trainer does this before every
validation (train.bn_recalibrate batches), so the curve a user watches and the model saved at
the end are those of the weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm  # every batch norm: 1d, 2d, 3d, synchronised

from ..config import TrainConfig


def updated(model: nn.Module) -> list[_BatchNorm]:
    """The batch norms whose running statistics a training step updates: those tracking them
    and in training mode when the model is (a transfer net keeps its frozen layers' ImageNet
    statistics in evaluation mode: they are left alone)."""
    was = model.training
    model.train()
    try:
        return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    finally:
        model.train(was)


def statistics(model: nn.Module) -> list[torch.Tensor]:
    """Copies of the running statistics of the batch norms training updates (load_statistics
    puts them back)."""
    return [t.detach().clone() for m in updated(model) for t in m.buffers()]


def load_statistics(model: nn.Module, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for t, v in zip((t for m in updated(model) for t in m.buffers()), saved, strict=True):
            t.copy_(v)


def rows(n: int, cfg: TrainConfig) -> torch.Tensor:
    """The training rows (of `n`) that recalibration forwards: the first `cfg.bn_recalibrate`
    batches of an order drawn from the run's seed by a generator of their own, so the same seed
    recalibrates on the same rows and the training's generators are not drawn from."""
    g = torch.Generator()
    g.manual_seed(cfg.seed)
    return torch.randperm(n, generator=g)[:cfg.bn_recalibrate * cfg.batch_size]


def images(model: nn.Module, cfg: TrainConfig) -> int:
    """Images each validation forwards to recalibrate `model` first (0 without batch norm): what
    a time limit's plan counts with the validation split (at most; a smaller training set
    gives fewer)."""
    return cfg.bn_recalibrate * cfg.batch_size if cfg.bn_recalibrate and updated(model) else 0


def _unaugmented(xb: torch.Tensor) -> torch.Tensor:
    """A batch of stored rows as the model takes it without augmentation: images NHWC -> NCHW,
    cached feature views (N, views, dim) -> the first view (the image as it is)."""
    if xb.ndim == 4:
        return xb.permute(0, 3, 1, 2)
    return xb[:, 0] if xb.ndim == 3 else xb


@torch.no_grad()
def recalibrate(model: nn.Module, x_store: torch.Tensor, rows: torch.Tensor, batch_size: int,
                cast: Callable[[], contextlib.AbstractContextManager[object]]) -> list[_BatchNorm]:
    """Reset the running statistics of the batch norms training updates and set them to the
    cumulative average over `x_store[rows]` (stored as the trainer keeps them), `batch_size`
    rows at a time under `cast()` (the training precision, whose activations the statistics
    describe). Only those batch norms run in training mode: dropout stays off, so no random
    number is drawn and the statistics are those of the activations evaluation sees. The
    model's mode and momenta are restored. Returns the batch norms recalibrated."""
    norms = updated(model)
    if not norms or not len(rows):
        return []
    was, saved = model.training, [m.momentum for m in norms]
    model.eval()
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
            m.train()
        with cast():
            for i in range(0, len(rows), batch_size):
                model(_unaugmented(x_store[rows[i:i + batch_size]]))
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum
        model.train(was)
    return norms
