"""The practical session as one command (`cifar4 lab`): run its experiments in order, each in a
fixed run directory under the lab folder, so that a finished experiment is never rerun and an
interrupted one resumes from its last complete epoch; then write the report.

`--quick` runs the same set on a subset (2,000 training images, 600 validation and test) with a
sixth of the epochs and transfer backbones at 96 px at most, in its own folder, for CI, the
notebook and a first look.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rich.console import Console

from .. import config as cfgmod
from .. import data as datamod
from .. import locks, models, record, runs
from ..config import Experiment
from ..data import Dataset
from ..errors import ConfigError, LockedError
from ..training import pipeline


class Reference(BaseModel):
    """The session notebook's own result for one experiment."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    epochs: int = Field(gt=0)
    train: float = Field(ge=0, le=1)
    test: float = Field(ge=0, le=1)


class Questions(BaseModel):
    """Which runs answer the session's numeric questions."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    transfer_reference: str
    iterations: str
    parameters_model: str
    shapes_model: str
    gaps: list[str]


class SessionPlan(BaseModel):
    """lab/session.toml: the session's experiments, its own results, its questions."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    title: str
    experiments: list[str] = Field(min_length=1)
    gap_limit: float = Field(gt=0, lt=1)
    reference: dict[str, Reference]
    questions: Questions

    @model_validator(mode="after")
    def _known(self) -> SessionPlan:
        known = cfgmod.builtin_names()
        for n in [*self.experiments, *self.reference]:
            if n not in known:
                raise ValueError(f"experiment '{n}' is not a built-in experiment")
        if self.questions.transfer_reference not in self.reference:
            raise ValueError("questions.transfer_reference must name a [reference] table")
        return self


def load_plan(text: str, where: str = "lab/session.toml") -> SessionPlan:
    try:
        return SessionPlan.model_validate(tomllib.loads(text))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where} is not valid TOML ({e})") from None
    except ValidationError as e:
        raise ConfigError(cfgmod.explain(e, where)) from None


SESSION_PLAN = load_plan((resources.files("cifar4.lab") / "session.toml").read_text(encoding="utf-8"))
SESSION = tuple(SESSION_PLAN.experiments)
# A pretrained backbone's inputs are upsampled; its features cost about the square of the
# resolution, so a quick look runs it at 96 px at most: under a third of the cost of 160 px,
# and features still far better than at 32 px (docs/benchmarks)
QUICK = {"train_subset": 2000, "eval_subset": 600, "epoch_divisor": 6, "max_resolution": 96}


def quick_version(exp: Experiment) -> Experiment:
    """The experiment on a subset, with a sixth of its epochs (its members', for an
    ensemble) and a transfer backbone at QUICK's resolution at most."""
    d = exp.to_dict()
    d["data"]["train_subset"] = QUICK["train_subset"]
    d["data"]["eval_subset"] = QUICK["eval_subset"]
    if exp.model.name == "transfer":
        resolution = int(models.resolve_options("transfer", exp.model.options)["resolution"])
        d["model"]["options"] = {**d["model"].get("options", {}),
                                 "resolution": min(resolution, QUICK["max_resolution"])}
    if exp.ensemble is not None:  # the members' epochs shrink when they are trained
        d["ensemble"]["epochs_scale"] = 1 / QUICK["epoch_divisor"]
        return cfgmod.from_dict(d, f"experiment '{exp.name}' (quick)")
    quick: dict[str, Any] = {"epochs": max(1, math.ceil(d["train"]["epochs"] / QUICK["epoch_divisor"]))}
    if d["train"]["batch_size"] > QUICK["train_subset"]:
        quick["batch_size"] = QUICK["train_subset"]
    d["train"].update(quick)
    if d["train"].get("early_stopping"):
        d["train"]["early_stopping"]["patience"] = min(d["train"]["early_stopping"]["patience"], 1)
    d = cfgmod.unset_gpu(d, {"train": quick})  # quick on a GPU too
    return cfgmod.from_dict(d, f"experiment '{exp.name}' (quick)")


@dataclass
class LabEntry:
    name: str
    run_dir: Path
    status: str  # "done" (was finished before), "trained", "resumed"
    metrics: dict[str, Any]


def default_root(quick: bool) -> Path:
    return Path("lab-quick" if quick else "lab")


def lock(root: str | Path, wait: bool = True,
         console: Console | None = None) -> contextlib.AbstractContextManager[None]:
    """The lab folder's lock: one `cifar4 lab` works in a folder at a time. Another one waits
    (saying who holds it) or, without `wait`, stops with a LockedError."""
    console = console or Console(file=sys.stderr, soft_wrap=True)
    root = Path(root)
    return locks.hold(root / locks.LOCK_NAME, f"lab folder '{root}'", wait,
                      lambda msg: console.print(msg, highlight=False, markup=False))


def run_lab(names: list[str] | None = None, data: Dataset | str | Path | None = None,
            root: str | Path | None = None, quick: bool = False, progress: bool = True,
            console: Console | None = None, wait: bool = True,
            tensorboard: str | Path | None = None) -> list[LabEntry]:
    """Run (or skip, or resume) each experiment; return what each ended with. The lab folder is
    locked meanwhile (`wait=False`: a LockedError if another process works in it)."""
    console = console or Console(file=sys.stderr, soft_wrap=True)
    names = list(names or SESSION)
    known = cfgmod.builtin_names()
    for n in names:
        if n not in known and not n.endswith(".toml"):
            raise ConfigError(f"lab experiment '{n}' is unknown; expected one of {', '.join(SESSION)} "
                              f"or a .toml file")
    exps = [cfgmod.load(n) for n in names]
    if quick:
        exps = [quick_version(e) for e in exps]
    root = Path(root) if root else default_root(quick)
    ds = data if isinstance(data, Dataset) else datamod.load(data)
    with lock(root, wait, console):
        return [_run_one(exp, f"[{i}/{len(exps)}] {exp.name}", ds, root, progress, console, tensorboard)
                for i, exp in enumerate(exps, start=1)]


def _run_one(exp: Experiment, head: str, ds: Dataset, root: Path, progress: bool,
             console: Console, tensorboard: str | Path | None = None) -> LabEntry:
    """One experiment of the lab: kept if finished, resumed if interrupted, else trained."""
    folder = root / "runs" / exp.name
    if (folder / "metrics.json").exists():
        _check_same(folder, exp, ds)
        console.print(f"{head}: finished before, kept", highlight=False, markup=False)
        return LabEntry(exp.name, folder, "done", runs.read_metrics(folder))
    if locks.is_held(folder / locks.LOCK_NAME):  # e.g. `cifar4 train --resume` on it
        raise LockedError(f"run '{folder}' is in use by "
                          f"{locks.describe(locks.holder(folder / locks.LOCK_NAME))}; "
                          f"run the lab again when it is done")
    if (folder / "state" / "last.json").exists() or (folder / pipeline.ENSEMBLE_FILE).exists():
        _check_same(folder, exp, ds)
        console.print(f"{head}: resuming after an interruption", highlight=False, markup=False)
        r = pipeline.resume(folder, ds, progress=progress)
        status = "resumed"
    else:
        if folder.exists():  # died before its first epoch ended: nothing worth keeping
            shutil.rmtree(folder)
        console.print(f"{head}: {exp.description}", highlight=False, markup=False)
        r = pipeline.train(exp, ds, run_dir=folder, progress=progress, tensorboard=tensorboard)
        status = "trained"
    m = r.metrics
    feats = m.get("features")
    console.print(f"{head}: test accuracy {m['test_accuracy']:.4f}, train {m['train_accuracy']:.4f}, "
                  f"{m['train_seconds']:.0f}s" + (f" (+ {feats['seconds']:.0f}s of features, cache "
                                                 f"{feats['cache']})" if feats else ""), highlight=False, markup=False)
    return LabEntry(exp.name, folder, status, m)


def _check_same(folder: Path, exp: Experiment, ds: Dataset) -> None:
    """A lab folder holds one version of each experiment on one dataset: refuse to mix quick
    and full runs, an edited experiment with its old result, or runs on other data."""
    config = folder / "config.toml" if (folder / "config.toml").exists() else folder / pipeline.ENSEMBLE_FILE
    old = record.read_experiment(folder, config.name)
    if old != exp:
        raise ConfigError(f"'{folder}' holds a run of another version of experiment '{exp.name}'; "
                          f"use another --lab-dir or delete that run")
    try:
        trained_on = json.loads((folder / "run.json").read_text(encoding="utf-8")).get("data_sha256")
    except (OSError, ValueError):
        trained_on = None
    if trained_on not in (None, ds.checksum()):
        raise ConfigError(f"'{folder}' holds a run of '{exp.name}' on another dataset (sha256 {trained_on[:12]}..., "
                          f"this one is {ds.checksum()[:12]}... {datamod.dataset_name(ds)}); use another --lab-dir")
