"""One experiment over several seeds (`cifar4 train --seeds 0 1 2`, or `train.seeds = [...]` in
an experiment): one run per seed, then the mean and standard deviation of every accuracy and
loss, printed and written next to the runs as `<experiment>-seeds-<stamp>.json`. That is how an
accuracy should be stated: one seed's number is one draw.

Under a time budget each run may evaluate with fewer test-time views than the experiment's (the
budget's choice): the later seeds start from the first seed's choice, so that the runs are
evaluated alike, and the summary's `tta` lists each run's level."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import io as cio
from ..config import Experiment
from ..data import Dataset
from ..errors import ConfigError
from ..training import distributed, pipeline

SUMMARY_KEYS = ("train_accuracy", "val_accuracy", "test_accuracy", "train_loss", "val_loss", "test_loss",
                "fit_seconds", "total_seconds")


@dataclass
class SeedsResult:
    runs: list[pipeline.Result]
    summary: dict[str, Any]
    path: Path


def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarize(exp_name: str, results: list[pipeline.Result]) -> dict[str, Any]:
    """Mean and sample standard deviation of every accuracy, loss and timing over the runs."""
    ms = [r.metrics for r in results]
    out: dict[str, Any] = {"experiment": exp_name, "seeds": [m["seed"] for m in ms],
                           "runs": [str(r.run_dir) for r in results], "split": ms[0]["split"],
                           "tta": [m.get("tta") for m in ms]}
    for k in SUMMARY_KEYS:
        vals = [m[k] for m in ms if m.get(k) is not None]
        if vals:
            out[k] = _stats(vals)
    classes = list(ms[0]["per_class_accuracy"])
    out["per_class_accuracy"] = {c: _stats([m["per_class_accuracy"][c] for m in ms])["mean"] for c in classes}
    return out


def train_seeds(exp: Experiment, ds: Dataset, seeds: list[int], runs_root: str | Path = "runs",
                progress: bool = True, tensorboard: str | Path | None = None) -> SeedsResult:
    """Train `exp` once per seed (each its own run folder), then write the summary."""
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {seeds} repeats a seed; expected distinct seeds")
    results: list[pipeline.Result] = []
    for s in seeds:
        d = exp.to_dict()
        d["train"]["seed"], d["train"]["seeds"] = s, None
        d["name"] = exp.name
        if results and exp.train.time_budget and "tta" in results[0].metrics:
            # the first seed's budget chose its views: the others start there (a slower run may
            # still cut further, and then says so in its metrics and in the summary's `tta`)
            d["train"]["tta"] = results[0].metrics["tta"]
        one = Experiment.model_validate(d)
        results.append(pipeline.train(one, ds, runs_root=runs_root, run_name=f"{exp.name}-seed{s}",
                                      progress=progress, tensorboard=tensorboard))
    if not distributed.world().main:  # under torchrun: rank 0 summarizes and writes
        return SeedsResult(results, {}, Path(runs_root))
    summary = summarize(exp.name, results)
    path = Path(runs_root) / f"{exp.name}-seeds-{time.strftime('%Y%m%d-%H%M%S')}.json"
    cio.write_json(path, summary)
    return SeedsResult(results, summary, path)
