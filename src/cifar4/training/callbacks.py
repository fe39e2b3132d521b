"""Callbacks: everything around the training loop that is not the step itself - the history,
the progress display, early stopping and best-model checkpointing - with Keras' names and
meanings (`History`, `EarlyStopping(monitor, patience, restore_best_weights)`,
`ModelCheckpoint(save_best_only)`), so the loop in train.py stays a few lines."""

from __future__ import annotations

import copy
import inspect
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from safetensors.torch import save as st_save

from .. import io as cio
from ..models.weights import read_weights
from ..runs import HISTORY_KEYS

if TYPE_CHECKING:
    from .plan import Plan



class Callback:
    """Keras' Callback: the fit loop calls its hooks through a CallbackList, and it sees the
    training through `self.model` (the network), `self.params` (epochs, steps per epoch, the
    epoch a resumed run starts from, the total steps planned) and `self.plan` (what the run
    decided before training, training/plan.py; None for a trainer used on its own), never the
    trainer itself. To stop training, set `self.model.stop_training = True`, as in Keras; to
    change the run's length, set `self.params["total_steps"]` (a deadline callback does, in
    budget.py): the trainer reads it after every event, fits the learning-rate schedule to
    it and brings `params["epochs"]` in line. A callback that puts back earlier weights says
    which epoch in `self.restored_epoch`. `state_dict`/`load_state_dict` carry its state across
    an interruption, so a resumed run behaves as an uninterrupted one."""

    model: Any = None
    params: dict[str, Any] = {}  # replaced per instance by set_params
    plan: Plan | None = None
    restored_epoch: int | None = None

    def set_model(self, model: Any) -> None:
        self.model = model

    def set_params(self, params: dict[str, Any]) -> None:
        self.params = params

    def set_plan(self, plan: Plan | None) -> None:
        self.plan = plan

    @property
    def wants_batch_logs(self) -> bool:
        """Whether on_batch_end needs the running loss and accuracy (reading them waits for
        the device at every step, which a GPU run should not do)."""
        return type(self).on_batch_end is not Callback.on_batch_end

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None: ...
    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None: ...
    def on_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None: ...
    def on_batch_end(self, batch: int, logs: dict[str, float] | None = None) -> None: ...
    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None: ...
    def on_train_end(self, logs: dict[str, Any] | None = None) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


HOOKS = ("on_train_begin", "on_epoch_begin", "on_batch_begin", "on_batch_end", "on_epoch_end", "on_train_end")


def _takes_trainer(cb: Callback) -> bool:
    """A callback written for the earlier hooks, which took the trainer first
    (`on_epoch_end(self, trainer, epoch, logs)`)."""
    for name in HOOKS:
        fn = getattr(type(cb), name, None)
        if fn is None or fn is getattr(Callback, name):
            continue
        names = list(inspect.signature(fn).parameters)
        return len(names) > 1 and names[1] == "trainer"
    return False


class CallbackList:
    """Keras' CallbackList: one place that hands the model, params and plan to every callback
    and fires each event on all of them, in order. A callback still written with the trainer
    as its hooks' first argument works, with a one-line deprecation note."""

    def __init__(self, callbacks: Sequence[Callback], model: Any, params: dict[str, Any],
                 plan: Plan | None, trainer: Any = None):
        self.callbacks, self.params, self._trainer = list(callbacks), params, trainer
        self._legacy = {id(cb) for cb in self.callbacks if _takes_trainer(cb)}
        for cb in self.callbacks:
            cb.set_model(model)
            cb.set_params(params)
            cb.set_plan(plan)
            if id(cb) in self._legacy:
                warnings.warn(f"{type(cb).__name__}: callback hooks that take the trainer are deprecated; "
                              f"use on_epoch_end(epoch, logs) with self.model, self.params and self.plan",
                              DeprecationWarning, stacklevel=3)

    def __iter__(self) -> Iterator[Callback]:
        return iter(self.callbacks)

    @property
    def wants_batch_logs(self) -> bool:
        return any(cb.wants_batch_logs for cb in self.callbacks)

    @property
    def wants_batch_begin(self) -> bool:
        """Whether any callback acts before a step (the loop then calls it at each one)."""
        return any(type(cb).on_batch_begin is not Callback.on_batch_begin for cb in self.callbacks)

    def _fire(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            if id(cb) in self._legacy and getattr(type(cb), hook) is not getattr(Callback, hook):
                getattr(cb, hook)(self._trainer, *args)
            else:
                getattr(cb, hook)(*args)

    def on_train_begin(self) -> None:
        self._fire("on_train_begin")

    def on_epoch_begin(self, epoch: int) -> None:
        self._fire("on_epoch_begin", epoch)

    def on_batch_begin(self, batch: int) -> None:
        self._fire("on_batch_begin", batch)

    def on_batch_end(self, batch: int, logs: dict[str, float]) -> None:
        self._fire("on_batch_end", batch, logs)

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        self._fire("on_epoch_end", epoch, logs)

    def on_train_end(self) -> None:
        self._fire("on_train_end")

    def restored_epoch(self) -> int | None:
        """The epoch whose weights the model holds after training, where a callback put them
        back (the last one to do so wins: ModelCheckpoint's end-of-training restore comes
        after EarlyStopping's)."""
        out = None
        for cb in self.callbacks:
            if cb.restored_epoch is not None:
                out = cb.restored_epoch
        return out


class History(Callback):
    """`history.history` is Keras' dict of lists; `rows` is one dict per epoch."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    @property
    def history(self) -> dict[str, list[float]]:
        return {k: [r[k] for r in self.rows] for k in HISTORY_KEYS if k != "epoch"}

    def on_epoch_end(self, epoch, logs=None):
        assert logs is not None
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
        self.restored_epoch = None

    def on_train_begin(self, logs=None):
        if not self.params.get("initial_epoch"):  # a resumed run keeps the state it saved
            self._reset()

    def on_epoch_end(self, epoch, logs=None):
        value = _monitored("EarlyStopping", self.monitor, logs or {})
        if value is None:
            return
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights = copy.deepcopy(self.model.state_dict())
            self.best_epoch = epoch
        self.wait += 1
        if self.best is None or _better(self.monitor, value, self.best, self.min_delta):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                self.best_weights = copy.deepcopy(self.model.state_dict())
            return
        if self.wait >= self.patience and epoch > 1:
            self.stopped_epoch = epoch
            self.model.stop_training = True
            if self.restore_best_weights and self.best_weights is not None:
                self.model.load_state_dict(self.best_weights)
                self.restored_epoch = self.best_epoch

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

    def on_epoch_end(self, epoch, logs=None):
        value = _monitored("ModelCheckpoint", self.monitor, logs or {})
        if value is None:
            return
        if self.best is None or _better(self.monitor, value, self.best, 0.0):
            self.best, self.best_epoch = value, epoch
            state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            cio.write_bytes(self.filepath, st_save(state))

    def on_train_end(self, logs=None):
        if self.restore_at_end and self.best is not None:
            self.model.load_state_dict(read_weights(self.filepath))
            self.restored_epoch = self.best_epoch

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

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.perf_counter()
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn(f"{self.title}epoch {epoch}/{self.params['epochs']}"), BarColumn(),
                MofNCompleteColumn(), TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                console=self.console, transient=True)
            self.progress.start()
            self.task = self.progress.add_task("train", total=self.params["steps"], stats="")

    def on_batch_end(self, batch, logs=None):
        if self.progress is not None and self.task is not None and logs is not None:
            self.progress.update(self.task, advance=1,
                                 stats=f"loss {logs['loss']:.4f} acc {logs['accuracy']:.4f}")

    def on_epoch_end(self, epoch, logs=None):
        assert logs is not None
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        steps = self.params["steps"]
        ms = 1000 * logs["seconds"] / max(steps, 1)
        self.console.print(
            f"{self.title}Epoch {epoch}/{self.params['epochs']} - {steps} steps "
            f"{logs['seconds']:.1f}s ({ms:.0f}ms/step) - accuracy: {logs['accuracy']:.4f} - "
            f"loss: {logs['loss']:.4f} - val_accuracy: {logs['val_accuracy']:.4f} - "
            f"val_loss: {logs['val_loss']:.4f}", highlight=False, soft_wrap=True)

    def on_train_end(self, logs=None):
        if self.progress is not None:
            self.progress.stop()
