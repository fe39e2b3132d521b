"""One experiment end to end: dataset -> split -> normalization -> model -> fit -> evaluation
-> run directory. `train()` is what `cifar4 train` and the lab call; `resume()` continues an
interrupted run from its last complete epoch with the same result as an uninterrupted one."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from rich.console import Console

from .. import config as cfgmod
from .. import data as datamod
from .. import io as cio
from .. import locks, models, plots, record, runs
from ..config import Experiment
from ..data import Dataset
from ..data.split import TRAIN_EVAL_ROWS, Split, sample_positions, split_indices
from ..data.transforms import Augment, FeatureInput, InputTransform, Normalization, tta_views
from ..device import autocast, keep_freed_memory, pick_device, synchronize, to_device
from ..errors import Cifar4Error, ConfigError, RunError
from ..models import native
from ..models.base import DataInitialized, FrozenBackbone, follows
from ..models.layers import matmul_weight_grads
from ..runs import CHECKPOINT_FILE, Result, machine, versions
from . import batchnorm, distributed, precision
from .budget import EVAL_SHARE, Budget, Deadline
from .callbacks import Callback, EarlyStopping, History, ModelCheckpoint, ProgressBar
from .distill import Targets, teacher_targets
from .evaluate import accuracy_lines, predict_logits, summarize
from .features import CachedFeatures, cache_requests, extraction_seconds, feature_precision, pending
from .plan import Plan
from .precision import PROBE_BATCH, step_times
from .precision import choose as choose_precision
from .tensorboard import TensorBoard
from .train import Trainer, epoch_steps, make_optimizer, seed_everything


class _SaveEachEpoch(Callback):
    """After every epoch: the history so far and the full training state, so that a killed run
    loses at most the epoch in progress and `--resume` continues exactly. The state (54 MB for
    the deep MLP with Adam) is copied, then written and fsynced by a background thread while
    the next epoch trains; the next save, and the end of training, wait for it."""

    def __init__(self, folder: Path, extra: dict[str, Any]):
        self.folder, self.extra = folder, extra
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._state: Callable[[], dict[str, Any]] | None = None  # the trainer's full state (bind)
        self._history: History | None = None

    def bind(self, state: Callable[[], dict[str, Any]], history: History) -> None:
        """What it saves: the whole training state (model, optimizer, schedule, random
        generators, every callback's state), which no callback's view holds."""
        self._state, self._history = state, history

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

    def on_epoch_end(self, epoch, logs=None):
        assert self._state is not None and self._history is not None
        self._wait()
        runs.write_history(self.folder, self._history.rows)
        state = runs.snapshot(self._state())
        self._thread = threading.Thread(target=self._write, args=(state, epoch), daemon=True)
        self._thread.start()

    def on_train_end(self, logs=None):
        self._wait()

    def settle(self) -> None:
        """Let a save in flight finish (training was interrupted): the last complete epoch
        then stays on disk, whole."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def train(exp: Experiment | str | Path, data: Dataset | str | Path | None = None,
          runs_root: str | Path = "runs", run_dir: str | Path | None = None,
          overwrite: bool = False, progress: bool = True, save_state: bool = True,
          callbacks: list[Callback] | None = None, run_name: str | None = None,
          evaluate_test: bool = True, tensorboard: str | Path | None = None,
          started: float | None = None, skip_if_unfit: bool = False, targets: Targets | None = None) -> Result:
    """Train one experiment (an Experiment, a built-in name or a TOML path) and write its run
    (`runs_root/<run_name or experiment>-<stamp>`, or exactly `run_dir`). `callbacks` are added
    after the built-in ones (history, progress, early stopping, ...). `started`: the
    time.perf_counter() value the command started at (train.time_budget counts from it; by
    default from this call). `skip_if_unfit` (an ensemble's member with later ones): under a
    time limit where not even its lightest variant fits one epoch, raise MemberUnfit instead
    of training. `targets`: probabilities to train on instead of the labels (an ensemble's
    later member learning from the earlier ones: distill.py)."""
    started = time.perf_counter() if started is None else started
    keep_freed_memory()  # each step reuses what the last one freed (device.keep_freed_memory says why)
    if not isinstance(exp, Experiment):
        exp = cfgmod.load(exp)
    ds = data if isinstance(data, Dataset) else datamod.load(data)
    if exp.ensemble is not None:
        return _train_ensemble(exp, ds, runs_root, run_dir, overwrite, progress, run_name, evaluate_test,
                               started=started)
    exp_: Experiment = exp
    main = distributed.world().main
    with contextlib.ExitStack() as held:
        def make_folder() -> str:
            # config.toml and run.json come with the plan, once it is made (_run)
            return str(runs.open_run(held, runs_root, run_name or exp_.name, run_dir, overwrite))
        folder = Path(_on_main(make_folder))  # under torchrun, rank 0 makes it and tells the others
        tb = TensorBoard(Path(tensorboard) / folder.name) if tensorboard is not None and main else None
        try:
            result = _run(exp, ds, folder, progress, save_state, resume_state=None,
                          extra=[*(callbacks or []), *([tb] if tb else [])], evaluate_test=evaluate_test,
                          started=started, skippable=skip_if_unfit, targets=targets)
        except BaseException:
            if tb is not None:
                tb.close()
            raise
        if tb is not None:
            tb.finish(exp.to_dict(), result.metrics)
        return result


def member_experiment(exp: Experiment, member: str) -> Experiment:
    """An ensemble member's experiment with the ensemble's split, seed, device and precision."""
    assert exp.ensemble is not None
    d = cfgmod.load(member).to_dict()
    d["data"] = {**d["data"], **{k: getattr(exp.data, k) for k in cfgmod.ENSEMBLE_DATA_KEYS}}
    # the ensemble's time limit is the whole command's: _train_ensemble hands it to the last member
    shared = {k: getattr(exp.train, k) for k in cfgmod.ENSEMBLE_TRAIN_KEYS if k not in ("seeds", "time_limit")}
    if exp.train.precision == "auto":  # the member's own choice stands unless the ensemble overrides it
        shared.pop("precision")
    d["train"] = {**d["train"], **shared}
    set_here: dict[str, Any] = {"train": dict(shared)}
    if exp.ensemble.epochs_scale != 1.0:
        d["train"]["epochs"] = max(1, math.ceil(d["train"]["epochs"] * exp.ensemble.epochs_scale))
        set_here["train"]["epochs"] = d["train"]["epochs"]
        if exp.data.train_subset and d["train"]["batch_size"] > exp.data.train_subset:
            d["train"]["batch_size"] = set_here["train"]["batch_size"] = exp.data.train_subset
    d = cfgmod.unset_gpu(d, set_here)  # what the ensemble sets holds on a GPU too
    return cfgmod.from_dict(cfgmod._without_none(d), f"ensemble member '{member}'")


ENSEMBLE_FILE = "experiment.toml"  # an ensemble run's experiment, written before its members train
SKIPPED_FILE = "skipped.json"      # in <run>/members: the members skipped so far, for a resume


def _train_ensemble(exp: Experiment, ds: Dataset, runs_root: str | Path, run_dir: str | Path | None,
                    overwrite: bool, progress: bool, run_name: str | None, evaluate_test: bool,
                    continuing: bool = False, started: float | None = None) -> Result:
    """Each member trained into <run>/members/<n>-<name>, then combined into the run itself.
    `continuing` (resume, the lab after an interruption): finished members are kept and an
    interrupted one resumes from its last complete epoch."""
    from .ensemble import make_ensemble  # ensemble.py reads finished runs; it does not train
    if not evaluate_test:
        raise ConfigError(f"experiment '{exp.name}' is an ensemble; it cannot hold the test split out")
    if distributed.world().size > 1:
        raise ConfigError(f"experiment '{exp.name}' is an ensemble; train its members under torchrun instead")
    assert exp.ensemble is not None
    t0 = time.perf_counter() if started is None else started  # total_seconds counts from the command's start
    members = [member_experiment(exp, m) for m in exp.ensemble.members]  # all checked before any training
    with contextlib.ExitStack() as held:
        if continuing:
            assert run_dir is not None
            folder = Path(run_dir)
            held.enter_context(locks.run_lock(folder))
        else:
            folder = runs.open_run(held, runs_root, run_name or exp.name, run_dir, overwrite)
            shutil.rmtree(folder / "members", ignore_errors=True)  # an overwritten ensemble's old members
        cio.write_text(folder / ENSEMBLE_FILE, exp.to_toml())  # config.toml comes with the result
        done: list[Path] = []
        # a resumed ensemble skips again what it skipped before the interruption (the member's
        # time already went to the later ones), rather than timing it again
        skipped: list[dict[str, Any]] = _read_skipped(folder) if continuing else []
        for i, m in enumerate(members, 1):
            sub = folder / "members" / f"{i}-{m.name}"
            if any(s["member"] == i for s in skipped):
                continue
            if continuing and (sub / "metrics.json").exists():
                done.append(sub)
                continue
            # a later member's targets from the earlier ones (distill.py): computed before its
            # time limit is set, so their seconds count against the ensemble's
            targets = (teacher_targets(done, m, ds, exp.ensemble, exp.train.device)
                       if exp.ensemble.distill and done else None)
            if continuing and (sub / "state" / "last.json").exists():
                done.append(_resume_one(sub, ds, progress, targets).run_dir)
            else:
                if exp.train.time_limit:  # after a skip, the skipped member's time goes to the later ones
                    m = _member_limit(m, exp.train.time_limit - (time.perf_counter() - t0), members[i:],
                                      own_limit=not skipped)
                try:
                    done.append(train(m, ds, run_dir=sub, overwrite=True, progress=progress,
                                      skip_if_unfit=bool(exp.train.time_limit) and i < len(members),
                                      targets=targets).run_dir)
                except MemberUnfit as e:  # its time goes to the later members
                    shutil.rmtree(sub, ignore_errors=True)
                    skipped.append({"member": i, "experiment": m.name, "reason": str(e), "tried": e.tried})
                    cio.write_json(folder / "members" / SKIPPED_FILE, skipped)
                    if progress:
                        Console(stderr=True).print(f"{exp.name}: member {i} ({m.name}) skipped: {e}",
                                                   highlight=False, soft_wrap=True)
        weights, gone = exp.ensemble.weights, {s["member"] for s in skipped}
        if isinstance(weights, list):  # a skipped member's weight goes with it
            weights = [w for j, w in enumerate(weights, 1) if j not in gone]
        return make_ensemble(done, out=folder, weights=weights, data=ds, name=exp.name, overwrite=True,
                             device=exp.train.device, experiment=exp, started=t0,
                             extra={"skipped_members": skipped} if skipped else None)


def _read_skipped(folder: Path) -> list[dict[str, Any]]:
    """The members an interrupted ensemble run skipped (none if it skipped none)."""
    path = folder / "members" / SKIPPED_FILE
    if not path.exists():
        return []
    try:
        skipped = json.loads(path.read_text())
        if not (isinstance(skipped, list) and all(isinstance(s, dict) and isinstance(s.get("member"), int)
                                                  for s in skipped)):
            raise ValueError("not a list of members")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RunError(f"'{path}' is unreadable ({e}); expected the list of skipped members this run "
                       f"wrote (train the ensemble again with --overwrite)") from None
    return skipped


class MemberUnfit(Exception):
    """An ensemble's member whose lightest variant would not fit one epoch in its share of the
    time limit (`tried`: each candidate's timing, as metrics.json's `fallback.tried`)."""

    def __init__(self, message: str, tried: list[dict[str, Any]]):
        super().__init__(message)
        self.tried = tried


MIN_MEMBER_EPOCHS = 1.0  # under this many epochs fitting, a member with later ones is skipped


ENSEMBLE_SECONDS = 6.0    # combining the members (their saved predictions) and writing the run
MIN_MEMBER_SECONDS = 30.0  # a member's limit when the others overran the ensemble's; kept for each later one


def reserved_seconds(member: Experiment) -> float:
    """What an earlier member of an ensemble leaves for `member`: half its own time limit, at
    least MIN_MEMBER_SECONDS. `fast-long`'s transfer member so leaves fast-15 (175 s) 87.5 s,
    about `fast`'s own limit: with only the 30 s minimum reserved, a slow CPU's feature
    extraction would leave the last member too little to train; where transfer's features would
    not fit the shorter limit it extracts the image alone (its fallback)."""
    return max(MIN_MEMBER_SECONDS, member.train.time_limit / 2)


def _member_limit(member: Experiment, left: float, later: list[Experiment],
                  own_limit: bool = True) -> Experiment:
    """A member of an ensemble with a time limit: limited to what is left of it, less the
    combining and what each of the `later` members is reserved (reserved_seconds), or to its
    own limit if that is shorter (`own_limit`; not after an earlier member was skipped, whose
    time goes to the later ones, which would otherwise leave most of the limit unused). The last member so gets
    all that is left; an earlier one may not take it all (under its limit a frozen-backbone
    member whose features would not fit takes a lighter fallback, as `best`'s transfer-tuned does
    on an AVX2-only CPU). Where the earlier members left almost nothing, a member still trains
    a short run (MIN_MEMBER_SECONDS) so the ensemble ends."""
    limit = max(MIN_MEMBER_SECONDS, left - ENSEMBLE_SECONDS - sum(reserved_seconds(m) for m in later))
    if member.train.time_limit and own_limit:
        limit = min(limit, member.train.time_limit)
    return member.model_copy(update={"train": member.train.model_copy(update={"time_limit": round(limit, 1)})})


def resume(run_dir: str | Path, data: Dataset | str | Path | None = None,
           progress: bool = True) -> Result:
    """Continue an interrupted run from its last complete epoch (same config, same data); an
    interrupted ensemble keeps its finished members and continues the others."""
    folder = runs.resolve_run(run_dir)
    keep_freed_memory()
    if (folder / ENSEMBLE_FILE).exists() and not (folder / "metrics.json").exists():
        exp = record.read_experiment(folder, ENSEMBLE_FILE)
        ds = data if isinstance(data, Dataset) else datamod.load(data)
        return _train_ensemble(exp, ds, folder.parent, folder, False, progress, None, True, continuing=True)
    return _resume_one(folder, data, progress)


def _resume_one(folder: Path, data: Dataset | str | Path | None, progress: bool,
                targets: Targets | None = None) -> Result:
    with contextlib.ExitStack() as held:
        def check() -> str:
            held.enter_context(locks.run_lock(folder))  # refused while another process trains this run
            if (folder / "metrics.json").exists():
                raise RunError(f"run '{folder}' is already finished; nothing to resume")
            return str(folder)
        _on_main(check)
        exp = record.read_experiment(folder)
        ds = data if isinstance(data, Dataset) else datamod.load(data)
        st = runs.load_state(folder)
        if st is not None and st[1].get("data_sha256") not in (None, ds.checksum()):
            raise RunError(f"run '{folder}' was trained on other data (sha256 "
                           f"{st[1]['data_sha256'][:12]}...); pass the same --data")
        return _run(exp, ds, folder, progress, True, resume_state=st, targets=targets)


def _on_main(step: Callable[[], str]) -> str:
    """Run `step` on rank 0 (the only one that touches the run folder) and hand its result, or
    its error, to every rank; in one process, just run it."""
    w = distributed.world()
    if w.size == 1:
        return step()
    if w.main:
        try:
            msg = {"ok": step()}
        except Cifar4Error as e:
            distributed.broadcast({"error": str(e)})
            raise
        return str(distributed.broadcast(msg)["ok"])
    got = distributed.broadcast(None)
    if "error" in got:
        raise RunError(f"rank 0: {got['error']}")
    return str(got["ok"])


@dataclass
class _Fit:
    """What the steps of one run hand each other."""

    exp: Experiment
    ds: Dataset
    folder: Path
    split: Split
    idx: dict[str, np.ndarray]
    device: torch.device
    norm: Normalization
    y: dict[str, torch.Tensor]
    model: torch.nn.Module = field(default_factory=torch.nn.Identity)  # built once the plan knows what runs
    generator: torch.Generator = field(default_factory=torch.Generator)  # data order and augmentation
    plan: Plan | None = None
    x: dict[str, torch.Tensor] = field(default_factory=dict)
    cached: CachedFeatures | None = None
    trainer: Trainer | None = None
    saver: _SaveEachEpoch | None = None
    deadline: Deadline | None = None  # follows a time budget or limit during training
    test: bool = True  # False: the test split stays held out (sweep trials); per-class and confusion on val
    targets: torch.Tensor | None = None  # what the fit learns instead of y["train"] (distill.py)


def _run(exp: Experiment, ds: Dataset, folder: Path, progress: bool, save_state: bool,
         resume_state: tuple[dict, dict] | None, extra: list[Callback] | None = None,
         evaluate_test: bool = True, started: float | None = None, skippable: bool = False,
         targets: Targets | None = None) -> Result:
    """One run, step by step: data, plan (written once), model, trainer, fit, final evaluation,
    artifacts."""
    started_at = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    t_start = time.perf_counter() if started is None else started
    main = distributed.world().main
    if not main:  # another torchrun rank: it trains its share; rank 0 saves, evaluates and writes
        progress, save_state, extra = False, False, []
    bar = ProgressBar(title=f"{exp.name} ") if progress else None
    log = None if bar is None else (lambda msg: bar.console.print(msg, highlight=False, soft_wrap=True))
    gpu = None
    if exp.gpu and resume_state is None and _on_gpu(exp):
        gpu, exp = exp.gpu, exp.on_gpu()  # what runs on a GPU; a resumed run's config.toml has it
    run = _prepare(exp, ds, folder, evaluate_test)
    if log is not None:
        log(f"{exp.name}: {exp.model.name} on {len(run.idx['train'])} images "
            f"({run.split.kind} split), {exp.train.epochs} epochs, {run.device.type}; "
            f"run directory {folder}")
    plan = _make_plan(run, t_start, log, skippable, resumed=resume_state is not None, gpu=gpu)
    if main and resume_state is None:  # written once, before training; a resumed run keeps its own
        record.write_experiment(folder, plan.exp)
        record.write_run_info(folder, ds.source, ds.checksum(), plan.to_record())
    if targets is not None:  # the rows the plan settled on (a fallback may read a subset)
        run.targets = targets.for_rows(run.idx["train"])
    _build_trainer(run, bar, save_state, extra, progress, (t_start, log))
    assert run.trainer is not None
    if resume_state is not None:  # a resumed run keeps its steps
        _restore(run, resume_state)
    elif run.deadline is not None:
        _check_deadline(run, t_start, log)
    # a GPU loads its kernels on first use: done before the fit's clock (counted in total_seconds)
    warmup_seconds = run.trainer.warm_up(run.x["train"], run.y["train"], run.x["val"], run.y["val"])
    rows, fit_seconds = _fit(run)
    if not main:
        return Result(folder, {}, rows, run.model)
    t_eval = time.perf_counter()
    res, precision, preds = _evaluate_splits(run)
    eval_seconds = time.perf_counter() - t_eval
    metrics = _metrics(run, rows, res, precision, (warmup_seconds, fit_seconds), eval_seconds, resume_state,
                       started_at)
    for key, value in (("fallback", plan.fallback), ("gpu", plan.gpu),
                       ("distill", targets.record if targets is not None else None)):
        if value is not None:
            metrics[key] = value
    _write_artifacts(run, rows, res, precision, metrics)
    runs.write_predictions(folder, preds)
    metrics["total_seconds"] = round(time.perf_counter() - t_start, 3)
    metrics["finished_at"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    record.write_metrics(folder, metrics)  # written last: its presence means finished
    shutil.rmtree(folder / "state", ignore_errors=True)
    return Result(folder, metrics, rows, run.model)


def _make_plan(run: _Fit, t_start: float, log: Callable[[str], None] | None, skippable: bool,
               resumed: bool, gpu: dict[str, Any] | None = None) -> Plan:
    """Decide, before anything is written or trained: the GPU variant, the variant that fits a
    time limit, then (the model built once, for what runs) its kernels, its precision and a
    time budget's test-time views. Prints what was chosen and why."""
    exp, fallback, reasons = run.exp, None, []
    if gpu is not None:
        reasons.append(f"{exp.name}: on a GPU, with its gpu table ({', '.join(cfgmod.flatten(gpu))})")
    choice = None
    if not resumed and exp.fallbacks and exp.train.time_limit and exp.train.time_budget is None \
            and distributed.world().size == 1:  # (torchrun's ranks would have to agree: as written)
        exp, fallback, choice = _fit_to_limit(run, t_start, reasons.append, skippable)
        if exp.data != run.exp.data:  # a fallback that trains on a subset of the training rows
            run.split, run.idx, run.norm, run.y = _split_rows(exp, run.ds)
        run.exp = exp
    _build_model(run)
    net = run.model.on_cache() if models.cached_inputs(run.model) else run.model
    kernels = native.prepare(net, run.device)  # built once per machine, before any step is timed
    if choice is None:  # (a fallback's timing measured it already)
        choice = precision.decide(exp.train, run.device, net, _probe_inputs(run, net, PROBE_BATCH, "train"),
                                  lambda m: make_optimizer(m, exp.train))
    matmul_weight_grads(net, choice.matmul_weight_grads)
    if not resumed and exp.train.tta and (exp.train.time_budget is not None or _views_outgrown(run, exp)):
        exp = _budget_views(run, net, choice.precision, t_start, reasons)
        run.exp = exp
    reasons.insert(0, _data_news(run, exp, fallback))
    plan = Plan(exp, run.device, choice, kernels, epoch_steps(len(run.idx["train"]), exp.train.batch_size),
                gpu, fallback, tuple(reasons), len(run.idx["train"]), run.ds.num_classes, _eval_images(run, exp))
    if log is not None:
        for line in plan.news():
            log(f"{exp.name} {line}" if not line.startswith(exp.name) else line)
    run.plan = plan
    return plan


def _data_news(run: _Fit, exp: Experiment, fallback: dict[str, Any] | None) -> str:
    """The plan's first line: the data it was made for, and what follows from its size: the
    model's outputs, the final evaluation's image views, the images a data-dependent start
    reads, and under a time limit with fallbacks the steps a candidate needs."""
    n = {k: len(run.idx[k]) for k in ("train", "val", "test")}
    k = run.ds.num_classes
    views = len(tta_views(torch.zeros(1, 3, 4, 4), exp.train.tta))
    line = (f"{exp.name}: {n['train']:,} training images, {k} classes ({n['val']:,} val, {n['test']:,} test): "
            f"{k} outputs, {epoch_steps(n['train'], exp.train.batch_size)} steps per epoch, final evaluation "
            f"{_eval_images(run, exp):,} image views ({len(_eval_rows(run, 'train')):,} train, val"
            + (" and test" if run.test else "") + f" x {views})")
    if follows(run.model, DataInitialized):
        line += f", start from {len(_init_rows(run)):,} training images"
    if fallback is not None:
        t = fallback["tried"][0]
        ref = exp.train.reference_images
        line += (f"; a fallback fits at {t['steps_needed']} steps ({cfgmod.FALLBACK_FITS:.0%} of the epochs"
                 + (f" on {ref:,} images, the training set they were chosen on)" if ref and ref < n["train"]
                    else ")"))
    return line


def _probe_inputs(run: _Fit, net: torch.nn.Module, n: int, part: str) -> torch.Tensor:
    """The first `n` rows of a split as `net` takes them: normalized images, or for what trains
    on a backbone's cache, inputs of the cache's shape (their values do not change the timing)."""
    rows = run.idx[part][:n]
    if net is not run.model:
        return torch.randn(len(rows), *cast(FrozenBackbone, run.model).cache_shape, device=run.device)
    return run.norm.apply(torch.from_numpy(run.ds.X[rows])).to(run.device)


def _views_outgrown(run: _Fit, exp: Experiment) -> bool:
    """Whether a time limit's test-time views were chosen on fewer training images than these
    (train.reference_images): the final evaluation's cost grows with the data (CIFAR-10's
    official split: 110,000 image views at `fast`'s six, against CIFAR-4's 48,000), so
    they are chosen again by a budget's rule (_budget_views)."""
    ref = exp.train.reference_images
    return bool(exp.train.time_limit) and ref is not None and len(run.idx["train"]) > ref


def _budget_views(run: _Fit, net: torch.nn.Module, prec: str, t_start: float, reasons: list[str]) -> Experiment:
    """A time budget's test-time views, chosen before training: the experiment's, or fewer where
    its final evaluation would take more than EVAL_SHARE of the time left (budget.py), at the
    inference speed timed here on validation images. A time limit's, the same way, where the
    data outgrew the images they were chosen on (_views_outgrown)."""
    exp = run.exp
    views = _view_levels(run, exp)
    seconds = exp.train.time_budget if exp.train.time_budget is not None else exp.train.time_limit
    kind = "time budget" if exp.train.time_budget is not None else "time limit"
    b = Budget.starting(seconds or 0.0, t_start, views)
    image = _forward_seconds(net, _probe_inputs(run, net, 256, "val"), run.device, prec)
    level = b.choose_views(image)
    if level == exp.train.tta:
        return exp
    reasons.append(f"{exp.name}: {kind} {b.seconds:g} s: final evaluation with test-time level "
                   f"{level} instead of {exp.train.tta} (its views would take more than "
                   f"{EVAL_SHARE:.0%} of the time left)")
    return exp.model_copy(update={"train": exp.train.model_copy(update={"tta": level})})


def _deadline(run: _Fit, t_start: float, log: Callable[[str], None] | None,
              norm: InputTransform) -> Deadline | None:
    """The callback that follows the time budget (or limit) of what runs, counted from
    `t_start`, during training; None without either. A budget replaces a limit."""
    exp = run.exp
    budget = exp.train.time_budget
    if budget is None and not exp.train.time_limit:
        return None
    # a budget may cut the final evaluation's test-time views, so it is given each level's cost
    last = _eval_images(run) + _statistics_check_images(run)
    images = last if budget is None else {exp.train.tta: last}  # views: planned
    b = Budget.starting(budget or exp.train.time_limit, t_start, images,
                        max_epochs=None if budget is not None else exp.train.epochs)
    return Deadline(b, run.x["val"], norm, log)


def _check_deadline(run: _Fit, t_start: float, log: Callable[[str], None] | None) -> None:
    """Before training: a budget already spent is a ConfigError; a limit spent ends the run
    with one epoch (metrics' `time_limit` says so)."""
    assert run.trainer is not None and run.deadline is not None and run.deadline.budget is not None
    b, exp = run.deadline.budget, run.exp
    spent = time.perf_counter() - t_start
    if spent < b.seconds:
        return
    if b.max_epochs is None:
        raise ConfigError(f"{b.kind} {b.seconds:g} s is spent before training starts "
                          f"({spent:.1f} s to start, load the data and build the model); expected more "
                          f"than {spent:.0f} s")
    # a limit is a ceiling: one epoch rather than a run lost to a slow start
    run.trainer.train_epochs(1, epoch_steps(len(run.idx["train"]), exp.train.batch_size))
    run.deadline.spent_before_training(spent)
    if log is not None:
        log(f"{exp.name}: its time limit of {b.seconds:g} s was spent before training "
            f"({spent:.1f} s: start, data, features) -> one epoch, to end the run")


def _on_gpu(exp: Experiment) -> bool:
    """Whether the run's device is a GPU (where the experiment's `gpu` table applies)."""
    return pick_device(exp.train.device).type == "cuda"


def _eval_images(run: _Fit, exp: Experiment | None = None, tta: int | None = None) -> int:
    """Image views the final evaluation takes (its train subset, val and test with their views),
    at the experiment's test-time level or at `tta`."""
    views = len(tta_views(torch.zeros(1, 3, 4, 4), (exp or run.exp).train.tta if tta is None else tta))
    parts = ("val", "test") if run.test else ("val",)
    return len(_eval_rows(run, "train")) + views * sum(len(run.idx[k]) for k in parts)


def _statistics_check_images(run: _Fit) -> int:
    """Images of the extra validation pass the last epoch takes where batch norm is
    recalibrated: the running averages are validated too, and the better statistics kept
    (Trainer._final_statistics). A deadline reserves it with the final evaluation, since on
    CIFAR-10's 7,500 validation images it is seconds the plan would not see coming."""
    if not run.exp.train.bn_recalibrate or not batchnorm.updated(run.model):
        return 0
    return len(run.idx["val"])


def _view_levels(run: _Fit, exp: Experiment) -> dict[int, int]:
    """The final evaluation's image views at each test-time level from the experiment's down to
    none: what a budget's rule chooses among (budget.EVAL_SHARE)."""
    return {lv: _eval_images(run, tta=lv) for lv in range(exp.train.tta, -1, -1)}


def _limit_eval_images(run: _Fit, cand: Experiment, started: float, image: float) -> int:
    """The final evaluation's image views a candidate plans for under its time limit: at its
    test-time level, or where the data outgrew the images its views were chosen on
    (_views_outgrown), at the level a budget's rule would choose at this inference speed (as
    _budget_views will once the candidate is chosen)."""
    if not (cand.train.tta and _views_outgrown(run, cand)):
        return _eval_images(run, cand)
    views = _view_levels(run, cand)
    return views[Budget.starting(cand.train.time_limit or 0.0, started, views).choose_views(image)]


def _fit_to_limit(run: _Fit, started: float, log: Callable[[str], None] | None,
                  skippable: bool = False) -> tuple[Experiment, dict[str, Any], precision.Choice | None]:
    """Under its time limit, the experiment where its epochs (nearly: FALLBACK_FITS of them) fit,
    else the first of its fallbacks that fits that many epochs (its own `epochs` may be more:
    a ceiling), else the last one. Each candidate before the last is timed here: a
    warm-up and two training steps of a fresh copy in the precision it would use, and a
    forward pass for the evaluation's cost; the limit's plan (Budget.steps) then says how many
    of its epochs would fit. On a CPU without bf16 arithmetic (fp32) `fast`'s 32-96-192 net fits
    a fraction of its 6 epochs, and the 16-48-96 fallback, with more of its own, is the better
    model. `skippable` (an ensemble's member with later ones): the last candidate is timed too,
    and where it fits under MIN_MEMBER_EPOCHS, MemberUnfit is raised: a member that cannot fit
    even its lightest variant would otherwise run anyway and take the command far past its limit."""
    exp = run.exp
    candidates = [exp, *(exp.fallback(i) for i in range(len(exp.fallbacks)))]
    rows = run.idx["train"][:max(c.train.batch_size for c in candidates)]
    x = run.norm.apply(torch.from_numpy(run.ds.X[rows])).to(run.device)
    tried: list[dict[str, Any]] = []
    view_seconds: dict[tuple[str, int, float], float] = {}  # (backbone, resolution, depth) -> s per view
    choices: list[precision.Choice | None] = []  # each candidate's precision: the plan keeps the winner's
    used = len(candidates) - 1
    for i, cand in enumerate(candidates if skippable else candidates[:-1]):
        def optimizer(m: torch.nn.Module, c: cfgmod.TrainConfig = cand.train) -> torch.optim.Optimizer:
            return make_optimizer(m, c)
        extraction = 0.0
        idx = _candidate_rows(run, cand)
        n = {k: len(idx[k]) for k in ("train", "val")}
        spe, needed = epoch_steps(n["train"], cand.train.batch_size), _fit_steps(exp, cand, n["train"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cand.train.seed)  # as _prepare builds it (a random backbone's cache key)
            model = models.build(cand.model.name, num_classes=run.ds.num_classes, **cand.model.options)
            net, xin, frozen = model, x, models.cached_inputs(model)
            if frozen:  # a frozen backbone: its head (and tuned blocks) train on its cache
                _initialise(model, run.ds, run.norm, _init_rows(run))  # as _prepare: its weights key the cache
                to_device(model, run.device)
                todo = _pending_views(run, cand, model, idx)  # those not cached yet come first
                # at least what an earlier candidate that stops as deep in the same backbone, or
                # less deep, took a view: a deeper cut computes more layers per image
                name, res, depth = _depth(model)
                floor = max((per_view for (n_, r_, d_), per_view in view_seconds.items()
                             if (n_, r_) == (name, res) and d_ <= depth), default=0.0)
                bounded = bool(todo and floor and cand.train.time_limit and time.perf_counter()
                               + EXTRACTION_MARGIN * todo * floor >= started + cand.train.time_limit)
                per_view = floor
                if todo and not bounded:
                    per_view = extraction_seconds(model, run.ds.X, run.device,
                                                  feature_precision(cand.train.precision, run.device))
                    view_seconds[(name, res, depth)] = per_view
                extraction = EXTRACTION_MARGIN * todo * per_view
                if cand.train.time_limit and time.perf_counter() + extraction >= started + cand.train.time_limit:
                    # its features alone outlast the limit: no step of it fits, so its steps, its
                    # precision and its inference are not timed (on CIFAR-10 each tuned-block
                    # candidate's timing cost seconds that the next member trains in), nor, where
                    # a lighter cut's rate already says so, its extraction (on a CPU that extracts
                    # through ONNX Runtime, each timing exports a graph first)
                    choices.append(None)
                    tried.append(_tried_row(i, spe, needed, 0, None, None, extraction))
                    continue
                backbone = cast(FrozenBackbone, model)
                net, xin = backbone.on_cache(), torch.randn(len(x), *backbone.cache_shape, device=run.device)
            to_device(net, run.device)
            choice = choose_precision(cand.train.precision, run.device, net, cand.train, xin[:PROBE_BATCH],
                                      optimizer)
            matmul_weight_grads(net, choice.matmul_weight_grads)
            choices.append(choice)
            step = min(step_times(net, xin[:cand.train.batch_size], run.device, choice.precision, optimizer,
                                  steps=2)[1:])
            image = _forward_seconds(net, xin[:INFER_PROBE], run.device, choice.precision)
        # the features still to extract come first: as if the command had started that much earlier
        # (the plan as a budget makes it: what fits, without a limit's tolerance for early plans)
        plan = Budget.starting(cand.train.time_limit, started - extraction,
                               _limit_eval_images(run, cand, started - extraction, image))
        val = n["val"] + batchnorm.images(net, cand.train)  # (each validation recalibrates batch norm first)
        steps = min(plan.steps(0, step, image, val, spe), cand.train.epochs * spe)
        tried.append(_tried_row(i, spe, needed, steps, step, image, extraction if frozen else None))
        if steps >= needed:  # the experiment's epochs, nearly (on its reference)
            used = i
            break
    else:
        if skippable and tried[-1]["epochs_fit"] < MIN_MEMBER_EPOCHS:
            t = tried[-1]
            raise MemberUnfit(
                f"not even its lightest variant fits one epoch in its {exp.train.time_limit:g} s "
                f"({t['epochs_fit']:.2f} would"
                + (f", after {t['extraction_seconds']:.0f} s extracting features" if t.get("extraction_seconds")
                   else "") + ")", tried)
    chosen = candidates[used] if used else exp.model_copy(update={"fallbacks": []})  # what runs, as it runs
    record = {"used": None if used == 0 else used - 1, "tried": tried, "fits": cfgmod.FALLBACK_FITS}
    if log is not None and used:
        log(_fallback_news(exp, chosen, tried[0], used - 1, len(run.idx["train"])))
    return chosen, record, choices[used] if used < len(choices) else None


def _tried_row(i: int, spe: int, needed: int, steps: int, step: float | None, image: float | None,
               extraction: float | None) -> dict[str, Any]:
    """Candidate `i`'s row in metrics.json's `fallback.tried` (FallbackTry): `step` and `image`
    None where it was not timed, `extraction` None where it has no frozen backbone."""
    row = {"fallback": None if i == 0 else i - 1,
           "step_seconds": None if step is None else round(step, 4),
           "image_seconds": None if image is None else round(image, 6),
           "epochs_fit": round(steps / spe, 2), "steps_fit": steps, "steps_needed": needed}
    if extraction is not None:
        row["extraction_seconds"] = round(extraction, 1)
    return row


INFER_PROBE = 128  # images of the forward pass timed for a fallback's evaluation cost


def _fallback_news(exp: Experiment, chosen: Experiment, t: dict[str, Any], used: int, train_images: int) -> str:
    """The plan's line on a fallback chosen: what the experiment would fit, against what it needs."""
    ref = exp.train.reference_images
    counted = (f" on {ref:,} images, the training set its epochs were chosen on"
               if ref and ref < train_images else "")
    return (f"{exp.name}: its {exp.train.epochs} epochs do not fit its {exp.train.time_limit:g} s time limit "
            + (f"here ({t['epochs_fit']:.1f} would, {t['steps_fit']} steps at {1000 * t['step_seconds']:.0f} ms"
               if t["step_seconds"] is not None else "here (none would")
            + (f", after {t['extraction_seconds']:.0f} s extracting features" if t.get("extraction_seconds") else "")
            + f"; it needs {t['steps_needed']}: {cfgmod.FALLBACK_FITS:.0%} of its epochs{counted}): "
            f"fallbacks[{used}] instead ({_differences(exp, chosen)})")


def _fit_steps(exp: Experiment, cand: Experiment, train_images: int) -> int:
    """The training steps a candidate must fit under the time limit to be chosen: those of
    FALLBACK_FITS of the experiment's epochs at its own batch size, the epochs counted on the
    training set, or on `train.reference_images` (the set the epochs were chosen on) where that
    is smaller. Epochs are a measure of the data they were tuned on: on CIFAR-10's 42,500
    training images `fast`'s 6 epochs are 2.5 times the steps they are on CIFAR-4's 16,800, and
    counting them there would send the full net to its lightest fallback at a number of steps
    (of images seen) that it fits on CIFAR-4. Where the training set is the reference's size or
    smaller, this is FALLBACK_FITS of the epochs, as it always was."""
    images = min(train_images, exp.train.reference_images or train_images)
    return math.ceil(cfgmod.FALLBACK_FITS * exp.train.epochs * epoch_steps(images, cand.train.batch_size))


def _pending_views(run: _Fit, exp: Experiment, model: torch.nn.Module, idx: dict[str, np.ndarray]) -> int:
    """Image views a frozen-backbone candidate would extract first: the rows `idx` of every split
    in each view it needs that the cache does not hold yet. Times the rate of
    features.extraction_seconds (with EXTRACTION_MARGIN), the seconds it would spend: on a CPU
    that runs in fp32, `best`'s 48,000 views at 224 px would take longer than its whole limit."""
    prec = feature_precision(exp.train.precision, run.device)
    return sum(pending(model, run.ds, np.concatenate([idx[k] for k in parts]), views, prec)
               for parts, views in cache_requests(exp, model))


def _depth(model: torch.nn.Module) -> tuple[str, int, float]:
    """A frozen backbone, its resolution and how deep its cached output lies: the block its
    activation maps enter, or past every block for pooled features. At one resolution, a deeper
    output costs at least as much to extract per view."""
    m: Any = model  # a FrozenBackbone
    cut = getattr(m, "cut", None)
    return str(m.spec.name), int(m.resolution), math.inf if cut is None else float(cut)


# the whole extraction against its timed batches: mirrored views, copies to the host and the
# cache's saves are not in the probe, and on some CPUs the whole took a fifth longer than timed
EXTRACTION_MARGIN = 1.2


@torch.no_grad()
def _forward_seconds(model: torch.nn.Module, x: torch.Tensor, device: torch.device, prec: str) -> float:
    """Seconds per image of an inference pass (the better of two, after a warm-up)."""
    model.eval()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        with autocast(device, prec):
            model(x)
        synchronize(device)
        times.append(time.perf_counter() - t)
    return min(times[1:]) / max(1, len(x))


def _differences(a: Experiment, b: Experiment) -> str:
    """'key=value' for each leaf of b that differs from a."""
    la, lb = cfgmod.flatten(a.to_dict()), cfgmod.flatten(b.to_dict())
    return ", ".join(f"{k}={v}" for k, v in lb.items() if la.get(k) != v and not k.startswith("fallbacks"))


def _prepare(exp: Experiment, ds: Dataset, folder: Path, test: bool = True) -> _Fit:
    """Split, device and normalization from the training rows (what the plan needs first). The
    images are the size the model takes (models.input_size: the stored size up to a transfer
    model's resolution, else 32 px), made once for the whole dataset before any batch."""
    ds = ds.at_size(models.input_size(exp.model.name, exp.model.options, ds.size))
    sp, idx, norm, y = _split_rows(exp, ds)
    if exp.train.batch_size > len(idx["train"]):  # before any costly step
        raise ConfigError(f"train.batch_size {exp.train.batch_size} is larger than the training set "
                          f"({len(idx['train'])} images); expected at most {len(idx['train'])}")
    device = pick_device(distributed.device_for(exp.train.device, distributed.world()))
    return _Fit(exp, ds, folder, sp, idx, device, norm, y, test=test)


def _split_rows(exp: Experiment, ds: Dataset) -> tuple[Split, dict[str, np.ndarray], Normalization,
                                                        dict[str, torch.Tensor]]:
    """The split, each part's rows, the normalization of the training rows and the labels."""
    sp, idx = split_indices(exp.data, ds)
    norm = Normalization.from_config(exp.data.scale, exp.data.standardize, ds.X[idx["train"]])
    return sp, idx, norm, {k: torch.from_numpy(ds.Y[v]) for k, v in idx.items()}


def _candidate_rows(run: _Fit, cand: Experiment) -> dict[str, np.ndarray]:
    """The rows a time limit's candidate would read: the run's, or where the candidate trains on
    a subset of the training rows (a fallback's data.train_subset), that subset's."""
    return run.idx if cand.data == run.exp.data else split_indices(cand.data, run.ds)[1]


def _build_model(run: _Fit) -> None:
    """The model of what runs (run.exp), seeded, built and initialised: once per run."""
    exp = run.exp
    if exp.train.batch_size > len(run.idx["train"]):  # a variant's batch
        raise ConfigError(f"train.batch_size {exp.train.batch_size} is larger than the training set "
                          f"({len(run.idx['train'])} images); expected at most {len(run.idx['train'])}")
    run.generator = seed_everything(exp.train.seed)
    run.model = models.build(exp.model.name, num_classes=run.ds.num_classes, **exp.model.options)
    _initialise(run.model, run.ds, run.norm, _init_rows(run))


# Training images a model's data-dependent start is computed from (the fast nets' whitening: the
# covariance of their 2x2 patches, 12 numbers; a random backbone's batch-norm statistics): a
# fixed number, so that its cost does not grow with the data (5,000 images are 4.8 million
# patches, plenty for a 12x12 covariance)
INIT_IMAGES = 5000


def _init_rows(run: _Fit) -> np.ndarray:
    """The training rows a model's data-dependent start reads (INIT_IMAGES of them)."""
    rows = run.idx["train"]
    return rows[sample_positions(len(rows), INIT_IMAGES, run.split.kind)]


def _initialise(model: torch.nn.Module, ds: Dataset, norm: Normalization, rows: np.ndarray) -> None:
    """A built model's starting weights: a transfer backbone's ImageNet weights, and what the
    model takes from the training images `rows` (_init_rows: the fast nets' whitening, a random
    backbone's batch-norm statistics)."""
    models.load_pretrained(model)
    models.init_from_data(model, norm.apply(torch.from_numpy(ds.X[rows])))


def _callbacks(exp: Experiment, folder: Path, bar: ProgressBar | None) -> list[Callback]:
    cbs: list[Callback] = [History()]
    if bar is not None:
        cbs.append(bar)
    es = exp.train.early_stopping
    if es is not None:
        cbs.append(EarlyStopping(es.monitor, es.patience, es.min_delta, es.restore_best_weights))
    if exp.train.checkpoint_best and distributed.world().main:
        cbs.append(ModelCheckpoint(folder / CHECKPOINT_FILE, "val_accuracy"))
    return cbs


def _build_trainer(run: _Fit, bar: ProgressBar | None, save_state: bool,
                   extra: list[Callback] | None, progress: bool,
                   clock: tuple[float, Callable[[str], None] | None] | None = None) -> None:
    """The trainer, on images or, for a frozen backbone, on its cached features, and its
    callbacks (`clock`: when the command started, and where a deadline callback says what it
    chose; None: no time budget or limit is followed)."""
    exp = run.exp
    cbs = _callbacks(exp, run.folder, bar)
    model = run.model
    norm: InputTransform
    if models.cached_inputs(model):  # the head (and tuned blocks) train on the cache, computed once
        run.cached = CachedFeatures(exp, run.model, run.ds, run.idx, run.device, progress)
        net, norm, augment = model.on_cache(), FeatureInput(), run.cached.augment
        run.x = run.cached.train_inputs()
    else:
        net, norm, augment = run.model, run.norm, Augment(**exp.augment.model_dump())
        run.x = {k: torch.from_numpy(run.ds.X[v]) for k, v in run.idx.items()}
    run.deadline = None if clock is None else _deadline(run, *clock, norm)
    if run.deadline is not None:  # before the save, which then holds its plans
        cbs.append(run.deadline)
    if save_state:
        run.saver = _SaveEachEpoch(run.folder, {"data_sha256": run.ds.checksum()})
        cbs.append(run.saver)
    cbs += list(extra or [])
    run.trainer = Trainer(net, exp.train, norm, augment, run.device, cbs, run.generator, plan=run.plan)
    if run.saver is not None:
        assert run.trainer.history is not None
        run.saver.bind(run.trainer.state_dict, run.trainer.history)


def _restore(run: _Fit, resume_state: tuple[dict, dict]) -> None:
    state, meta = resume_state
    steps = run.exp.train.epochs * epoch_steps(len(run.idx["train"]), run.exp.train.batch_size)
    assert run.trainer is not None
    run.trainer.load_state_dict(state, int(meta["epoch"]), steps)


def _fit(run: _Fit) -> tuple[list[dict], float]:
    assert run.trainer is not None
    t_fit = time.perf_counter()
    try:
        y = run.y["train"] if run.targets is None else run.targets
        history = run.trainer.fit(run.x["train"], y, run.x["val"], run.y["val"])
    except BaseException:
        if run.saver is not None:
            run.saver.settle()
        raise
    return history.rows, time.perf_counter() - t_fit


def _eval_rows(run: _Fit, part: str) -> np.ndarray:
    """Positions within the split that the final evaluation measures: all of val and test;
    TRAIN_EVAL_ROWS of the train split, a sample of all its classes (sample_positions). The train
    numbers only serve the train-validation gap, and every train image would cost a third of
    `fast`'s training (on CIFAR-10's 42,500, more than its validation and test together)."""
    n = len(run.idx[part])
    return sample_positions(n, TRAIN_EVAL_ROWS, run.split.kind) if part == "train" else np.arange(n)


def _evaluate_splits(run: _Fit) -> tuple[dict[str, dict], str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Final numbers in the training precision, as `cifar4 evaluate` and `predict` compute
    them (model.json records it), and the logits behind them (predictions.npz). The train
    split is measured without TTA on a fixed subset (`_eval_rows`)."""
    assert run.plan is not None
    prec, tta, classes = run.plan.precision.precision, run.exp.train.tta, run.ds.classes
    parts = ("train", "val", "test") if run.test else ("train", "val")
    logits: dict[str, torch.Tensor] = {}
    if run.cached is not None and models.cached_inputs(run.model):
        head = run.model.on_cache()
        for k in parts:
            logits[k] = run.cached.logits(head, k, 0 if k == "train" else tta, prec,
                                          torch.from_numpy(_eval_rows(run, k)))
        prec = run.cached.precision  # what evaluate and predict use to recompute the features
    else:
        for k in parts:
            logits[k] = predict_logits(run.model, run.x[k][torch.from_numpy(_eval_rows(run, k))], run.norm,
                                       device=run.device,
                                       precision=prec, tta=0 if k == "train" else tta)
    res, preds = {}, {}
    for k in parts:
        rows = _eval_rows(run, k)
        res[k] = {**summarize(logits[k], run.y[k][torch.from_numpy(rows)], classes), "images": len(rows)}
        preds[k] = (run.idx[k][rows], logits[k].numpy())
    return res, prec, preds


def _metrics(run: _Fit, rows: list[dict], res: dict[str, dict], precision: str, fit: tuple[float, float],
             eval_seconds: float, resume_state: tuple[dict, dict] | None, started: str) -> dict[str, Any]:
    exp, idx, sp = run.exp, run.idx, run.split
    assert run.trainer is not None
    warmup_seconds, fit_seconds = fit
    train_seconds = sum(r["seconds"] for r in rows)
    trainable, non_trainable = models.count_params(run.model)
    steps_per_epoch = epoch_steps(len(idx["train"]), exp.train.batch_size)
    shown = res["test"] if run.test else res["val"]  # per-class and confusion: test, or val if held out
    metrics: dict[str, Any] = {
        "experiment": exp.name,
        "model": exp.model.name,
        "model_options": models.resolve_options(exp.model.name, exp.model.options),
        "train_accuracy": res["train"]["accuracy"],
        "val_accuracy": res["val"]["accuracy"],
        "test_accuracy": res["test"]["accuracy"] if run.test else None,
        "train_loss": res["train"]["loss"],
        "val_loss": res["val"]["loss"],
        "test_loss": res["test"]["loss"] if run.test else None,
        "per_class_accuracy": shown["per_class_accuracy"],
        "confusion": shown["confusion"],
        "train_seconds": round(train_seconds, 3),
        "seconds_per_epoch": round(train_seconds / max(len(rows), 1), 3),
        "fit_seconds": round(fit_seconds, 3),  # wall time of fit: steps, validation, callbacks
        "warmup_seconds": round(warmup_seconds, 3),  # before the fit, a GPU's kernels loaded (0 on a CPU)
        "eval_seconds": round(eval_seconds, 3),
        "epochs": len(rows),
        "epochs_planned": run.trainer.epochs,  # the experiment's, or what the time budget allowed
        "restored_epoch": run.trainer.restored_epoch,
        "iterations": run.trainer.steps_done,
        "steps_per_epoch": steps_per_epoch,
        "params": trainable + non_trainable,
        "trainable_params": trainable,
        "seed": exp.train.seed,
        "split": {"kind": sp.kind, "seed": sp.seed, "train": len(idx["train"]),
                  "val": len(idx["val"]), "test": len(idx["test"])},
        "train_accuracy_images": res["train"]["images"],  # the fixed subset train_accuracy is measured on
        "data": {"source": run.ds.source, "sha256": run.ds.checksum(), "images": len(run.ds)},
        "normalization": run.norm.to_dict(),
        "precision": precision,
        "tta": exp.train.tta,
        "resumed_from_epoch": int(resume_state[1]["epoch"]) if resume_state else None,
        "versions": versions(),
        "machine": machine(run.device),
        "started_at": started,
    }
    assert run.plan is not None  # the precision and kernels the run used, as planned
    choice = run.plan.precision
    metrics["precision_choice"] = {"asked": exp.train.precision, "chosen": choice.precision,
                                   "reason": choice.reason, "step_seconds": choice.seconds,
                                   "cached": choice.cached, "matmul_weight_grads": choice.matmul_weight_grads}
    if run.plan.kernels is not None:  # the session CNN's pools on a CPU: compiled or the library's
        metrics["kernels"] = {"pool2x2": run.plan.kernels.to_dict()}
    metrics["steps"] = run.trainer.steps_done
    if run.trainer.final_statistics is not None:  # which batch-norm statistics the last epoch kept
        metrics["final_statistics"] = run.trainer.final_statistics
    if run.deadline is not None and run.deadline.summary() is not None:  # what a budget or limit planned
        metrics[run.deadline.key] = run.deadline.summary()
    if not run.test:
        metrics["held_out_test"] = True  # per_class_accuracy and confusion are on the validation split
    digest = models.backbone_digest(run.model)
    if digest is not None:
        metrics["backbone_sha256"] = digest
    if run.cached is not None:
        metrics["features"] = run.cached.info()
        metrics["feature_seconds"] = run.cached.info()["seconds"]
    return metrics


def _write_artifacts(run: _Fit, rows: list[dict], res: dict[str, dict], precision: str,
                     metrics: dict[str, Any]) -> None:
    """Weights, history, figures and summary (metrics.json comes after, last)."""
    exp, folder, model = run.exp, run.folder, run.model
    model.cpu()
    runs.save_model(folder, model, exp.model.name, metrics["model_options"], run.ds.classes, run.norm,
                    precision, run.ds.size)
    runs.write_history(folder, rows)
    plots.curves(rows, folder / "curves.png", title=exp.name)
    part = "test" if run.test else "val"
    plots.confusion(res[part]["confusion"], run.ds.classes, folder / "confusion.png",
                    title=f"{exp.name}: {part} accuracy {res[part]['accuracy']:.4f}")
    summ = models.summary(model, exp.model.name, (3, run.ds.size, run.ds.size)).text()
    cio.write_text(folder / "summary.txt", summ + "\n\n" + results_text(metrics) + "\n")


def results_text(m: dict[str, Any]) -> str:
    """The session's closing lines, plus the split and timing."""
    s = m["split"]
    return "\n".join([
        *accuracy_lines(m),
        f"split {s['kind']} (seed {s['seed']}): {s['train']} train / {s['val']} val / {s['test']} test; "
        f"{m['epochs']} epochs, {m['iterations']} iterations, {m['train_seconds']:.1f}s training "
        f"({m['seconds_per_epoch']:.2f}s/epoch) on {m['machine']['device']}",
    ])


__all__ = ["train", "resume", "Result", "results_text"]
