"""The plan of a run: everything decided before its first training step, in one frozen object.

A run first resolves what it will do - the device and whether the experiment's [gpu] table
applies, the recipe or the fallback that fits its time limit (from measured step times), the
precision (measured once), the compiled kernels, the final evaluation's test-time views, the
epochs and schedule - then prints the plan, writes it once (config.toml holds the experiment
as it runs, run.json the plan), and the trainer carries it out. Nothing in the training loop
decides which network, precision or views it uses; only the number of steps still follows the
clock under a time budget or limit (budget.Deadline, a callback the pipeline adds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import Experiment
from ..models import native
from .precision import Choice


@dataclass(frozen=True)
class Plan:
    """What a run will do, and why (`reasons`, in the order the choices were made)."""

    exp: Experiment                       # the experiment as it runs (variant merged in)
    device: torch.device
    precision: Choice                     # the training precision and why
    kernels: native.Status | None = None  # compiled CPU kernels the model uses (None: none)
    steps_per_epoch: int = 0
    gpu: dict[str, Any] | None = None     # the [gpu] table merged in (None: not on a GPU, or none)
    fallback: dict[str, Any] | None = None  # a time limit's choice among the fallbacks (metrics' `fallback`)
    reasons: tuple[str, ...] = field(default_factory=tuple)
    train_images: int = 0                 # the data the plan was made for: its training images,
    classes: int = 0                      # its classes (the model's outputs),
    eval_images: int = 0                  # and the final evaluation's image views

    @property
    def tta(self) -> int:
        return int(self.exp.train.tta)

    @property
    def epochs(self) -> int:
        return int(self.exp.train.epochs)

    def to_record(self) -> dict[str, Any]:
        """The plan as run.json holds it (record.PlanInfo)."""
        t = self.exp.train
        return {"device": str(self.device), "gpu_variant": self.gpu is not None,
                "fallback": None if self.fallback is None else self.fallback["used"],
                "precision": self.precision.precision, "precision_reason": self.precision.reason,
                "matmul_weight_grads": self.precision.matmul_weight_grads,
                "kernels": None if self.kernels is None else self.kernels.reason,
                "tta": self.tta, "epochs": self.epochs, "steps_per_epoch": self.steps_per_epoch,
                "schedule": t.schedule, "time_limit": t.time_limit or None, "time_budget": t.time_budget,
                "reasons": list(self.reasons), "train_images": self.train_images, "classes": self.classes,
                "eval_images": self.eval_images}

    def news(self) -> list[str]:
        """The lines a run prints about its plan: what was chosen where it is not the obvious
        default (a pooling kernel built or missing, a precision not simply as asked)."""
        out = list(self.reasons)
        k = self.kernels
        if k is not None and (k.build_seconds or not k.compiled):
            out.append(f"pooling: {k.reason}")
        c = self.precision
        if c.reason and c.reason != "as asked":
            out.append(f"precision {c.precision}: {c.reason}" + (" (measured earlier on this machine)"
                                                                  if c.cached else ""))
        return out
