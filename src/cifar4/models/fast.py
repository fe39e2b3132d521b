"""The `fast` family: airbench-style residual-free conv nets that reach high accuracy in few
epochs (KellerJordan/cifar10-airbench, Page's "How to train your ResNet").

Recipe (the `fast*` experiments hold the training half):
- a frozen 2x2 whitening convolution, initialised from the eigenvectors of the training
  patches' covariance (both signs), so the first layer starts decorrelated;
- three conv groups: conv -> maxpool -> BN -> GELU -> conv -> BN -> GELU, convs starting as
  identity on their first channels (dirac), no biases;
- batch norm with its scale frozen at 1 (only the shift learns) and fast-moving statistics;
- a global max-pool, then a bias-free linear head scaled down so logits start small;
- trained with label smoothing, Nesterov SGD, a one-cycle (linear warm-up and decay)
  schedule, decoupled weight decay, flip + 2-pixel translate augmentation on whole batches,
  bf16 autocast on CPU and GPU (on a CPU where it measures faster, the weight gradients of
  the small, wide maps as matmuls: layers.Conv3x3), and flip (+ shift) test-time views.

Evidence: docs/benchmarks/index.md gives each preset's test accuracy (3 seeds on the course's
split and 2 other splits) and its whole-command time on each CPU and GPU measured, with the
hardware, the date, the commit and the command
(`python benchmarks/presets.py fast fast-long --seeds 0 1 2 --split-seeds 7 11 --cold`).
- `--preset fast` (32-96-192 channels, 6 epochs, six test-time views): above 0.91 within its
  87 s limit on 2 AVX-512 cores; on a CPU that trains in fp32 its limit takes a lighter
  fallback (24-64-128, else 16-48-96), since the full net would fit only a fraction of its epochs.
- `--preset fast-28` (64-256-256, 28 epochs, + cutout): about 0.95, the strongest single fast
  net: minutes of training on a CPU, seconds on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import Conv3x3
from .registry import register


class Whiten(nn.Conv2d):
    """2x2 patch whitening, frozen; its weights come from the data (`init_from_data`)."""

    def __init__(self, eps: float = 5e-4):
        super().__init__(3, 24, kernel_size=2, padding=0, bias=True)
        self.eps = eps
        self.weight.requires_grad_(False)

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """x: normalized training images (N, 3, H, W)."""
        patches = x.float().unfold(2, 2, 1).unfold(3, 2, 1)            # N,3,31,31,2,2
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)     # one row per patch
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        eigvals, eigvecs = torch.linalg.eigh(cov.double())
        w = (eigvecs.T / torch.sqrt(eigvals.clamp_min(0) + self.eps)[:, None]).float()
        w = w.flip(0).reshape(12, 3, 2, 2)                                # largest first
        self.weight.copy_(torch.cat([w, -w]))
        assert self.bias is not None  # made with bias=True
        self.bias.zero_()


class FrozenScaleBatchNorm(nn.BatchNorm2d):
    """Batch norm whose scale stays 1: only the shift is learned."""

    def __init__(self, n: int, momentum: float = 0.4, eps: float = 1e-12):
        super().__init__(n, eps=eps, momentum=momentum)
        self.weight.requires_grad_(False)


class IdentityInitConv(Conv3x3):
    """3x3 conv, same padding, no bias, starting as identity on its first channels."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out)
        nn.init.kaiming_normal_(self.weight, nonlinearity="linear")
        with torch.no_grad():
            self.weight.mul_(0.5)
            k = min(c_in, c_out)
            nn.init.dirac_(self.weight[:k])


class GELU(nn.GELU):
    pass


class ConvGroup(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, bn_momentum: float):
        super().__init__()
        self.conv1 = IdentityInitConv(c_in, c_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = FrozenScaleBatchNorm(c_out, bn_momentum)
        self.act1 = GELU()
        self.conv2 = IdentityInitConv(c_out, c_out)
        self.norm2 = FrozenScaleBatchNorm(c_out, bn_momentum)
        self.act2 = GELU()


class FastNet(nn.Module):
    def __init__(self, num_classes: int = 4, widths: Sequence[int] = (64, 256, 256),
                 bn_momentum: float = 0.4, head_scale: float = 1 / 9):
        super().__init__()
        if len(widths) != 3 or any(int(w) <= 0 for w in widths):
            raise ValueError("widths must be three positive channel counts")
        self.whiten = Whiten()
        self.act = GELU()
        c = 24
        groups = []
        for w in widths:
            groups.append(ConvGroup(c, int(w), bn_momentum))
            c = int(w)
        self.group1, self.group2, self.group3 = groups
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(c, num_classes, bias=False)
        self.head_scale = head_scale

    def init_from_data(self, x: torch.Tensor) -> None:
        self.whiten.init_from_data(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.whiten(x))
        x = self.group3(self.group2(self.group1(x)))
        return self.head(self.flatten(self.pool(x))) * self.head_scale


def fast(num_classes: int = 4, widths: Sequence[int] = (64, 256, 256), bn_momentum: float = 0.4) -> nn.Module:
    return FastNet(num_classes, widths, bn_momentum)


register("fast", "airbench-style net: frozen whitening, 3 conv groups (64-256-256), frozen-scale BN",
         fast, widths=(64, 256, 256), bn_momentum=0.4)
