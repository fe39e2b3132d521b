"""The model registry: a model is a registry name plus options. `build(name, **options)` makes
it, and the same (name, options) pair stored in a run's model.json rebuilds it for evaluate,
predict and export. Model files import `register` from here (not from the package that imports
them), so the registry has no import circle."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import ModelError, did_you_mean


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    builder: Callable[..., nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)
    from_runs: bool = False  # made from trained runs (an ensemble), not from options alone


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, description: str, builder: Callable[..., nn.Module], *, from_runs: bool = False,
             **defaults: Any) -> None:
    _REGISTRY[name] = ModelSpec(name, description, builder, defaults, from_runs)


def names() -> list[str]:
    return sorted(_REGISTRY)


def spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise ModelError(f"model '{name}' is unknown; expected one of {', '.join(names())}"
                         f"{did_you_mean(name, names())}")
    return _REGISTRY[name]


def resolve_options(name: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full option set of a model: its defaults overridden by `options` (checked)."""
    s = spec(name)
    options = dict(options or {})
    unknown = sorted(set(options) - set(s.defaults))
    if unknown:
        allowed = ", ".join(s.defaults) or "none"
        raise ModelError(f"model '{name}' has no option {', '.join(unknown)}; its options: {allowed}")
    out = {**s.defaults, **options}
    for k, v in out.items():
        if isinstance(v, tuple):
            out[k] = list(v)
    return out


MODEL_SIZE = 32  # the image side every model takes unless it resizes inside (CIFAR's)


def input_size(name: str, options: dict[str, Any] | None, stored: int) -> int:
    """The image side a model takes from a dataset of `stored` px images. A model with a
    `resolution` option (transfer) resizes its input to it inside, so it takes the stored
    photos up to that resolution: their detail reaches the backbone, and nothing is kept that
    it would throw away. Every other model was built for CIFAR's 32x32. The dataset makes the
    images at this size once (`Dataset.at_size`, Lanczos), before split and batches: a model
    resizing each batch would repeat that work every epoch with a poorer filter."""
    if name not in _REGISTRY:
        return MODEL_SIZE
    resolution = resolve_options(name, options).get("resolution")
    if resolution is None:
        return MODEL_SIZE
    return max(MODEL_SIZE, min(int(stored), int(resolution)))


def build(name: str, num_classes: int = 4, **options: Any) -> nn.Module:
    s = spec(name)
    opts = resolve_options(name, options)
    try:
        return s.builder(num_classes=num_classes, **opts)
    except (TypeError, ValueError) as e:
        raise ModelError(f"model '{name}' cannot be built with options {opts}: {e}") from None
