"""What a run asks of a model beyond `forward()`, written down.

Any `nn.Module` the registry builds can be trained, evaluated, saved and served: it takes
[0, 1]-scaled images (N, 3, 32, 32) (a transfer model: (N, 3, S, S), S up to its resolution;
registry.input_size) and returns logits (N, classes). A model may also take part
in the steps around training by following one of these protocols; the run (training/pipeline.py)
asks through the functions below, never by probing attributes itself.

- `Pretrained`: has weights to load before training (a transfer backbone's ImageNet weights).
- `DataInitialized`: sets part of itself from training images before training (the fast net's
  whitening layer; the random-backbone control's batch-norm statistics).
- `FrozenBackbone`: a frozen pretrained backbone under a trainable head. Its features are the
  same at every epoch, so the run computes them once (training/features.py, cached on disk) and
  trains the head alone on them. With `cut` set, the backbone is frozen below that block only:
  the activation maps entering it are cached instead, and the blocks above train with the head
  on them (`on_cache` is what trains, `cache_shape` what it takes per image).
- `MemberPrecision`: runs its parts in their own precisions (an ensemble); `full_precision`
  turns that off for export.
- `max_batch`: the largest inference batch worth using on a CPU (large inputs want small
  batches there, to stay in its caches); a GPU takes full batches.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeGuard, cast

import torch
from torch import nn


def follows(model: Any, protocol: type) -> bool:
    """Whether `model` has every member `protocol` names (its annotated attributes and its
    methods), looked up the way Python code reads them. Not isinstance() on a runtime protocol:
    from Python 3.12 that looks members up statically (inspect.getattr_static), which misses
    what nn.Module keeps outside the instance's __dict__ (submodules such as a transfer
    model's head), so on 3.12 no transfer model counted as a frozen backbone and its head
    trained through the whole backbone at every step instead of on its cached features."""
    names = set(getattr(protocol, "__annotations__", {})) | {n for n in vars(protocol) if not n.startswith("_")}
    return all(hasattr(model, n) for n in names)


class Pretrained(Protocol):
    def load_pretrained(self) -> None: ...


class DataInitialized(Protocol):
    def init_from_data(self, x: torch.Tensor) -> None: ...


class FrozenBackbone(Protocol):
    frozen: bool
    cut: int | None
    head: nn.Module
    resolution: int
    num_features: int

    @property
    def max_batch(self) -> int: ...

    def backbone_digest(self) -> str: ...

    def embed(self, x: torch.Tensor) -> torch.Tensor: ...

    @property
    def cache_shape(self) -> tuple[int, ...]: ...

    def cache_embed(self, x: torch.Tensor) -> torch.Tensor: ...

    def on_cache(self) -> nn.Module: ...


class MemberPrecision(Protocol):
    """Runs parts of itself in their own precision (an ensemble's members)."""

    member_precision: bool


def full_precision(model: nn.Module) -> nn.Module:
    """The model with every part in fp32 (what ONNX export traces and compares against)."""
    if follows(model, MemberPrecision):
        setattr(model, "member_precision", False)  # noqa: B010 (nn.Module types attributes as tensors)
    return model


def load_pretrained(model: nn.Module) -> None:
    if follows(model, Pretrained):
        cast(Pretrained, model).load_pretrained()


def init_from_data(model: nn.Module, x: torch.Tensor) -> None:
    """`x`: normalized training images (N, 3, 32, 32)."""
    if follows(model, DataInitialized):
        cast(DataInitialized, model).init_from_data(x)


def cached_features_only(model: nn.Module) -> TypeGuard[FrozenBackbone]:
    """Whether only a head trains, on features computed once (a frozen backbone)."""
    return follows(model, FrozenBackbone) and bool(model.frozen)


def cached_inputs(model: nn.Module) -> TypeGuard[FrozenBackbone]:
    """Whether what trains takes inputs computed once and cached: a frozen backbone's
    features (its head trains), or the activation maps below a backbone's tuned top blocks
    (those blocks and the head train)."""
    return follows(model, FrozenBackbone) and (bool(model.frozen) or model.cut is not None)


def backbone_digest(model: nn.Module) -> str | None:
    return cast(FrozenBackbone, model).backbone_digest() if follows(model, FrozenBackbone) else None


def inference_batch(model: nn.Module, default: int, device: torch.device) -> int:
    """Images per inference batch: on a CPU at most the model's `max_batch`; on a GPU the
    default, whole (a CPU's small batches would cost a GPU one host round trip per few images)."""
    if device.type != "cpu":
        return default
    return min(default, int(getattr(model, "max_batch", default)))
