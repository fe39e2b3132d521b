"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def by_experiment(results: list[dict]) -> dict[str, list[dict]]:
    """Runs grouped by experiment, in the order they came."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["experiment"], []).append(r)
    return groups


def emit(row: dict, rows: list[dict]) -> None:
    """Print a result as one JSON line (a long series shows as it goes) and keep it in `rows`."""
    print(json.dumps(row), flush=True)
    rows.append(row)


def write_rows(rows: list[dict], out: str | None) -> None:
    """All the results as one JSON list at `out`, where one is given."""
    if out:
        Path(out).write_text(json.dumps(rows, indent=1) + "\n")


def mean_std(values: list[float]) -> str:
    """'0.9290 +- 0.0011' (the sample standard deviation), or the one value."""
    return f"{statistics.mean(values):.4f}" + (f" +- {statistics.stdev(values):.4f}" if len(values) > 1 else "")


@dataclass
class StepSetup:
    """An experiment's training step on random images, as the step benchmarks time it: its model
    (channels_last), optimizer and augmentation at its batch size, 20 batches of inputs."""
    exp: Any
    model: Any
    optimizer: Any
    augment: Any
    x: Any
    y: Any
    generator: Any
    batch_size: int

    def batch(self, i: int) -> tuple[Any, Any]:
        """The i-th batch (cycling through the 20), augmented as the experiment says."""
        rows = slice(i % 20 * self.batch_size, (i % 20 + 1) * self.batch_size)
        xb = self.augment(self.x[rows], self.generator) if self.augment.active else self.x[rows]
        return xb, self.y[rows]


def step_setup(name: str) -> StepSetup:
    import torch

    from cifar4 import config, models
    from cifar4.data.transforms import Augment
    from cifar4.training.train import make_optimizer

    exp = config.load(name)
    torch.manual_seed(0)
    model = models.build(exp.model.name, **exp.model.options).to(memory_format=torch.channels_last)
    bs = exp.train.batch_size
    return StepSetup(exp, model, make_optimizer(model, exp.train), Augment(**exp.augment.model_dump()),
                     torch.rand(20 * bs, 3, 32, 32).contiguous(memory_format=torch.channels_last),
                     torch.randint(0, 4, (20 * bs,)), torch.Generator().manual_seed(0), bs)
