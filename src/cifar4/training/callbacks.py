"""Callbacks: everything around the training loop that is not the step itself - the history,
the progress display, early stopping and best-model checkpointing - with Keras' names and
meanings (`History`, `EarlyStopping(monitor, patience, restore_best_weights)`,
`ModelCheckpoint(save_best_only)`), so the loop in train.py stays a few lines."""

from __future__ import annotations

import copy
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from safetensors.torch import save as st_save

from .. import io as cio
from ..models.weights import read_weights
from ..runs import HISTORY_KEYS

if TYPE_CHECKING:
    from .train import Trainer



class Callback:
    @property
    def wants_batch_logs(self) -> bool:
        """Whether on_batch_end needs the running loss and accuracy (reading them waits for
        the device at every step, which a GPU run should not do)."""
        return type(self).on_batch_end is not Callback.on_batch_end

    def on_train_begin(self, trainer: Trainer) -> None: ...
    def on_epoch_begin(self, trainer: Trainer, epoch: int) -> None: ...
    def on_batch_end(self, trainer: Trainer, step: int, logs: dict[str, float]) -> None: ...
    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None: ...
    def on_train_end(self, trainer: Trainer) -> None: ...

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


def _monitored(who: str, monitor: str, logs: dict[str, float]) -> float | None:
    """The monitored value, or None with Keras' warning when the logs lack it."""
    value = logs.get(monitor)
    if value is None:
        warnings.warn(f"{who}: monitor '{monitor}' is not in the logs ({', '.join(logs)}); it does "
                      f"nothing this epoch", stacklevel=3)
    return value


def _better(monitor: str, a: float, b: float, min_delta: float) -> bool:
    """Keras' improvement test: accuracies must rise, losses fall, by more than min_delta."""
    return a > b + min_delta if "accuracy" in monitor else a < b - min_delta


class EarlyStopping(Callback):
    """Keras' `EarlyStopping`, rule for rule (keras/src/callbacks/early_stopping.py):

    - every epoch without improvement of `monitor` by more than `min_delta` adds one to
      `wait`; an improvement sets it back to 0;
    - training stops at the end of the first epoch where `wait >= patience` (never the first
      epoch): with patience 2, the second epoch without improvement is the last one trained;
    - `restore_best_weights`: when it stops training, the weights of the best epoch are put
      back; a training that runs all its epochs keeps its last weights, as in Keras;
    - a missing `monitor` key warns and does nothing.

    Defaults are Keras': monitor "val_loss", min_delta 0, patience 0, restore_best_weights
    False. (The `--early-stopping PATIENCE` flag asks for restore_best_weights=True.)"""

    def __init__(self, monitor: str = "val_loss", patience: int = 0, min_delta: float = 0.0,
                 restore_best_weights: bool = False):
        self.monitor, self.patience, self.min_delta = monitor, patience, abs(min_delta)
        self.restore_best_weights = restore_best_weights
        self._reset()

    def _reset(self) -> None:
        self.best: float | None = None
        self.best_epoch = 0
        self.wait = 0
        self.best_weights: dict | None = None
        self.stopped_epoch: int | None = None

    def on_train_begin(self, trainer):
        if trainer.start_epoch == 0:  # a resumed run keeps the state it saved
            self._reset()

    def on_epoch_end(self, trainer, epoch, logs):
        value = _monitored("EarlyStopping", self.monitor, logs)
        if value is None:
            return
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights = copy.deepcopy(trainer.model.state_dict())
            self.best_epoch = epoch
        self.wait += 1
        if self.best is None or _better(self.monitor, value, self.best, self.min_delta):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                self.best_weights = copy.deepcopy(trainer.model.state_dict())
            return
        if self.wait >= self.patience and epoch > 1:
            self.stopped_epoch = epoch
            trainer.stop_training = True
            if self.restore_best_weights and self.best_weights is not None:
                trainer.model.load_state_dict(self.best_weights)
                trainer.restored_epoch = self.best_epoch

    def state_dict(self):
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
                "stopped_epoch": self.stopped_epoch, "best_weights": self.best_weights}

    def load_state_dict(self, state):
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.wait, self.stopped_epoch = state["wait"], state["stopped_epoch"]
        self.best_weights = state.get("best_weights")


class ModelCheckpoint(Callback):
    """Keras' `ModelCheckpoint(filepath, monitor, save_best_only=True)`: whenever `monitor`
    improves, the weights are written to `filepath` (safetensors, atomically), so the best
    epoch survives on disk. Then, unlike Keras, the end of training loads that file back, so
    the run's model is the best epoch's (`train.checkpoint_best`)."""

    def __init__(self, filepath: str | Path, monitor: str = "val_accuracy", restore_at_end: bool = True):
        self.filepath, self.monitor, self.restore_at_end = Path(filepath), monitor, restore_at_end
        self.best: float | None = None
        self.best_epoch = 0

    def on_epoch_end(self, trainer, epoch, logs):
        value = _monitored("ModelCheckpoint", self.monitor, logs)
        if value is None:
            return
        if self.best is None or _better(self.monitor, value, self.best, 0.0):
            self.best, self.best_epoch = value, epoch
            state = {k: v.detach().cpu().contiguous() for k, v in trainer.model.state_dict().items()}
            cio.write_bytes(self.filepath, st_save(state))

    def on_train_end(self, trainer):
        if self.restore_at_end and self.best is not None:
            trainer.model.load_state_dict(read_weights(self.filepath))
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
        self.task: TaskID | None = None
        self.t0 = 0.0

    @property
    def wants_batch_logs(self) -> bool:
        return self.console.is_terminal  # the live bar; a log gets one line per epoch

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
        if self.progress is not None and self.task is not None:
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
