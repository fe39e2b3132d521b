"""Callbacks: everything around the training loop that is not the step itself - the history,
the progress display, early stopping and best-model checkpointing - with Keras' names and
meanings (`History`, `EarlyStopping(monitor, patience, restore_best_weights)`,
`ModelCheckpoint(save_best_only)`), so the loop in train.py stays a few lines."""

from __future__ import annotations

import copy
import math
import sys
import time
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from .train import Trainer

HISTORY_KEYS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds", "lr")


class Callback:
    def on_train_begin(self, trainer: "Trainer") -> None: ...
    def on_epoch_begin(self, trainer: "Trainer", epoch: int) -> None: ...
    def on_batch_end(self, trainer: "Trainer", step: int, logs: dict[str, float]) -> None: ...
    def on_epoch_end(self, trainer: "Trainer", epoch: int, logs: dict[str, float]) -> None: ...
    def on_train_end(self, trainer: "Trainer") -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class History(Callback):
    """`history.history` is Keras' dict of lists; `rows` is one dict per epoch."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    @property
    def history(self) -> dict[str, list[float]]:
        return {k: [r[k] for r in self.rows] for k in HISTORY_KEYS if k != "epoch"}

    def on_epoch_end(self, trainer, epoch, logs):
        self.rows.append({k: logs[k] for k in HISTORY_KEYS})

    def state_dict(self):
        return {"rows": self.rows}

    def load_state_dict(self, state):
        self.rows = [dict(r) for r in state["rows"]]


def _better(monitor: str, a: float, b: float, min_delta: float) -> bool:
    return a > b + min_delta if "accuracy" in monitor else a < b - min_delta


class EarlyStopping(Callback):
    """Stop when `monitor` has not improved for `patience` epochs; optionally restore the best
    weights seen (Keras semantics)."""

    def __init__(self, monitor: str = "val_loss", patience: int = 5, min_delta: float = 0.0,
                 restore_best_weights: bool = True):
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.restore_best_weights = restore_best_weights
        self.best: float | None = None
        self.best_epoch = 0
        self.wait = 0
        self.best_weights: dict | None = None
        self.stopped_epoch: int | None = None

    def on_epoch_end(self, trainer, epoch, logs):
        value = logs[self.monitor]
        if self.best is None or _better(self.monitor, value, self.best, self.min_delta):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                self.best_weights = copy.deepcopy(trainer.model.state_dict())
        else:
            self.wait += 1
            if self.wait > self.patience:
                self.stopped_epoch = epoch
                trainer.stop_training = True

    def on_train_end(self, trainer):
        if self.restore_best_weights and self.best_weights is not None and self.best_epoch != len(trainer.history.rows):
            trainer.model.load_state_dict(self.best_weights)
            trainer.restored_epoch = self.best_epoch

    def state_dict(self):
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
                "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state):
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.wait, self.stopped_epoch = state["wait"], state["stopped_epoch"]


class ModelCheckpoint(Callback):
    """Keep the weights of the best epoch by `monitor` (save_best_only) and, at the end of
    training, load them back so the run's model is the best one seen."""

    def __init__(self, monitor: str = "val_accuracy"):
        self.monitor = monitor
        self.best: float | None = None
        self.best_epoch = 0
        self.best_weights: dict | None = None

    def on_epoch_end(self, trainer, epoch, logs):
        value = logs[self.monitor]
        if self.best is None or _better(self.monitor, value, self.best, 0.0):
            self.best, self.best_epoch = value, epoch
            self.best_weights = copy.deepcopy(trainer.model.state_dict())

    def on_train_end(self, trainer):
        if self.best_weights is not None:
            trainer.model.load_state_dict(self.best_weights)
            trainer.restored_epoch = self.best_epoch

    def state_dict(self):
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state):
        self.best, self.best_epoch = state["best"], state["best_epoch"]


class ProgressBar(Callback):
    """A live bar per epoch (steps, loss, accuracy, ETA) on a terminal; one Keras-like line
    per epoch otherwise (logs, CI, notebooks)."""

    def __init__(self, console: Console | None = None, title: str = ""):
        self.console = console or Console(file=sys.stderr)
        self.title = title
        self.progress: Progress | None = None
        self.task = None
        self.t0 = 0.0

    def on_epoch_begin(self, trainer, epoch):
        self.t0 = time.perf_counter()
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn(f"{self.title}epoch {epoch}/{trainer.epochs}"), BarColumn(),
                MofNCompleteColumn(), TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                console=self.console, transient=True)
            self.progress.start()
            self.task = self.progress.add_task("train", total=trainer.steps_per_epoch, stats="")

    def on_batch_end(self, trainer, step, logs):
        if self.progress is not None:
            self.progress.update(self.task, advance=1,
                                 stats=f"loss {logs['loss']:.4f} acc {logs['accuracy']:.4f}")

    def on_epoch_end(self, trainer, epoch, logs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        ms = 1000 * logs["seconds"] / max(trainer.steps_per_epoch, 1)
        self.console.print(
            f"{self.title}Epoch {epoch}/{trainer.epochs} - {trainer.steps_per_epoch} steps "
            f"{logs['seconds']:.1f}s ({ms:.0f}ms/step) - accuracy: {logs['accuracy']:.4f} - "
            f"loss: {logs['loss']:.4f} - val_accuracy: {logs['val_accuracy']:.4f} - "
            f"val_loss: {logs['val_loss']:.4f}", highlight=False, soft_wrap=True)

    def on_train_end(self, trainer):
        if self.progress is not None:
            self.progress.stop()


def is_finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
