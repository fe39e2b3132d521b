"""One experiment end to end: dataset -> split -> normalization -> model -> fit -> evaluation
-> run directory. `train()` is what `cifar4 train` and the lab call; `resume()` continues an
interrupted run from its last complete epoch with the same result as an uninterrupted one."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import shutil
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import config as cfgmod
from . import data as datamod
from . import io as cio
from . import features, locks, models, plots, runs
from .callbacks import Callback, EarlyStopping, History, ModelCheckpoint, ProgressBar
from .config import Experiment
from .data import Dataset
from .errors import ConfigError, RunError
from .evaluate import predict_logits, report, summarize
from .split import Split, make_split
from .train import Trainer, pick_device, resolve_precision, seed_everything
from .transforms import Augment, FeatureInput, Normalization, ViewSample


@dataclass
class Result:
    """What a finished training returns: where it lives and its numbers."""

    run_dir: Path
    metrics: dict[str, Any]
    history: list[dict]
    model: torch.nn.Module


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("cifar4", "torch", "numpy", "scikit-learn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    out = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def prepare_data(exp: Experiment, ds: Dataset) -> tuple[Split, dict[str, np.ndarray]]:
    sp = make_split(ds, exp.data.split, exp.data.split_seed)
    idx = {"train": sp.train, "val": sp.val, "test": sp.test}
    if exp.data.train_subset:
        idx["train"] = idx["train"][:exp.data.train_subset]
    if exp.data.eval_subset:
        idx["val"] = idx["val"][:exp.data.eval_subset]
        idx["test"] = idx["test"][:exp.data.eval_subset]
    return sp, idx


class _SaveEachEpoch(Callback):
    """After every epoch: the history so far and the full training state, so that a killed run
    loses at most the epoch in progress and `--resume` continues exactly. The state (54 MB for
    the deep MLP with Adam) is copied, then written and fsynced by a background thread while
    the next epoch trains; the next save, and the end of training, wait for it."""

    def __init__(self, folder: Path, extra: dict[str, Any]):
        self.folder, self.extra = folder, extra
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def _write(self, state: dict[str, Any], epoch: int) -> None:
        try:
            runs.save_state(self.folder, state, epoch, self.extra)
        except BaseException as e:  # surfaced in the training thread by _wait
            self._error = e

    def on_epoch_end(self, trainer, epoch, logs):
        self._wait()
        runs.write_history(self.folder, trainer.history.rows)
        state = runs.snapshot(trainer.state_dict())
        self._thread = threading.Thread(target=self._write, args=(state, epoch), daemon=True)
        self._thread.start()

    def on_train_end(self, trainer):
        self._wait()

    def settle(self) -> None:
        """Let a save in flight finish (training was interrupted): the last complete epoch
        then stays on disk, whole."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _callbacks(exp: Experiment, progress: bool, title: str) -> list[Callback]:
    cbs: list[Callback] = [History()]
    if progress:
        cbs.append(ProgressBar(title=title))
    es = exp.train.early_stopping
    if es is not None:
        cbs.append(EarlyStopping(es.monitor, es.patience, es.min_delta, es.restore_best_weights))
    if exp.train.checkpoint_best:
        cbs.append(ModelCheckpoint("val_accuracy"))
    return cbs


def train(exp: Experiment | str | Path, data: Dataset | str | Path | None = None,
          runs_root: str | Path = "runs", run_dir: str | Path | None = None,
          overwrite: bool = False, progress: bool = True, save_state: bool = True,
          callbacks: list[Callback] | None = None) -> Result:
    """Train one experiment (an Experiment, a built-in name or a TOML path) and write its run.
    `callbacks` are added after the built-in ones (history, progress, early stopping, ...)."""
    if not isinstance(exp, Experiment):
        exp = cfgmod.load(exp)
    ds = data if isinstance(data, Dataset) else datamod.load(data)
    with contextlib.ExitStack() as held:
        if run_dir is not None and overwrite and Path(run_dir).is_dir():
            held.enter_context(locks.run_lock(run_dir))  # never clear a run another process trains
        folder = runs.create_run_dir(runs_root, exp.name, run_dir, overwrite)
        held.enter_context(locks.run_lock(folder))
        cio.write_text(folder / "config.toml", exp.to_toml())
        cio.write_json(folder / "run.json", {"data": ds.source, "data_sha256": ds.checksum()})
        return _run(exp, ds, folder, progress, save_state, resume_state=None, extra=callbacks)


def resume(run_dir: str | Path, data: Dataset | str | Path | None = None,
           progress: bool = True) -> Result:
    """Continue an interrupted run from its last complete epoch (same config, same data)."""
    folder = runs.resolve_run(run_dir)
    with locks.run_lock(folder):  # refused while another process trains this run
        if (folder / "metrics.json").exists():
            raise RunError(f"run '{folder}' is already finished; nothing to resume")
        exp = cfgmod.from_dict(cfgmod.read_toml(folder / "config.toml"), f"'{folder}/config.toml'")
        ds = data if isinstance(data, Dataset) else datamod.load(data)
        st = runs.load_state(folder)
        if st is not None and st[1].get("data_sha256") not in (None, ds.checksum()):
            raise RunError(f"run '{folder}' was trained on other data (sha256 "
                           f"{st[1]['data_sha256'][:12]}...); pass the same --data")
        return _run(exp, ds, folder, progress, True, resume_state=st)


def _run(exp: Experiment, ds: Dataset, folder: Path, progress: bool, save_state: bool,
         resume_state: tuple[dict, dict] | None, extra: list[Callback] | None = None) -> Result:
    started = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    t_start = time.perf_counter()
    sp, idx = prepare_data(exp, ds)
    if exp.train.batch_size > len(idx["train"]):  # before any costly step
        raise ConfigError(f"train.batch_size {exp.train.batch_size} is larger than the training set "
                          f"({len(idx['train'])} images); expected at most {len(idx['train'])}")
    device = pick_device(exp.train.device)
    norm = Normalization.from_config(exp.data.scale, exp.data.standardize, ds.X[idx["train"]])
    generator = seed_everything(exp.train.seed)
    model = models.build(exp.model.name, num_classes=ds.num_classes, **exp.model.options)
    if hasattr(model, "load_pretrained"):  # a transfer backbone's ImageNet weights
        model.load_pretrained()
    if hasattr(model, "init_from_data"):  # e.g. the fast net's whitening layer
        model.init_from_data(norm.apply(torch.from_numpy(ds.X[idx["train"][:5000]])))
    options = models.resolve_options(exp.model.name, exp.model.options)
    aug = Augment(**exp.augment.model_dump())
    cbs = _callbacks(exp, progress, title=f"{exp.name} ")
    if progress:
        cbs[1].console.print(f"{exp.name}: {exp.model.name} on {len(idx['train'])} images "
                             f"({sp.kind} split), {exp.train.epochs} epochs, {device.type}; run "
                             f"directory {folder}", highlight=False, soft_wrap=True)
    if save_state:
        cbs.append(_SaveEachEpoch(folder, {"data_sha256": ds.checksum()}))
    cbs += list(extra or [])
    y = {k: torch.from_numpy(ds.Y[v]) for k, v in idx.items()}
    cached = _CachedFeatures(exp, model, ds, idx, device, progress) if getattr(model, "frozen", False) \
        else None
    if cached is not None:  # a frozen backbone: only the head trains, on cached features
        trainer = Trainer(model.head, exp.train, FeatureInput(), cached.augment, device, cbs, generator)
        x = cached.train_inputs()
    else:
        trainer = Trainer(model, exp.train, norm, aug, device, cbs, generator)
        x = {k: torch.from_numpy(ds.X[v]) for k, v in idx.items()}
    if resume_state is not None:
        state, meta = resume_state
        steps = exp.train.epochs * -(-len(idx["train"]) // exp.train.batch_size)
        trainer.load_state_dict(state, int(meta["epoch"]), steps)
    t_fit = time.perf_counter()
    try:
        history = trainer.fit(x["train"], y["train"], x["val"], y["val"])
    except BaseException:
        for cb in cbs:
            if isinstance(cb, _SaveEachEpoch):
                cb.settle()
        raise
    fit_seconds = time.perf_counter() - t_fit
    rows = history.rows
    train_seconds = sum(r["seconds"] for r in rows)

    t_eval = time.perf_counter()
    # Final numbers in the training precision, as `cifar4 evaluate` and `predict` compute them
    # (model.json records it). The train split is measured without TTA: it only serves the
    # train-validation gap, and six views of 16,800 images would cost more than the training.
    prec, tta = trainer.precision, exp.train.tta
    if cached is not None:
        prec = cached.precision  # what evaluate and predict use to recompute the features
        res = {k: summarize(cached.logits(model.head, k, 0 if k == "train" else tta, trainer.precision),
                            y[k], ds.classes) for k in ("train", "val", "test")}
    else:
        res = {k: report(model, x[k], y[k], norm, ds.classes, device, prec, 0 if k == "train" else tta)
               for k in ("train", "val", "test")}
    eval_seconds = time.perf_counter() - t_eval
    trainable, non_trainable = models.count_params(model)
    steps_per_epoch = -(-len(idx["train"]) // exp.train.batch_size)
    metrics: dict[str, Any] = {
        "experiment": exp.name,
        "model": exp.model.name,
        "model_options": options,
        "train_accuracy": res["train"]["accuracy"],
        "val_accuracy": res["val"]["accuracy"],
        "test_accuracy": res["test"]["accuracy"],
        "train_loss": res["train"]["loss"],
        "val_loss": res["val"]["loss"],
        "test_loss": res["test"]["loss"],
        "per_class_accuracy": res["test"]["per_class_accuracy"],
        "confusion": res["test"]["confusion"],
        "train_seconds": round(train_seconds, 3),
        "seconds_per_epoch": round(train_seconds / max(len(rows), 1), 3),
        "fit_seconds": round(fit_seconds, 3),  # wall time of fit: steps, validation, callbacks
        "eval_seconds": round(eval_seconds, 3),
        "epochs": len(rows),
        "epochs_planned": exp.train.epochs,
        "restored_epoch": trainer.restored_epoch,
        "iterations": len(rows) * steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "params": trainable + non_trainable,
        "trainable_params": trainable,
        "seed": exp.train.seed,
        "split": {"kind": sp.kind, "seed": sp.seed, "train": len(idx["train"]),
                  "val": len(idx["val"]), "test": len(idx["test"])},
        "data": {"source": ds.source, "sha256": ds.checksum(), "images": len(ds)},
        "normalization": norm.to_dict(),
        "precision": prec,
        "tta": tta,
        "resumed_from_epoch": int(resume_state[1]["epoch"]) if resume_state else None,
        "versions": versions(),
        "machine": machine(device),
        "started_at": started,
    }
    if hasattr(model, "backbone_digest"):
        metrics["backbone_sha256"] = model.backbone_digest()
    if cached is not None:
        metrics["features"] = cached.info()
        metrics["feature_seconds"] = cached.info()["seconds"]
    model.cpu()
    runs.save_model(folder, model, exp.model.name, options, ds.classes, norm, prec)
    runs.write_history(folder, rows)
    plots.curves(rows, folder / "curves.png", title=exp.name)
    plots.confusion(res["test"]["confusion"], ds.classes, folder / "confusion.png",
                    title=f"{exp.name}: test accuracy {res['test']['accuracy']:.4f}")
    summ = models.summary(model, exp.model.name).text()
    cio.write_text(folder / "summary.txt", summ + "\n\n" + results_text(metrics) + "\n")
    metrics["total_seconds"] = round(time.perf_counter() - t_start, 3)
    metrics["finished_at"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    cio.write_json(folder / "metrics.json", metrics)  # written last: its presence means finished
    shutil.rmtree(folder / "state", ignore_errors=True)
    return Result(folder, metrics, rows, model)


class _CachedFeatures:
    """Transfer mode (b): the frozen backbone's features of every split, from the feature
    cache (computed there once), as inputs for training and evaluating the head alone. Views:
    the image, plus its mirror when the experiment flips (training picks one view per row and
    step) or asks for flip test-time augmentation (logits averaged over both)."""

    def __init__(self, exp: Experiment, model: torch.nn.Module, ds: Dataset,
                 idx: dict[str, np.ndarray], device: torch.device, progress: bool):
        self.precision = resolve_precision(exp.train.precision, device, model)
        self.flip_train = exp.augment.flip
        views = ("plain", "flip") if exp.augment.flip or exp.train.tta >= 1 else ("plain",)
        rows = np.concatenate([idx["train"], idx["val"], idx["test"]])
        model.to(device).to(memory_format=torch.channels_last)
        self.fs = features.features(model, ds, rows, views, device, self.precision, progress)
        model.cpu()
        self.device = device
        self.split: dict[str, dict[str, torch.Tensor]] = {}
        start = 0
        for k in ("train", "val", "test"):
            n = len(idx[k])
            self.split[k] = {v: torch.from_numpy(a[start:start + n]) for v, a in self.fs.views.items()}
            start += n
        self.augment = ViewSample() if self.flip_train else Augment()

    def train_inputs(self) -> dict[str, torch.Tensor]:
        out = {k: self.split[k]["plain"] for k in ("train", "val", "test")}
        if self.flip_train:
            out["train"] = torch.stack([self.split["train"]["plain"], self.split["train"]["flip"]], 1)
        return out

    def logits(self, head: torch.nn.Module, split: str, tta: int, precision: str) -> torch.Tensor:
        views = ["plain", "flip"] if tta >= 1 else ["plain"]
        return torch.stack([predict_logits(head, self.split[split][v], FeatureInput(), device=self.device,
                                           precision=precision) for v in views]).mean(0)

    def info(self) -> dict[str, Any]:
        fs = self.fs
        return {"views": list(fs.views), "precision": self.precision, "cache": fs.status,
                "extracted": fs.extracted, "cached": fs.cached, "seconds": round(fs.seconds, 3),
                "files": fs.files}


def results_text(m: dict[str, Any]) -> str:
    """The session's closing lines, plus the split and timing."""
    s = m["split"]
    return "\n".join([
        f"Performance on the TRAIN set, ACCURACY= {m['train_accuracy']:.4f}  (loss {m['train_loss']:.4f})",
        f"Performance on the VAL set,   ACCURACY= {m['val_accuracy']:.4f}  (loss {m['val_loss']:.4f})",
        f"Performance on the TEST set,  ACCURACY= {m['test_accuracy']:.4f}  (loss {m['test_loss']:.4f})",
        f"split {s['kind']} (seed {s['seed']}): {s['train']} train / {s['val']} val / {s['test']} test; "
        f"{m['epochs']} epochs, {m['iterations']} iterations, {m['train_seconds']:.1f}s training "
        f"({m['seconds_per_epoch']:.2f}s/epoch) on {m['machine']['device']}",
    ])


__all__ = ["train", "resume", "Result", "results_text"]
