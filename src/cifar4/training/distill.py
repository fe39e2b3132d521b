"""An ensemble's later members learning from its earlier ones (`[ensemble] distill`).

A later member trains on targets that mix its labels with the earlier members' predicted
probabilities on its training images: `(1 - distill) * one_hot(label) + distill * mean(softmax(
logits / distill_temperature))`. The earlier members are finished runs, so their logits come from
their own inputs (a tuned backbone's cached maps: a forward pass of its tuned blocks, no image
read again) and cost the later member seconds, counted in the ensemble's time like any step.

Only an earlier member that trained on the same training rows teaches: one that fell back to a
subset of them (a slow CPU's frozen features of fewer images) holds the inputs of those rows
alone, and computing the others would spend the time its fallback saved. A later member that
itself falls back to a subset takes the targets of its own rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import record
from ..config import EnsembleConfig, Experiment
from ..data import Dataset
from ..data.split import split_indices
from ..device import inference_precision, pick_device
from ..errors import ConfigError
from ..runs import load_model
from .evaluate_run import part_logits


@dataclass
class Targets:
    """Target probabilities for dataset rows (`rows`, in the order of `probs`), and what made them."""

    rows: np.ndarray
    probs: torch.Tensor
    record: dict[str, Any] = field(default_factory=dict)

    def for_rows(self, rows: np.ndarray) -> torch.Tensor:
        """The targets of `rows`: a run's training rows, all among `self.rows` (its own, or the
        subset a fallback reads)."""
        if np.array_equal(rows, self.rows):
            return self.probs
        order = np.argsort(self.rows)
        pos = order[np.clip(np.searchsorted(self.rows[order], rows), 0, len(order) - 1)]
        if not np.array_equal(self.rows[pos], rows):
            raise ConfigError("the distillation targets do not cover this member's training rows; "
                              "expected the ensemble's members on one split")
        return self.probs[torch.from_numpy(pos)]


def teacher_targets(teachers: list[Path], member: Experiment, ds: Dataset, ens: EnsembleConfig,
                    device: str = "auto") -> Targets | None:
    """The targets of `member`'s training rows from the finished runs `teachers` (those trained
    on the same rows; see the module's docstring), or None where none did."""
    t0 = time.perf_counter()
    _, idx = split_indices(member.data, ds)
    rows = idx["train"]
    dev = pick_device(device)
    used, left_out, probs = [], [], []
    for folder in teachers:
        texp = record.read_experiment(folder)
        if not np.array_equal(split_indices(texp.data, ds)[1]["train"], rows):
            left_out.append(folder.name)
            continue
        loaded = load_model(folder)
        logits = part_logits(loaded, texp, folder, loaded.images(ds), {"train": rows}, dev,
                             inference_precision(loaded.precision, dev), {"train": 0}, as_trained=True)["train"]
        loaded.model.cpu()
        probs.append(torch.softmax(logits.float() / ens.distill_temperature, 1))
        used.append(folder.name)
    if not probs:
        return None
    labels = torch.from_numpy(ds.Y[rows]).long()
    taught = torch.stack(probs).mean(0)
    mixed = (1 - ens.distill) * torch.nn.functional.one_hot(labels, ds.num_classes).float() + ens.distill * taught
    rec: dict[str, Any] = {"weight": ens.distill, "temperature": ens.distill_temperature, "teachers": used,
                           "teacher_agrees": round(float((taught.argmax(1) == labels).float().mean()), 4),
                           "seconds": round(time.perf_counter() - t0, 3)}
    if left_out:
        rec["left_out"] = left_out
    return Targets(rows, mixed, rec)
