"""The learning-rate range test (`cifar4 lr-find EXPERIMENT`; Smith 2015, "Cyclical Learning
Rates for Training Neural Networks", as fastai's `lr_find` and Lightning's `Tuner.lr_find` run
it): a short training whose learning rate grows exponentially from `start` to `end`, one step
per rate, stopping once the smoothed loss diverges (above `diverge` times its lowest value).

It trains the experiment's own model, data pipeline (split, normalization, augmentation,
cached features for a frozen backbone) and optimizer (with its parameter groups' learning-rate
multipliers, weight decay and precision) through the same Trainer step as `cifar4 train`, then
throws the model away: nothing on disk changes but its plot and JSON.

The suggested rate is where the smoothed loss falls fastest against log(lr) (Lightning's
suggestion: the steepest descent, skipping the first and last points); the minimum's rate
divided by 10 (fastai's older `lr_min`; the first points left out as well) is reported beside
it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import config as cfgmod
from .. import data as datamod
from .. import io as cio
from .. import plots
from ..config import Experiment
from ..errors import ConfigError
from . import pipeline
from .train import KERAS_LR

SKIP_BEGIN, SKIP_END = 10, 1  # points left out of the steepest-descent search (as Lightning)


@dataclass
class LRFind:
    experiment: str
    lrs: list[float]
    losses: list[float]          # raw loss of each step
    smoothed: list[float]        # exponential moving average, bias-corrected
    suggested: float             # steepest descent of the smoothed loss
    min_over_10: float           # the lowest smoothed loss's rate / 10
    default_lr: float            # the experiment's own rate (Keras' default when it sets none)
    diverged: bool               # stopped early: the smoothed loss passed `diverge` x its minimum
    settings: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def command(self, start: str) -> str:
        """The exact training command that uses the suggested rate."""
        return f"cifar4 train -e {start} --lr {self.suggested:.3g}"


def lr_find(exp: Experiment | str | Path, data: datamod.Dataset | str | Path | None = None,
            out: str | Path = "lr-find", start: float = 1e-7, end: float = 10.0, steps: int = 300,
            diverge: float = 4.0, beta: float = 0.98,
            on_step: Callable[[int], None] | None = None) -> LRFind:
    """Run the range test for an experiment (a built-in name, a TOML file or an Experiment);
    writes `<out>/<name>-lr-find.png` and `.json` and returns what they hold."""
    if not 0 < start < end:
        raise ConfigError(f"--start {start} and --end {end}: expected 0 < start < end")
    if steps < SKIP_BEGIN + SKIP_END + 3:
        raise ConfigError(f"--steps {steps} is too few; expected at least {SKIP_BEGIN + SKIP_END + 3}")
    exp = exp if isinstance(exp, Experiment) else cfgmod.load(exp)
    if exp.ensemble is not None:
        raise ConfigError(f"experiment '{exp.name}' is an ensemble, whose members train with their own "
                          f"rates; expected one of its members' experiments")
    ds = data if isinstance(data, datamod.Dataset) else datamod.load(data)
    out = Path(out)
    lrs, losses, smoothed, diverged = _range_test(exp, ds, out, start, end, steps, diverge, beta, on_step)
    suggested, min_over_10 = suggest(lrs, smoothed)
    res = LRFind(exp.name, lrs, losses, smoothed, suggested, min_over_10,
                 exp.train.lr or KERAS_LR[exp.train.optimizer], diverged,
                 {"start": start, "end": end, "steps": steps, "diverge": diverge, "beta": beta,
                  "optimizer": exp.train.optimizer, "batch_size": exp.train.batch_size})
    res.files = {"plot": str(out / f"{exp.name}-lr-find.png"), "json": str(out / f"{exp.name}-lr-find.json")}
    plots.lr_range(lrs, losses, smoothed, suggested, min_over_10, res.default_lr, Path(res.files["plot"]),
                   f"{exp.name}: learning-rate range test ({exp.train.optimizer}, batch {exp.train.batch_size})")
    cio.write_json(Path(res.files["json"]), asdict(res))
    return res


def _range_test(exp: Experiment, ds: datamod.Dataset, out: Path, start: float, end: float, steps: int,
                diverge: float, beta: float,
                on_step: Callable[[int], None] | None) -> tuple[list[float], list[float], list[float], bool]:
    """One optimizer step per rate, through the run's own Trainer; (rates, losses, smoothed,
    diverged)."""
    run = pipeline._prepare(exp, ds, out)
    pipeline._build_model(run)
    pipeline._build_trainer(run, None, False, None, False)
    trainer = run.trainer
    assert trainer is not None
    x, y = trainer.store(run.x["train"], run.y["train"])
    base = exp.train.lr or KERAS_LR[exp.train.optimizer]
    groups = [(g, g.get("initial_lr", g["lr"]) / base) for g in trainer.optimizer.param_groups]
    trainer.model.train()
    order = torch.zeros(0, dtype=torch.long)
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    avg, best, b = 0.0, math.inf, exp.train.batch_size
    for i in range(steps):
        lr = start * (end / start) ** (i / (steps - 1))
        for g, scale in groups:
            g["lr"] = lr * scale
        if len(order) < b:  # a fresh random order when the last one is used up
            order = torch.randperm(len(x), generator=trainer.generator).to(x.device)
        idx, order = order[:b], order[b:]
        loss = float(trainer.train_step(x[idx], y[idx]).detach())
        avg = beta * avg + (1 - beta) * loss
        s = avg / (1 - beta ** (i + 1))
        lrs.append(lr)
        losses.append(loss)
        smoothed.append(s)
        if on_step is not None:
            on_step(i + 1)
        if not math.isfinite(s) or s > diverge * best:
            return lrs, losses, smoothed, True
        best = min(best, s)
    return lrs, losses, smoothed, False


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float, float]:
    """(steepest descent, minimum / 10) of the smoothed loss against log(lr). Points past a
    non-finite loss are left out."""
    lr = np.asarray(lrs, float)
    loss = np.asarray(smoothed, float)
    keep = np.isfinite(loss)
    lr, loss = lr[keep], loss[keep]
    inner = slice(SKIP_BEGIN, len(lr) - SKIP_END)
    if len(lr[inner]) < 3:  # diverged at once: the whole curve is the search range
        inner = slice(0, len(lr))
    # the first points average few losses: one lucky batch is not the minimum
    min_over_10 = float(lr[inner][int(np.argmin(loss[inner]))] / 10)
    if len(lr[inner]) < 2:
        return float(lr[0]), min_over_10
    grad = np.gradient(loss[inner], np.log10(lr[inner]))
    return float(lr[inner][int(np.argmin(grad))]), min_over_10
