"""Experiments are data: one schema (pydantic) checks every experiment TOML file, preset and
command-line override. Unknown keys, wrong types and impossible values are ConfigErrors that
name the file, the key, the value found and what is allowed.

An experiment file looks like:

    name = "cnn"
    description = "the session's CNN, 7 epochs"
    [model]
    name = "cnn"
    options = { dropout = 0.0 }
    [data]
    split = "session"
    [train]
    epochs = 7
    batch_size = 100
    optimizer = "adam"
    [augment]
    flip = true
"""

from __future__ import annotations

import copy
import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import tomli_w
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch.overrides import TorchFunctionMode

from . import models
from .errors import ConfigError, ModelError, did_you_mean


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


class ModelConfig(_Strict):
    name: str = Field(default="cnn", description="The model's registry name (see `cifar4 models`).")
    options: dict[str, Any] = Field(default_factory=dict, description="The model's options "
                                    "(dropout, filters, widths, ...), checked against its registry entry.")


class DataConfig(_Strict):
    split: Literal["session", "stratified", "official"] = Field(
        default="session", description="How the rows are split into train, validation and test.")
    split_seed: int = Field(default=42, description="The split's seed.")
    scale: bool = Field(default=True, description="The session's X / 255.0; false feeds raw 0-255 pixels.")
    standardize: bool = Field(default=False, description="Per-channel mean and std of the training split.")
    train_subset: int | None = Field(default=None, gt=0, description="Use only the first N training rows.")
    eval_subset: int | None = Field(default=None, gt=0, description="And only N validation and test rows.")


class AugmentConfig(_Strict):
    flip: bool = Field(default=False, description="Mirror half the images left to right.")
    translate: int = Field(default=0, ge=0, le=8, description="Shift by up to this many pixels "
                                                            "(reflect-padded crops).")
    rotation: float = Field(default=0.0, ge=0, le=180, description="Rotate by up to this many degrees.")
    shift: float = Field(default=0.0, ge=0, lt=0.5, description="Shift by up to this fraction of the "
                                                              "size, as Keras' RandomTranslation.")
    cutout: int = Field(default=0, ge=0, le=32, description="Blank a square of this many pixels a side.")


class EarlyStoppingConfig(_Strict):
    """Keras' EarlyStopping arguments, with Keras' defaults."""

    monitor: Literal["val_loss", "val_accuracy", "loss", "accuracy"] = Field(
        default="val_loss", description="The history key watched.")
    patience: int = Field(default=0, ge=0, description="Epochs without improvement before stopping.")
    min_delta: float = Field(default=0.0, ge=0, description="A smaller change is no improvement.")
    restore_best_weights: bool = Field(default=False, description="On stopping, go back to the best epoch.")


class TrainConfig(_Strict):
    epochs: int = Field(default=10, gt=0, le=100000, description="Passes over the training split.")
    batch_size: int = Field(default=100, gt=0, description="Images per training step.")
    optimizer: Literal["adam", "sgd", "rmsprop"] = Field(default="adam", description="With Keras' defaults.")
    lr: float | None = Field(default=None, gt=0, description="Learning rate; none: the Keras default "
                                                             "of the optimizer.")
    momentum: float = Field(default=0.0, ge=0, lt=1, description="sgd and rmsprop momentum.")
    nesterov: bool = Field(default=False, description="Nesterov momentum (sgd with momentum).")
    l2: float = Field(default=0.0, ge=0, description="Keras' kernel_regularizer l2: this times the "
                                                     "sum of squared kernels, added to the loss.")
    weight_decay: float = Field(default=0.0, ge=0, description="Decoupled weight decay of the kernels, "
                                                               "per step, times the learning rate.")
    bias_lr_scale: float = Field(default=1.0, gt=0, description="Learning-rate multiplier of biases "
                                                                "and batch-norm shifts.")
    backbone_lr_scale: float = Field(default=1.0, gt=0, description="Learning-rate multiplier of a "
                                     "pretrained backbone being fine-tuned (transfer, finetune > 0).")
    label_smoothing: float = Field(default=0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")
    schedule: Literal["constant", "onecycle", "linear"] = Field(
        default="constant", description="Learning-rate schedule over the planned steps.")
    warmup: float = Field(default=0.0, ge=0, lt=1, description="Fraction of the steps spent warming up.")
    early_stopping: EarlyStoppingConfig | None = Field(default=None, description="Keras' EarlyStopping.")
    checkpoint_best: bool = Field(default=False, description="ModelCheckpoint(save_best_only) on "
                                  "val_accuracy: the run keeps its best epoch's weights.")
    bn_recalibrate: int = Field(
        default=4, ge=0, le=1000, description="Before each epoch's validation, the batch-norm "
        "statistics are recomputed at the current weights from this many training batches (fixed "
        "rows, no augmentation), so the validation curve and the saved model do not lag the "
        "weights while the learning rate is high; models without batch norm are unaffected (0: off, "
        "Keras' behaviour: the running averages as training left them).")
    tta: int = Field(default=0, ge=0, le=2, description="Test-time augmentation: 0 off, 1 (or true) "
                                                        "the mirror, 2 mirror and 1-pixel shifts (6 views).")
    precision: Literal["auto", "fp32", "bf16", "bf16-matmul-wgrad"] = Field(
        default="auto", description="auto: measured on a CPU (training/precision.py), bf16 on a GPU "
        "that has it; bf16-matmul-wgrad: bf16 with the fast nets' small, wide maps' weight "
        "gradients as matmuls, the variant auto may choose, forced.")
    seed: int = Field(default=0, description="Initialisation, data order and augmentation.")
    seeds: list[int] | None = Field(default=None, min_length=1, description="One run per seed, and a summary.")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: the GPU when there is one.")
    time_budget: float | None = Field(default=None, gt=0, description="Seconds from the command's start "
                                      "to metrics.json: the steps and schedule are fitted to them.")
    time_limit: float = Field(default=0, ge=0, description="At most these seconds from the command's "
                              "start to metrics.json: the epochs run as set where they fit, else the "
                              "steps and schedule are fitted to the limit (0: no limit; time_budget, "
                              "when set, replaces it).")
    reference_images: int | None = Field(
        default=None, gt=0, description="The training-set size the epochs were chosen on: under a "
        "time limit, a variant fits where it takes the steps of FALLBACK_FITS of the epochs on that "
        "many images, or on the training set where it is smaller (none: the training set).")

    @model_validator(mode="after")
    def _coherent(self) -> TrainConfig:
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs optimizer 'sgd' with momentum > 0")
        if self.momentum and self.optimizer == "adam":
            raise ValueError("momentum is not an adam option (use sgd or rmsprop)")
        if self.warmup and self.schedule == "constant":
            raise ValueError("warmup needs schedule 'onecycle' or 'linear'")
        return self


class SweepParam(_Strict):
    """One searched key: exactly one distribution."""

    log_uniform: tuple[float, float] | None = Field(default=None, description="[low, high], drawn "
                                                    "uniformly on a log scale.")
    uniform: tuple[float, float] | None = Field(default=None, description="[low, high], drawn uniformly.")
    int_uniform: tuple[int, int] | None = Field(default=None, alias="int", description="[low, high], "
                                                "an integer drawn uniformly.")
    choice: list[Any] | None = Field(default=None, description="One of these values.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _one(self) -> SweepParam:
        given = [k for k in ("log_uniform", "uniform", "int_uniform", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("expected exactly one of log_uniform, uniform, int, choice")
        lo_hi = self.log_uniform or self.uniform or self.int_uniform
        if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
            raise ValueError(f"range [{lo_hi[0]}, {lo_hi[1]}] is empty or reversed; expected [low, high] "
                             f"with low < high")
        if self.log_uniform is not None and self.log_uniform[0] <= 0:
            raise ValueError("log_uniform needs a range above 0")
        if self.choice is not None and not self.choice:
            raise ValueError("choice is empty; expected at least one value")
        return self

    def values(self) -> list[Any]:
        """Values the key can take that bound its range (to check the key path)."""
        if self.choice is not None:
            return list(self.choice)
        lo_hi = self.log_uniform or self.uniform or self.int_uniform
        assert lo_hi is not None
        return list(lo_hi)


class EnsembleConfig(_Strict):
    """An experiment made of experiments: each member is trained (with this experiment's split,
    seed, device and precision), then their probabilities are averaged (training/ensemble.py).
    An ensemble's train.time_limit counts for the whole command: its last member gets what is
    left of it when it starts."""

    members: list[str] = Field(min_length=2, description="Built-in experiment names or TOML files.")
    weights: list[float] | Literal["equal", "val"] = Field(
        default="equal", description="One per member, equal, or val: chosen on the validation split.")
    epochs_scale: float = Field(default=1.0, gt=0, le=1, description="The members' epochs times this "
                                                                   "(the lab's --quick).")
    distill: float = Field(default=0.0, ge=0, le=0.5, description=(
        "Later members learn from the earlier ones: each trains on targets made of 1 - distill parts "
        "its labels and distill parts the earlier members' mean probabilities on its training images "
        "(softened by distill_temperature). At most 0.5, so the label keeps the largest share."))
    distill_temperature: float = Field(default=2.0, gt=0, le=10, description=(
        "The earlier members' logits are divided by this before their softmax: above 1, the targets "
        "keep which wrong classes an image resembles, which a member that fits its training images "
        "almost surely would otherwise round away."))


# What an ensemble experiment may set beyond its members: the rest belongs to the members' files.
FALLBACK_SECTIONS = ("model", "train", "augment")
# ... and of data, a fallback may set only the training rows it reads: a variant that trains on a
# subset of them (a frozen backbone's features of fewer images to extract) is judged on the same
# validation rows and tested on the same test rows as the experiment it stands in for
FALLBACK_DATA_KEYS = ("train_subset",)
# A variant fits where a time limit leaves it the steps of this share of the experiment's epochs,
# counted on its training set or on train.reference_images where that is smaller (pipeline._fit_steps)
FALLBACK_FITS = 0.75
ENSEMBLE_TRAIN_KEYS = ("seed", "seeds", "device", "precision", "time_limit")
ENSEMBLE_DATA_KEYS = ("split", "split_seed", "train_subset", "eval_subset")


class Experiment(_Strict):
    name: str = Field(default="experiment", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                      description="The experiment's name (run folders are named after it).")
    description: str = Field(default="", description="One line saying what it is.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The network.")
    data: DataConfig = Field(default_factory=DataConfig, description="The split and the input scaling.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The optimizer, schedule and run.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Training augmentation.")
    sweep: dict[str, SweepParam] = Field(default_factory=dict, description="Key path -> distribution "
                                         "searched by `cifar4 sweep`.")
    ensemble: EnsembleConfig | None = Field(default=None, description="Members trained, then averaged "
                                            "(the model section unused).")
    # lighter variants for slower machines, each a table of model / train / augment keys (and the
    # training subset, data.train_subset) merged into the experiment: where train.time_limit
    # would cut its epochs short (under FALLBACK_FITS of them), the first variant that fits that
    # many is trained instead, the last where none does (pipeline._fit_to_limit; the run records
    # the choice as `fallback`). Without a time limit (`--epochs N`, `--time-limit 0`, a time
    # budget) the experiment runs as written.
    fallbacks: list[dict[str, Any]] = Field(default_factory=list, description="Lighter variants: "
                                            "model / train / augment tables (and data.train_subset) "
                                            "tried under a time limit.")
    # what changes where the run's device is a GPU: a table of model / train / augment keys
    # merged into the experiment there (a GPU's steps at a CPU's batch sizes are bound by the
    # host: larger batches take fewer steps). The run's config.toml holds what ran, its
    # metrics.json `gpu` the table; keys the user sets (flags, --set, overrides) win over it.
    gpu: dict[str, Any] = Field(default_factory=dict, description="Model / train / augment keys merged "
                                "in where the run's device is a GPU.")

    @model_validator(mode="after")
    def _ensemble_only_shared_keys(self) -> Experiment:
        if self.ensemble is None:
            return self
        for section, allowed, default in (("train", ENSEMBLE_TRAIN_KEYS, TrainConfig()),
                                          ("data", ENSEMBLE_DATA_KEYS, DataConfig())):
            got = getattr(self, section)
            for k in type(got).model_fields:
                if k not in allowed and getattr(got, k) != getattr(default, k):
                    raise ValueError(f"{section}.{k} belongs to the members' experiments; an ensemble "
                                     f"sets only {', '.join(f'{section}.{a}' for a in allowed)}")
        if self.model != ModelConfig() or self.augment != AugmentConfig() or self.sweep:
            raise ValueError("an ensemble's model, augment and sweep belong to its members' experiments")
        if isinstance(self.ensemble.weights, list) and len(self.ensemble.weights) != len(self.ensemble.members):
            raise ValueError(f"{len(self.ensemble.weights)} weights for {len(self.ensemble.members)} members; "
                             f"expected one per member")
        return self

    @model_validator(mode="after")
    def _variants_are_tables_of_sections(self) -> Experiment:
        """fallbacks and gpu hold variants: model / train / augment tables (the variants
        themselves are checked by from_dict), and not on an ensemble (its members hold them)."""
        variants = [(f"fallbacks[{i}]", f) for i, f in enumerate(self.fallbacks)]
        variants += [("gpu", self.gpu)] if self.gpu else []
        for label, table in variants:
            if self.ensemble is not None:
                what = "gpu table belongs" if label == "gpu" else "fallbacks belong"
                raise ValueError(f"an ensemble's {what} to its members' experiments")
            sections = FALLBACK_SECTIONS + (("data",) if label != "gpu" else ())
            extra = sorted(set(table) - set(sections))
            if extra:
                raise ValueError(f"{label} sets '{extra[0]}'; expected only {', '.join(sections)} tables")
            data = table.get("data", {})
            if not isinstance(data, dict):
                raise ValueError(f"{label} sets data to {data!r}; expected a table")
            keys = sorted(set(data) - set(FALLBACK_DATA_KEYS))
            if keys:
                raise ValueError(f"{label} sets data.{keys[0]}; a fallback's data table sets only "
                                 f"{', '.join(f'data.{k}' for k in FALLBACK_DATA_KEYS)} (its validation "
                                 f"and test rows stay the experiment's)")
        return self

    def _variant(self, key: str, table: dict[str, Any], label: str, where: str | None) -> Experiment:
        base = self.to_dict()
        base.pop(key, None)
        return from_dict(merge(base, table), f"{where or self.name} {label}")

    def on_gpu(self, where: str | None = None) -> Experiment:
        """The experiment as it runs on a GPU: its `gpu` table merged in (and then dropped)."""
        return self._variant("gpu", self.gpu, "gpu", where)

    def fallback(self, i: int, where: str | None = None) -> Experiment:
        """The experiment as its i-th fallback makes it (with no fallbacks of its own). A
        fallback's data.train_subset is a ceiling: a lighter variant never reads more training
        rows than the experiment it stands in for, so a smaller subset already set stays."""
        table = self.fallbacks[i]
        own, sub = self.data.train_subset, table.get("data", {}).get("train_subset")
        if own and isinstance(sub, int) and sub > own:
            table = merge(table, {"data": {"train_subset": own}})
        return self._variant("fallbacks", table, f"fallbacks[{i}]", where)

    def to_dict(self) -> dict[str, Any]:
        d = self.model_dump(mode="json", by_alias=True, exclude_none=False)
        if d.get("ensemble") is None:
            d.pop("ensemble", None)
        if not d["fallbacks"]:
            del d["fallbacks"]
        if not d["gpu"]:
            del d["gpu"]
        d["sweep"] = {k: {a: b for a, b in v.items() if b is not None} for k, v in d["sweep"].items()}
        if not d["sweep"]:
            del d["sweep"]
        return d

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())


# ---------------------------------------------------------------- loading

def _section(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The schema class of the table at `path` (('train', 'early_stopping')), None if none."""
    node: type[BaseModel] | None = Experiment
    for part in path:
        field = node.model_fields.get(str(part)) if node is not None else None
        if field is None:
            return None
        node = next((t for t in _types_in(field.annotation)
                     if isinstance(t, type) and issubclass(t, BaseModel)), None)
    return node


def _types_in(annotation: Any) -> list[Any]:
    """The types an annotation names, unions and containers opened (Literal values excluded)."""
    if get_origin(annotation) is Literal:
        return []
    args = get_args(annotation)
    return [t for a in args for t in _types_in(a)] if args else [annotation]


def choices(key: str) -> tuple[Any, ...]:
    """The values the schema allows for a key with fixed choices ('train.optimizer' -> ('adam',
    'sgd', 'rmsprop')); () for a free key. The command line's choices come from here."""
    *path, last = key.split(".")
    section = _section(tuple(path))
    field = section.model_fields.get(last) if section is not None else None
    if field is None:
        return ()
    lits = [field.annotation] if get_origin(field.annotation) is Literal else \
        [a for a in get_args(field.annotation) if get_origin(a) is Literal]
    return tuple(v for lit in lits for v in get_args(lit))


def explain(e: ValidationError, where: str) -> str:
    """One line from a pydantic error: the key, what is wrong, the value found, and the nearest
    allowed key or value when there is one near."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        parent = loc.rpartition(".")[0]
        section = _section(err["loc"][:-1])
        near = did_you_mean(str(err["loc"][-1]), section.model_fields if section is not None else (),
                            prefix=f"{parent}." if parent else "")
        return f"{where}: unknown key '{loc}'{near}"
    got = err.get("input")
    allowed = choices(loc) if err["type"] == "literal_error" else ()
    if allowed and isinstance(got, str):
        return (f"{where}: {loc}: '{got}' is not one of {', '.join(map(str, allowed))}"
                f"{did_you_mean(got, map(str, allowed))}")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{where}: {loc}: {msg}{got_s}{more}"


def from_dict(d: dict[str, Any], where: str = "experiment") -> Experiment:
    try:
        exp = Experiment.model_validate(d)
    except ValidationError as e:
        raise ConfigError(explain(e, where)) from None
    try:  # the model name and its options are checked against the registry
        opts = models.resolve_options(exp.model.name, exp.model.options)
        _check_build(exp.model.name, opts)
    except (ModelError, RuntimeError, NotImplementedError) as e:  # NotImplemented: an op on meta
        raise ConfigError(f"{where}: {e}") from None
    if exp.model.name == "transfer":
        _check_transfer(exp, opts, where)
    if exp.ensemble is not None:
        for m in exp.ensemble.members:
            member = load(m)
            if member.ensemble is not None:
                raise ConfigError(f"{where}: ensemble member '{m}' is itself an ensemble; expected "
                                  f"single experiments")
    for path, param in exp.sweep.items():
        _check_sweep_path(d, path, param, where)
    for i in range(len(exp.fallbacks)):
        exp.fallback(i, where)
    if exp.gpu:
        exp.on_gpu(where)
    return exp


_BUILT: set[str] = set()  # model names and options that built (a process checks each once)


def _check_build(name: str, options: dict[str, Any]) -> None:
    """Option values checked by building the model on the meta device (no memory), once per
    name and options in a process: a transfer backbone takes a noticeable time to build even
    there, and one command checks an experiment, its members, fallbacks and GPU variant dozens
    of times."""
    key = json.dumps([name, options], sort_keys=True, default=repr)
    if key in _BUILT:
        return
    with torch.device("meta"), _ValuesSkipped():
        models.build(name, **options)
    _BUILT.add(key)


class _ValuesSkipped(TorchFunctionMode):
    """Inside _check_build: the in-place operators that only set values (the initialisers'
    normal_, trunc_normal_'s erfinv_ and clamp_, ...) leave a meta tensor as it is. On the meta
    device torch runs them as Python references whose first use imports torch._dynamo, seconds
    on a small CPU, for values a meta tensor does not hold. The commands that do
    not train (predict, evaluate, serve, export, listings) save that; a training command still
    imports it when torch builds its optimizer (Optimizer.add_param_group is wrapped by
    torch._disable_dynamo). Shapes, dtypes and every other operator are checked as before."""

    VALUE_ONLY = frozenset({"normal_", "uniform_", "erfinv_", "clamp_", "clamp_min_", "clamp_max_",
                            "exponential_", "log_normal_", "cauchy_", "geometric_", "bernoulli_",
                            "random_"})

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if getattr(func, "__name__", "") in self.VALUE_ONLY and args and \
                isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


def set_path(d: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `d` with the dotted key path set: set_path(d, "train.lr", 0.01)."""
    *parents, last = path.split(".")
    out = copy.deepcopy(d)
    node = out
    for k in parents:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"key path '{path}': '{k}' is a value, not a table")
    node[last] = value
    return out


def _check_sweep_path(d: dict[str, Any], path: str, param: SweepParam, where: str) -> None:
    """Every searched key must exist and accept its range's bounds."""
    if not path or not all(p.isidentifier() for p in path.split(".")):
        raise ConfigError(f"{where}: sweep key '{path}' is not a key path; expected e.g. \"train.lr\"")
    base = {k: v for k, v in d.items() if k != "sweep"}
    for v in param.values():
        try:
            from_dict(set_path(base, path, v), f"{where}: sweep '{path}' = {v!r}")
        except ConfigError as e:
            raise ConfigError(str(e).replace("unknown key", "no such key")) from None


def _check_transfer(exp: Experiment, opts: dict[str, Any], where: str) -> None:
    """A transfer model normalizes its own inputs; with a frozen backbone its features are
    cached per view (the image and its mirror), so only flips can augment them."""
    if not exp.data.scale or exp.data.standardize:
        raise ConfigError(f"{where}: model 'transfer' applies its backbone's own input "
                          f"normalization; expected data.scale = true and data.standardize = false")
    if opts.get("finetune") != 0:
        return
    a = exp.augment
    image_level = [k for k, v in (("translate", a.translate), ("rotation", a.rotation),
                                  ("shift", a.shift), ("cutout", a.cutout)) if v]
    if image_level:
        raise ConfigError(f"{where}: augment.{image_level[0]} needs the images to go through the "
                          f"backbone at every step, but a frozen backbone (finetune = 0) trains "
                          f"on cached features; expected only augment.flip, or finetune > 0")
    if exp.train.tta > 1:
        raise ConfigError(f"{where}: train.tta = {exp.train.tta} with a frozen backbone; cached "
                          f"features hold the image and its mirror, so expected tta 0 or 1")


def builtin_names() -> list[str]:
    folder = resources.files("cifar4") / "experiments"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"experiment file '{path}' does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"experiment file '{path}' is a folder; expected a .toml file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"experiment file '{path}' is not UTF-8 text; expected TOML") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"experiment file '{path}' is not valid TOML ({e})") from None
    except OSError as e:
        raise ConfigError(f"cannot read experiment file '{path}': {e.strerror or e}") from None


def load_dict(name_or_path: str | Path) -> tuple[dict[str, Any], str]:
    """The raw dict of a built-in experiment name or a TOML file path, and where it came from."""
    s = str(name_or_path)
    if s in builtin_names():
        text = (resources.files("cifar4") / "experiments" / f"{s}.toml").read_text(encoding="utf-8")
        return tomllib.loads(text), f"experiment '{s}'"
    if s.endswith(".toml") or Path(s).exists():
        return read_toml(s), f"experiment file '{s}'"
    raise ConfigError(f"experiment '{s}' is neither a built-in ({', '.join(builtin_names())}) "
                      f"nor a .toml file{did_you_mean(s, builtin_names())}")


def load(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Experiment:
    """A built-in experiment or TOML file, with `overrides` merged in. An experiment's
    train.time_limit belongs to its epochs: overrides that set train.epochs without a
    time_limit lift it (`--preset fast --epochs 20` trains 20 epochs)."""
    d, where = load_dict(name_or_path)
    over = overrides or {}
    return from_dict(unset_gpu(merge(_lift_time_limit(d, over), over), over), where)


def unset_gpu(d: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`d` with the keys that `overrides` set left out of its gpu table: what a user asks for
    explicitly holds on a GPU too (`--batch-size 128`)."""
    gpu = d.get("gpu")
    if not isinstance(gpu, dict) or not gpu:
        return d

    def without(t: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in t.items():
            if k not in over:
                out[k] = v
            elif isinstance(v, dict) and isinstance(over[k], dict):
                kept = without(v, over[k])
                if kept:
                    out[k] = kept
        return out
    return {**d, "gpu": without(gpu, overrides)}


def _lift_time_limit(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` without its train.time_limit when `overrides` set train.epochs and no limit."""
    t = overrides.get("train")
    if isinstance(t, dict) and "epochs" in t and "time_limit" not in t and isinstance(base.get("train"), dict):
        return {**base, "train": {k: v for k, v in base["train"].items() if k != "time_limit"}}
    return base


def parse_options(items: list[str], flag: str = "--option") -> dict[str, Any]:
    """KEY=VALUE pairs (model options from the command line); VALUE is read as a TOML value
    (160, 0.5, true, [256, 128], "x"), and as a plain string when it is not one (resnet50,
    ./weights.pth)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(f"{flag} '{item}' is not KEY=VALUE; expected e.g. {flag} resolution=224")
        try:
            out[key] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value.strip()
    return out


def parse_sets(items: list[str], flag: str = "--set") -> dict[str, Any]:
    """SECTION.KEY=VALUE pairs -> nested overrides: `train.lr=0.01` -> {"train": {"lr": 0.01}}.
    VALUE is read as TOML (as for --option); the schema then checks every key and value."""
    out: dict[str, Any] = {}
    for item in items:
        path, sep, value = item.partition("=")
        keys = [k.strip() for k in path.split(".")]
        if not sep or len(keys) < 2 or not all(k.isidentifier() for k in keys):
            raise ConfigError(f"{flag} '{item}' is not SECTION.KEY=VALUE; expected e.g. "
                              f"{flag} train.lr=0.01 or {flag} model.options.dropout=0.3")
        parsed = parse_options([f"v={value}"], flag)["v"]
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{flag} '{item}' sets a key inside '{k}', which another "
                                  f"{flag} gives a value")
        node[keys[-1]] = parsed
    return out


# The named flags of `cifar4 train`, each sugar for one experiment key (--set KEY=VALUE).
FLAG_KEYS: dict[str, str] = {
    "model": "model.name", "dropout": "model.options.dropout", "batchnorm": "model.options.batchnorm",
    "weights": "model.options.weights", "epochs": "train.epochs", "batch_size": "train.batch_size",
    "optimizer": "train.optimizer", "lr": "train.lr", "l2": "train.l2", "seed": "train.seed",
    "device": "train.device", "precision": "train.precision", "split": "data.split",
    "split_seed": "data.split_seed", "scale": "data.scale", "standardize": "data.standardize",
    "seeds": "train.seeds", "time_budget": "train.time_budget", "time_limit": "train.time_limit",
}
# Flags that build a table: --early-stopping PATIENCE, --augment/--no-augment.
TABLE_FLAGS = ("early_stopping", "augment")
AUGMENT_EXPERIMENT = "cnn-augmented"  # --augment: the session's augmentation, as that file holds it


def flag_overrides(flags: dict[str, Any]) -> dict[str, Any]:
    """Nested overrides from named flags (None = not given)."""
    out: dict[str, Any] = {}
    for name, value in flags.items():
        if value is None:
            continue
        if name in FLAG_KEYS:
            node = out
            *parents, last = FLAG_KEYS[name].split(".")
            for k in parents:
                node = node.setdefault(k, {})
            node[last] = value
        elif name == "early_stopping":  # like Keras' EarlyStopping(patience, restore_best_weights=True)
            out.setdefault("train", {})["early_stopping"] = {"patience": value, "restore_best_weights": True}
        elif name == "augment":
            out["augment"] = (load_dict(AUGMENT_EXPERIMENT)[0]["augment"] if value
                              else AugmentConfig().model_dump())
        else:
            raise ConfigError(f"'{name}' is not an experiment flag; expected one of "
                              f"{', '.join([*FLAG_KEYS, *TABLE_FLAGS])}")
    return out


def check_resume_flags(flags: dict[str, Any]) -> None:
    """`--resume` continues a run with its own config: any experiment flag with it is an error."""
    given = [n for n, v in flags.items() if v not in (None, [], ())]
    if given:
        raise ConfigError(f"--resume continues a run with its own config; it cannot be combined "
                          f"with --{given[0].replace('_', '-')}")


def from_flags(start: str | Path | None = None, flags: dict[str, Any] | None = None,
               options: list[str] | None = None, sets: list[str] | None = None,
               name: str | None = None) -> Experiment:
    """The experiment `cifar4 train` runs: a starting experiment (built-in name or TOML file),
    then the named flags, then `--option KEY=VALUE` model options, then `--set SECTION.KEY=VALUE`
    overrides, all checked by the one schema. A notebook can call it the same way:

        from_flags("cnn", {"epochs": 3}, sets=["train.lr=0.002"])
    """
    base, where = load_dict(start) if start else ({}, "options")
    flags = dict(flags or {})
    model = flags.get("model")
    if model is not None and model != base.get("model", {}).get("name", model):
        # another model: its options start fresh, and the file's GPU variant is not its own
        base = {**{k: v for k, v in base.items() if k != "gpu"}, "model": {"name": model}}
    over, sets_over = flag_overrides(flags), parse_sets(sets or [])
    merged = merge(_lift_time_limit(base, merge(over, sets_over)), over)
    opts = parse_options(options or [], "--option")
    explicit = merge(merge(over, {"model": {"options": opts}} if opts else {}), sets_over)
    merged = unset_gpu(merge(merged, explicit), explicit)
    merged.setdefault("name", merged.get("model", {}).get("name", "cnn"))
    if name:
        merged["name"] = name
    return from_dict(merged, where)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train.lr': 0.1, ...}: the leaves of a nested experiment dict under dotted keys (an
    empty table is a leaf of its own)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `overrides` into a copy of `base` (tables merge, values replace)."""
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# ---------------------------------------------------------------- writing TOML

def _without_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _without_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}


def dump_toml(d: dict[str, Any]) -> str:
    """TOML text of an experiment dict (tomli-w: any string, and keys such as "train.lr", read
    back as written); None values, which TOML cannot hold, are left out."""
    return tomli_w.dumps(_without_none(d))
