"""Evaluation: loss and accuracy as the session prints them, per-class accuracy, the
confusion matrix, and flip test-time augmentation (average the logits of an image and its
mirror)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import InputTransform, tta_views
from ..device import autocast
from ..models.base import inference_batch

CPU_BATCH = 128  # measured on 2 cores (fast net, bf16): faster per image than 1000, whose maps leave the caches


@torch.no_grad()
def predict_logits(model: nn.Module, x_uint8: torch.Tensor, norm: InputTransform,
                   batch_size: int = 1000, device: torch.device | str = "cpu",
                   precision: str = "fp32", tta: int = 0) -> torch.Tensor:
    """Logits (N, C) in float32 on the CPU, for uint8 NHWC images, averaged over the
    test-time-augmentation views of `tta_views`."""
    device = torch.device(device)
    if device.type == "cpu":  # small batches stay in the CPU's caches
        batch_size = min(batch_size, CPU_BATCH)
    batch_size = inference_batch(model, batch_size, device)  # large inputs: small CPU batches
    was_training = model.training
    model.eval()
    cast = autocast(device, precision)
    out = []
    try:
        for i in range(0, len(x_uint8), batch_size):
            xb = norm.apply(x_uint8[i:i + batch_size].to(device))
            with cast:
                views = tta_views(xb, int(tta))
                logits = torch.stack([model(v).float() for v in views]).mean(0)
            out.append(logits.cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def evaluate(model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, norm: InputTransform,
             batch_size: int = 1000, device: torch.device | str = "cpu", precision: str = "fp32",
             tta: int = 0) -> dict[str, float]:
    """{'loss', 'accuracy'}, like Keras' model.evaluate."""
    logits = predict_logits(model, x_uint8, norm, batch_size, device, precision, tta)
    y = torch.as_tensor(y).cpu()
    return {"loss": float(F.cross_entropy(logits, y)),
            "accuracy": float((logits.argmax(1) == y).float().mean())}


def report(model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, norm: InputTransform,
           classes: tuple[str, ...], device: torch.device | str = "cpu", precision: str = "fp32",
           tta: int = 0) -> dict:
    """Loss, accuracy, per-class accuracy and confusion matrix (rows: true, columns: predicted)."""
    logits = predict_logits(model, x_uint8, norm, device=device, precision=precision, tta=tta)
    return summarize(logits, y, classes)


def summarize(logits: torch.Tensor, y: torch.Tensor | np.ndarray, classes: tuple[str, ...]) -> dict:
    """`report`'s numbers from logits already computed."""
    y_np = torch.as_tensor(y).cpu().numpy().astype(np.int64)
    pred = logits.argmax(1).numpy()
    k = len(classes)  # rows: true class, columns: predicted (one bincount, without scikit-learn's slow import)
    cm = np.bincount(y_np * k + pred, minlength=k * k).reshape(k, k)
    per_class = {c: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else float("nan"))
                 for i, c in enumerate(classes)}
    return {"loss": float(F.cross_entropy(logits, torch.as_tensor(y_np))),
            "accuracy": float((pred == y_np).mean()),
            "per_class_accuracy": per_class,
            "confusion": cm.tolist()}


def softmax(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.float(), dim=1).numpy()


def accuracy_lines(m: dict[str, Any]) -> list[str]:
    """The session's closing lines (train, val, test accuracy) from a run's metrics."""
    n, total = m.get("train_accuracy_images", m["split"]["train"]), m["split"]["train"]
    return [
        f"Performance on the TRAIN set, ACCURACY= {m['train_accuracy']:.4f}  (loss {m['train_loss']:.4f})"
        + (f"  [{n} of {total} images]" if n < total else ""),
        f"Performance on the VAL set,   ACCURACY= {m['val_accuracy']:.4f}  (loss {m['val_loss']:.4f})",
        (f"Performance on the TEST set,  ACCURACY= {m['test_accuracy']:.4f}  (loss {m['test_loss']:.4f})"
         if m.get("test_accuracy") is not None else "TEST set held out (not evaluated)"),
    ]

