"""An ensemble of trained models as one model: the weighted average of the members' class
probabilities.

It takes what every model takes ([0, 1]-scaled images) and gives each member what that member
was trained on: its own input normalization (a fixed per-channel affine map), its own test-time
views (logits averaged over them, as `cifar4 evaluate` does for the member alone) and its own
arithmetic precision. It returns the log of the averaged probabilities, so a softmax of its
output gives the ensemble's probabilities back and cross-entropy on it is the ensemble's loss.

Its options (stored in model.json like any model's) list the members: model name, options,
normalization, test-time views, precision and the run they came from; the weights of all
members are in the ensemble's own model.safetensors, so an ensemble run stands alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..data.transforms import tta_views
from ..device import bf16_is_fast
from .registry import build, register


class Ensemble(nn.Module):
    def __init__(self, num_classes: int = 4, members: Sequence[dict[str, Any]] = (),
                 weights: Sequence[float] | None = None):
        super().__init__()
        if not members:  # (one is an ensemble experiment's run whose other members were skipped)
            raise ValueError("an ensemble needs members; it is made from trained runs by "
                             "'cifar4 ensemble RUN RUN ...' or an experiment's [ensemble] table")
        weights = list(weights) if weights is not None else [1.0] * len(members)
        if len(weights) != len(members) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"expected {len(members)} non-negative weights with a positive sum")
        self.members = nn.ModuleList()
        self.tta: list[int] = []
        self.precisions: list[str] = []
        for i, m in enumerate(members):
            try:
                net = build(str(m["model"]), num_classes=num_classes, **dict(m.get("options", {})))
                norm = m["normalization"]
                scale, mean, std = float(norm["scale"]), [float(v) for v in norm["mean"]], \
                    [float(v) for v in norm["std"]]
            except (KeyError, TypeError) as e:
                raise ValueError(f"member {i + 1} is incomplete ({type(e).__name__}: {e})") from None
            self.members.append(net)
            # the member's input from [0, 1] pixels: (x * 255 * scale - mean) / std per channel
            std_t = torch.tensor(std).view(1, 3, 1, 1)
            self.register_buffer(f"gain{i}", 255.0 * scale / std_t)
            self.register_buffer(f"offset{i}", -torch.tensor(mean).view(1, 3, 1, 1) / std_t)
            self.tta.append(int(m.get("tta", 0)))
            self.precisions.append(str(m.get("precision", "fp32")))
        total = float(sum(weights))
        self.register_buffer("weights", torch.tensor([w / total for w in weights]))
        self.member_precision = True  # False: every member in fp32 (ONNX export, reference runs)

    @property
    def max_batch(self) -> int:
        return min(int(getattr(m, "max_batch", 1000)) for m in self.members)

    def member_logits(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Member i's logits for [0, 1] images, averaged over its test-time views, in float32."""
        net = self.members[i]
        xi = x * getattr(self, f"gain{i}") + getattr(self, f"offset{i}")
        bf16 = self.member_precision and self.precisions[i] == "bf16" and bf16_is_fast(x.device)
        cast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16) \
            if self.member_precision else contextlib.nullcontext()
        with cast:
            return torch.stack([net(v).float() for v in tta_views(xi, self.tta[i])]).mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights: torch.Tensor = self.weights  # type: ignore[assignment]
        probs = sum(weights[i] * torch.softmax(self.member_logits(i, x), dim=1)
                    for i in range(len(self.members)))
        assert isinstance(probs, torch.Tensor)
        return torch.log(probs.clamp_min(1e-12))


def ensemble(num_classes: int = 4, members: Sequence[dict[str, Any]] = (),
             weights: Sequence[float] | None = None) -> nn.Module:
    return Ensemble(num_classes, members, weights)


register("ensemble", "weighted average of trained models' probabilities (cifar4 ensemble)", ensemble,
         from_runs=True, members=[], weights=None)
