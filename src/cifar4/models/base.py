"""What a run asks of a model beyond `forward()`, written down.

Any `nn.Module` the registry builds can be trained, evaluated, saved and served: it takes
[0, 1]-scaled images (N, 3, 32, 32) and returns logits (N, classes). A model may also take part
in the steps around training by following one of these protocols; the run (training/pipeline.py)
asks through the functions below, never by probing attributes itself.

- `Pretrained`: has weights to load before training (a transfer backbone's ImageNet weights).
- `DataInitialized`: sets part of itself from training images before training (the fast net's
  whitening layer; the random-backbone control's batch-norm statistics).
- `FrozenBackbone`: a frozen pretrained backbone under a trainable head. Its features are the
  same at every epoch, so the run computes them once (training/features.py, cached on disk) and
  trains the head alone on them.
- `MemberPrecision`: runs its parts in their own precisions (an ensemble); `full_precision`
  turns that off for export.
- `max_batch`: the largest inference batch worth using (large inputs want small batches).
"""

from __future__ import annotations

from typing import Protocol, TypeGuard, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Pretrained(Protocol):
    def load_pretrained(self) -> None: ...


@runtime_checkable
class DataInitialized(Protocol):
    def init_from_data(self, x: torch.Tensor) -> None: ...


@runtime_checkable
class FrozenBackbone(Protocol):
    frozen: bool
    head: nn.Module
    resolution: int
    num_features: int

    @property
    def max_batch(self) -> int: ...

    def backbone_digest(self) -> str: ...

    def embed(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class MemberPrecision(Protocol):
    """Runs parts of itself in their own precision (an ensemble's members)."""

    member_precision: bool


def full_precision(model: nn.Module) -> nn.Module:
    """The model with every part in fp32 (what ONNX export traces and compares against)."""
    if isinstance(model, MemberPrecision):
        model.member_precision = False
    return model


def load_pretrained(model: nn.Module) -> None:
    if isinstance(model, Pretrained):
        model.load_pretrained()


def init_from_data(model: nn.Module, x: torch.Tensor) -> None:
    """`x`: normalized training images (N, 3, 32, 32)."""
    if isinstance(model, DataInitialized):
        model.init_from_data(x)


def cached_features_only(model: nn.Module) -> TypeGuard[FrozenBackbone]:
    """Whether only a head trains, on features computed once (a frozen backbone)."""
    return isinstance(model, FrozenBackbone) and bool(model.frozen)


def backbone_digest(model: nn.Module) -> str | None:
    return model.backbone_digest() if isinstance(model, FrozenBackbone) else None


def inference_batch(model: nn.Module, default: int) -> int:
    return min(default, int(getattr(model, "max_batch", default)))
