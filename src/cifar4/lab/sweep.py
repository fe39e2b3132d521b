"""Hyperparameter sweeps on Optuna (`cifar4 sweep EXPERIMENT --trials N`).

The search space is data: the experiment's `[sweep]` table maps key paths to distributions,
checked by the one schema (config.SweepParam):

    [sweep]
    "train.lr" = { log_uniform = [1e-4, 1e-2] }
    "model.options.dropout" = { uniform = [0.0, 0.5] }
    "train.batch_size" = { choice = [64, 128, 256] }
    "train.epochs" = { int = [5, 20] }

Each trial is an ordinary run folder, `<sweep dir>/trial-NNNN`, trained with the test split held
out: the objective is validation accuracy, reported after every epoch so a pruner (median or
Hyperband) stops poor trials early. The best trial's test accuracy is computed once, after the
search, and labelled as such.

Storage: by default one SQLite file in the sweep's folder (`<sweeps>/<study>/study.db`); any
SQLAlchemy URL joins a shared study (PostgreSQL across machines: `--storage
postgresql+psycopg://user@host/db`). Workers are ordinary processes running the same command:
Optuna hands out trials, and its heartbeat marks the trial of a killed worker as failed. The
command runs until N trials have finished (complete or pruned), counting every worker's; workers
on one machine count and start a trial in turn (`<sweeps>/<study>/trials.lock`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import config as cfgmod
from .. import data as datamod
from .. import locks, record
from ..config import Experiment, SweepParam
from ..errors import ConfigError, MissingExtraError, RunError
from ..training import pipeline
from ..training.callbacks import Callback

HEARTBEAT = 30.0  # seconds between a running trial's heartbeats; a trial silent for 2x is failed


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise MissingExtraError("cifar4 sweep needs the 'sweep' extra (optuna, and psycopg for PostgreSQL); "
                                "run: pip install 'cifar4[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def default_storage(sweep_dir: Path) -> str:
    return f"sqlite:///{(sweep_dir / 'study.db').resolve()}"


def storage(url: str, heartbeat: float = HEARTBEAT) -> Any:
    """An RDB storage with Optuna's heartbeat (SQLite in a file, PostgreSQL, ...)."""
    optuna = _optuna()
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}  # several local workers wait for the file's lock
    import warnings

    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError, SQLAlchemyError
    error: Exception | None = None
    for attempt in range(6):  # workers starting together race to create the tables: the losers retry
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat's label
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs,
                                                  heartbeat_interval=max(1, int(heartbeat)),
                                                  grace_period=max(2, int(2 * heartbeat)))
        except (IntegrityError, ProgrammingError, OperationalError) as e:
            error = e
            if "already exists" not in str(e) and "UNIQUE constraint" not in str(e) \
                    and "duplicate key" not in str(e) or attempt == 5:
                break
            time.sleep(0.2 * (attempt + 1))
        except (SQLAlchemyError, ImportError, ValueError) as e:  # bad URL, no driver, no server, ...
            error = e
            break
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise ConfigError(f"--storage '{url}': cannot open it ({first[:200]})")


def suggest(trial: Any, path: str, p: SweepParam) -> Any:
    if p.log_uniform is not None:
        return trial.suggest_float(path, *p.log_uniform, log=True)
    if p.uniform is not None:
        return trial.suggest_float(path, *p.uniform)
    if p.int_uniform is not None:
        return trial.suggest_int(path, *p.int_uniform)
    assert p.choice is not None
    return trial.suggest_categorical(path, p.choice)


def trial_experiment(exp: Experiment, params: dict[str, Any], number: int) -> Experiment:
    """The experiment a trial trains: its sampled values set, the sweep table removed."""
    d = exp.to_dict()
    d.pop("sweep", None)
    sampled: dict[str, Any] = {}
    for path, v in params.items():
        d = cfgmod.set_path(d, path, v)
        sampled = cfgmod.set_path(sampled, path, v)
    d = cfgmod.unset_gpu(d, sampled)  # a sampled value holds on a GPU too
    d["name"] = f"{exp.name}-trial-{number}"
    return cfgmod.from_dict(d, f"sweep trial {number}")


class ReportToTrial(Callback):
    """Validation accuracy to Optuna after every epoch; stop the trial when the pruner says so."""

    def __init__(self, trial: Any):
        self.trial = trial

    def on_epoch_end(self, epoch, logs=None):
        assert logs is not None
        self.trial.report(float(logs["val_accuracy"]), epoch)
        if self.trial.should_prune():
            raise _optuna().TrialPruned(f"pruned after epoch {epoch}: val_accuracy {logs['val_accuracy']:.4f}")


def _pruner(name: str) -> Any:
    optuna = _optuna()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner '{name}' is unknown; expected median, hyperband or none")


@dataclass
class SweepResult:
    study: str
    storage: str
    folder: Path
    finished: int
    best: dict[str, Any] | None


def sweep(exp: Experiment, ds: datamod.Dataset, trials: int, study_name: str | None = None,
          storage_url: str | None = None, sweeps_dir: str | Path = "sweeps", timeout: float | None = None,
          pruner: str = "median", progress: bool = False, heartbeat: float = HEARTBEAT,
          tensorboard: str | Path | None = None) -> SweepResult:
    """Run trials (this process is one worker) until `trials` have finished in the study."""
    optuna = _optuna()
    if not exp.sweep:
        raise ConfigError(f"experiment '{exp.name}' has no [sweep] table; expected key paths with "
                          f"distributions, e.g. \"train.lr\" = {{ log_uniform = [1e-4, 1e-2] }}")
    if trials < 1:
        raise ConfigError(f"--trials {trials}; expected at least 1")
    name = study_name or exp.name
    folder = Path(sweeps_dir) / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create sweep folder '{folder}': {e.strerror or e}") from None
    url = storage_url or default_storage(folder)
    # Local workers take turns to open (and at first create) the study; remote ones retry.
    with locks.hold(folder / "study.lock", f"sweep study '{name}'"):
        study = optuna.create_study(study_name=name, storage=storage(url, heartbeat), direction="maximize",
                                    load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=None),
                                    pruner=_pruner(pruner))
        _check_same_space(study, exp)
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

    def objective(trial: Any) -> float:
        params = {path: suggest(trial, path, p) for path, p in exp.sweep.items()}
        run_dir = folder / f"trial-{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        texp = trial_experiment(exp, params, trial.number)
        t0 = time.perf_counter()
        r = pipeline.train(texp, ds, run_dir=run_dir, progress=progress, evaluate_test=False,
                           callbacks=[ReportToTrial(trial)], tensorboard=tensorboard)
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
        return float(r.metrics["val_accuracy"])

    with _quiet_optuna():
        _run_trials(study, objective, trials, timeout, heartbeat,
                    turn=lambda: locks.hold(folder / "trials.lock", f"sweep study '{name}' trial count"))
    finished = len(study.get_trials(deepcopy=False, states=done))
    return SweepResult(name, url, folder, finished, best_trial(study, ds) if finished else None)


def _run_trials(study: Any, objective: Any, trials: int, timeout: float | None, heartbeat: float,
                turn: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext) -> None:
    """Start one trial at a time while the study's finished trials plus those running (in any
    worker) are fewer than `trials`, so `--trials N` finishes N. A worker counts and starts its
    trial holding `turn` (the sweep folder's lock), released once the trial is in the storage as
    running: two workers on one machine never both start the last one. (Workers on other
    machines share no lock; they can, if they count at the same instant.) When the last ones run
    elsewhere, wait for them: one whose worker was killed is failed by its silent heartbeat, and
    then replaced here."""
    optuna = _optuna()
    state = optuna.trial.TrialState
    start = time.monotonic()
    while timeout is None or time.monotonic() - start < timeout:
        with contextlib.ExitStack() as held:
            held.enter_context(turn())
            optuna.storages.fail_stale_trials(study)  # a killed worker's trial stops counting as running
            # One read for both counts: between two reads another worker's trial can finish,
            # missing from the first as not yet finished and from the second as no longer running.
            now = [t.state for t in study.get_trials(deepcopy=False)]
            finished = sum(s in (state.COMPLETE, state.PRUNED) for s in now)
            running = now.count(state.RUNNING)
            if finished >= trials:
                return
            if finished + running < trials:
                def started(trial: Any) -> Any:
                    held.close()  # the trial now counts as running for every worker
                    return objective(trial)
                study.optimize(started, n_trials=1, catch=())
                continue
        time.sleep(min(heartbeat, WAIT_SECONDS))


WAIT_SECONDS = 1.0  # how often a worker with no trial left to start looks at the others' last ones


def _check_same_space(study: Any, exp: Experiment) -> None:
    """Workers joining a study must search the same space."""
    space = {k: v.model_dump(mode="json", by_alias=True, exclude_none=True) for k, v in exp.sweep.items()}
    stored = study.user_attrs.get("space")
    if stored is None:
        study.set_user_attr("space", space)
        study.set_user_attr("experiment", exp.name)
    elif stored != space:
        raise ConfigError(f"study '{study.study_name}' searches another space ({stored}); expected "
                          f"{space}: use another --study")


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    log = logging.getLogger("optuna")
    old = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(old)


def best_trial(study: Any, ds: datamod.Dataset | None = None) -> dict[str, Any] | None:
    """The best trial by validation accuracy, and its test accuracy, computed once (when first
    asked for, after the search) and kept in the study."""
    optuna = _optuna()
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return None
    best = max(complete, key=lambda t: (t.value, -t.number))
    out = {"number": best.number, "val_accuracy": best.value, "params": best.params,
           "run_dir": best.user_attrs.get("run_dir"), "test_accuracy": None}
    cached = study.user_attrs.get("best_test")
    if cached and cached.get("number") == best.number:
        out["test_accuracy"] = cached["test_accuracy"]
    elif ds is not None and out["run_dir"] and Path(out["run_dir"]).is_dir():
        out["test_accuracy"] = _test_accuracy(Path(out["run_dir"]), ds)
        study.set_user_attr("best_test", {"number": best.number, "test_accuracy": out["test_accuracy"]})
    return out


def _test_accuracy(run_dir: Path, ds: datamod.Dataset) -> float:
    """The run's model on its split's test part (the only time a sweep touches test data)."""
    import torch

    from ..data.split import split_indices
    from ..device import inference_precision, pick_device
    from ..runs import load_model
    from ..training.evaluate import evaluate
    exp = record.read_experiment(run_dir)
    _, idx = split_indices(exp.data, ds)
    dev = pick_device("auto")
    loaded = load_model(run_dir, device=dev)
    ds = loaded.images(ds)
    r = evaluate(loaded.model, torch.from_numpy(ds.X[idx["test"]]), torch.from_numpy(ds.Y[idx["test"]]),
                 loaded.norm, device=dev, precision=inference_precision(loaded.precision, dev), tta=exp.train.tta)
    return float(r["accuracy"])


def show(study_name: str, storage_url: str | None = None, sweeps_dir: str | Path = "sweeps",
         ds: datamod.Dataset | None = None, plots: bool = True) -> dict[str, Any]:
    """The trials, the best one (with its test accuracy, computed once), and Optuna's plots."""
    optuna = _optuna()
    folder = Path(sweeps_dir) / study_name
    url = storage_url or default_storage(folder)
    if storage_url is None and not (folder / "study.db").is_file():
        raise RunError(f"no sweep '{study_name}' under '{sweeps_dir}' (no {folder / 'study.db'}); "
                       f"expected a study name, or --storage URL")
    try:
        study = optuna.load_study(study_name=study_name, storage=storage(url))
    except KeyError:
        raise RunError(f"study '{study_name}' does not exist in {url}") from None
    rows = []
    for t in study.get_trials(deepcopy=False):
        secs = t.user_attrs.get("seconds")
        if secs is None and t.datetime_start and t.datetime_complete:
            secs = round((t.datetime_complete - t.datetime_start).total_seconds(), 2)
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        rows.append({"number": t.number, "state": t.state.name, "params": t.params,
                     "val_accuracy": t.value if t.value is not None else last,
                     "epochs_reported": len(t.intermediate_values), "seconds": secs,
                     "run_dir": t.user_attrs.get("run_dir")})
    out: dict[str, Any] = {"study": study_name, "storage": url, "trials": rows, "best": best_trial(study, ds),
                           "figures": []}
    if plots and sum(r["state"] == "COMPLETE" for r in rows) >= 2:
        out["figures"] = _plots(study, folder)
    return out


def _plots(study: Any, folder: Path) -> list[str]:
    import functools
    import warnings

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    from .. import io as cio
    made = []
    folder.mkdir(parents=True, exist_ok=True)
    for name, fn in (("optimization_history.png", ovm.plot_optimization_history),
                     ("param_importances.png", ovm.plot_param_importances)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
            try:
                fn(study)
            except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. importances of one constant param
                continue
        fig = plt.gcf()
        fig.tight_layout()
        cio.write_with(folder / name, functools.partial(fig.savefig, format="png", dpi=110))
        plt.close(fig)
        made.append(str(folder / name))
    return made


__all__ = ["sweep", "show", "best_trial", "trial_experiment", "SweepResult"]
