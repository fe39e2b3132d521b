"""Curves where PyTorch users already look: `--tensorboard DIR` writes each run's per-epoch
scalars (loss, accuracy, val_loss, val_accuracy, lr, seconds) and, at the end, its
hyperparameters beside its final metrics, as TensorBoard event files under DIR/<run name>
(torch.utils.tensorboard). `tensorboard --logdir DIR` then compares runs and a sweep's trials
side by side while they train. Needs the 'tensorboard' extra."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import flatten
from ..errors import MissingExtraError, RunError
from .callbacks import Callback

SCALARS = ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds")


def _writer(log_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MissingExtraError("--tensorboard needs the 'tensorboard' extra; run: pip install "
                                "'cifar4[tensorboard]'") from None
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot write TensorBoard files in '{log_dir}': {e.strerror or e}") from None
    return SummaryWriter(log_dir=str(log_dir))


def _hparams(d: dict[str, Any]) -> dict[str, Any]:
    """An experiment's leaves as TensorBoard takes hyperparameters: scalars, and text for the
    rest (lists); unset values and empty tables left out."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v)
            for k, v in flatten(d).items() if v is not None and v != {}}


class TensorBoard(Callback):
    """Per-epoch scalars of one run; `finish` adds its hyperparameters and final metrics."""

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self.writer = _writer(self.log_dir)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        for k in SCALARS:
            if k in logs:
                self.writer.add_scalar(k, float(logs[k]), epoch)
        self.writer.flush()

    def finish(self, config: dict[str, Any], metrics: dict[str, Any]) -> None:
        final = {f"final/{k}": float(metrics[k]) for k in ("train_accuracy", "val_accuracy", "test_accuracy",
                                                           "val_loss", "fit_seconds")
                 if metrics.get(k) is not None}
        self.writer.add_hparams(_hparams({k: v for k, v in config.items() if k != "description"}), final,
                                run_name=".")
        self.writer.close()

    def close(self) -> None:
        self.writer.close()
