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

Evidence (BENCHMARKS.md; 3,600-image test sets, 3 seeds on the session split + 2 other
splits; torch 2.13 CPU, bf16 chosen by measurement; whole command from start to metrics.json):
- `--preset fast` (32-96-192 channels, 6 epochs, six test-time views): 0.9172 +- 0.0027 in
  68-82 s (one fresh machine's first run: 102 s, in the host's busiest minutes) on a 2-core
  AMX Xeon whose host was busy. Before it, 32-128-256 with the flip view: 0.9195 +- 0.0021 in
  61-70 s on a 2-core AMD EPYC (Zen 4), 0.9206 +- 0.0021 in 105-128 s on the busy Xeon. On a
  2-core AVX2-only EPYC (Zen 3, fp32) its 87 s limit takes the 16-48-96 fallback: 0.8737 +-
  0.0051 in 85-87 s (the 32-96-192 net fitted about one epoch there).
- `--preset fast-28` (64-256-256, 28 epochs, + cutout; 3 seeds): 0.9511 +- 0.0017 in 443 s of fit on a
  quiet 2-core AMX Xeon; 0.9509 in 5.7-7.1 s of fit on one H100.
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
