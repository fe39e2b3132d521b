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
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


class ModelConfig(_Strict):
    name: str = "cnn"
    options: dict[str, Any] = Field(default_factory=dict)


class DataConfig(_Strict):
    split: Literal["session", "stratified", "official"] = "session"
    split_seed: int = 42
    scale: bool = True           # the session's X / 255.0; False feeds raw 0-255 pixels
    standardize: bool = False    # per-channel mean/std of the training split
    train_subset: int | None = Field(default=None, gt=0)   # use only the first N training rows
    eval_subset: int | None = Field(default=None, gt=0)    # and N validation / test rows


class AugmentConfig(_Strict):
    flip: bool = False
    translate: int = Field(default=0, ge=0, le=8)
    rotation: float = Field(default=0.0, ge=0, le=180)
    shift: float = Field(default=0.0, ge=0, lt=0.5)
    cutout: int = Field(default=0, ge=0, le=32)


class EarlyStoppingConfig(_Strict):
    monitor: Literal["val_loss", "val_accuracy", "loss", "accuracy"] = "val_loss"
    patience: int = Field(default=5, ge=0)
    min_delta: float = Field(default=0.0, ge=0)
    restore_best_weights: bool = True


class TrainConfig(_Strict):
    epochs: int = Field(default=10, gt=0, le=100000)
    batch_size: int = Field(default=100, gt=0)
    optimizer: Literal["adam", "sgd", "rmsprop"] = "adam"
    lr: float | None = Field(default=None, gt=0)        # None: the Keras default of the optimizer
    momentum: float = Field(default=0.0, ge=0, lt=1)
    nesterov: bool = False
    l2: float = Field(default=0.0, ge=0)                 # Keras kernel_regularizer l2, added to the loss
    weight_decay: float = Field(default=0.0, ge=0)       # decoupled, per step, times lr
    bias_lr_scale: float = Field(default=1.0, gt=0)      # lr multiplier of biases and BN shifts
    backbone_lr_scale: float = Field(default=1.0, gt=0)  # lr multiplier of a pretrained backbone
                                                         # being fine-tuned (transfer mode c)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    schedule: Literal["constant", "onecycle", "linear"] = "constant"
    warmup: float = Field(default=0.0, ge=0, lt=1)       # fraction of the steps spent warming up
    early_stopping: EarlyStoppingConfig | None = None
    checkpoint_best: bool = False                        # ModelCheckpoint(save_best_only) on val_accuracy
    tta: int = Field(default=0, ge=0, le=2)              # test-time augmentation: 0 off, 1 (or true) flip,
                                                         # 2 flip and 1-pixel shifts (6 views)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 for conv nets where fast
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _coherent(self) -> "TrainConfig":
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs optimizer 'sgd' with momentum > 0")
        if self.momentum and self.optimizer == "adam":
            raise ValueError("momentum is not an adam option (use sgd or rmsprop)")
        if self.warmup and self.schedule == "constant":
            raise ValueError("warmup needs schedule 'onecycle' or 'linear'")
        return self


class Experiment(_Strict):
    name: str = Field(default="experiment", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    description: str = ""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())


# ---------------------------------------------------------------- loading

def _explain(e: ValidationError, where: str) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key '{loc}'"
    got = err.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{where}: {loc}: {msg}{got_s}{more}"


def from_dict(d: dict[str, Any], where: str = "experiment") -> Experiment:
    try:
        exp = Experiment.model_validate(d)
    except ValidationError as e:
        raise ConfigError(_explain(e, where)) from None
    from . import models  # the model name and its options are checked against the registry
    try:
        opts = models.resolve_options(exp.model.name, exp.model.options)
        with torch.device("meta"):  # option values checked by building, with no memory
            models.build(exp.model.name, **opts)
    except Exception as e:
        raise ConfigError(f"{where}: {e}") from None
    if exp.model.name == "transfer":
        _check_transfer(exp, opts, where)
    return exp


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
                      f"nor a .toml file")


def load(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Experiment:
    d, where = load_dict(name_or_path)
    return from_dict(merge(d, overrides or {}), where)


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

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(d: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for experiment dicts (None values are left out)."""
    lines, tables = [], []
    for k, v in d.items():
        if v is None:
            continue
        if isinstance(v, dict) and any(isinstance(x, dict) for x in v.values()) or (
                isinstance(v, dict) and not prefix):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in tables:
        name = f"{prefix}{k}"
        out += f"\n[{name}]\n" + dump_toml(v, prefix=f"{name}.")
    return out
