"""Tensor preprocessing and batch augmentation. Everything works on whole batches on the
training device; nothing loops over images in Python.

Images enter as uint8 NHWC (the dataset's layout) and leave as float NCHW in channels_last
memory, which is what fast CPU and GPU convolutions want.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Normalization:
    """x_model = (x_uint8 * scale - mean) / std, per channel. Stored with every model so that
    evaluate and predict apply exactly what training applied."""

    scale: float = 1 / 255
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @classmethod
    def from_config(cls, scale: bool, standardize: bool, X_train: np.ndarray | None = None) -> Normalization:
        s = 1 / 255 if scale else 1.0
        if not standardize:
            return cls(scale=s)
        if X_train is None:
            raise ValueError("standardize needs the training images")
        m, sd = _channel_moments(X_train)
        m, sd = m * s, sd * s
        return cls(scale=s, mean=(float(m[0]), float(m[1]), float(m[2])),
                   std=(float(max(sd[0], 1e-8)), float(max(sd[1], 1e-8)), float(max(sd[2], 1e-8))))

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Normalization:
        return cls(scale=float(d["scale"]), mean=tuple(d["mean"]), std=tuple(d["std"]))

    def apply(self, x_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 (N,S,S,3) -> float (N,3,S,S) in channels_last memory, normalized (S: 32, or
        the size a transfer model takes from a larger imported dataset). The result is a view
        of an NHWC tensor, so no copy changes the layout."""
        x = x_uint8.to(dtype)
        if self.mean == (0.0, 0.0, 0.0) and self.std == (1.0, 1.0, 1.0):
            x = x * self.scale if self.scale != 1.0 else x
        else:
            mean = torch.tensor(self.mean, dtype=dtype, device=x.device)
            inv_std = 1 / torch.tensor(self.std, dtype=dtype, device=x.device)
            x = (x * self.scale - mean) * inv_std  # broadcasts over the trailing channel axis
        return x.permute(0, 3, 1, 2)


def _channel_moments(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of NHWC images. uint8 images are counted into
    one 256-bin histogram per channel (exact integer sums, and several times faster than a
    float64 copy of every value, which cost a visible share of a short run's overhead); other
    dtypes go through float64."""
    x = X.reshape(-1, X.shape[-1])
    if x.dtype != np.uint8:
        x64 = x.astype(np.float64)
        return x64.mean(0), x64.std(0)
    counts = np.stack([np.bincount(x[:, c], minlength=256) for c in range(x.shape[1])]).astype(np.float64)
    v = np.arange(256, dtype=np.float64)
    n = counts.sum(1)
    mean = counts @ v / n
    var = np.maximum(counts @ (v * v) / n - mean * mean, 0.0)
    return mean, np.sqrt(var)


class InputTransform(Protocol):
    """What turns stored inputs into model inputs: a Normalization (uint8 images) or
    FeatureInput (cached feature rows)."""

    def apply(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...

    def to_dict(self) -> dict: ...


class BatchAugment(Protocol):
    """What augments a training batch: Augment (images) or ViewSample (cached feature views)."""

    @property
    def active(self) -> bool: ...

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...


@dataclass(frozen=True)
class FeatureInput:
    """Stands in for Normalization when a model reads precomputed features (a transfer head
    on cached backbone features): rows go in as they are."""

    def apply(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return x.to(dtype)

    def to_dict(self) -> dict:
        return {"features": True}


class ViewSample:
    """Augmentation on cached features: each training row holds one feature vector per view
    (the image, its mirror); every step picks one view per row at random."""

    active = True

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        pick = torch.randint(x.shape[1], (x.shape[0],), generator=generator, device=_on(generator)).to(x.device)
        return x[torch.arange(x.shape[0], device=x.device), pick]


def one_hot(y: np.ndarray | torch.Tensor, num_classes: int = 4) -> torch.Tensor:
    """The session's `to_categorical`."""
    return F.one_hot(torch.as_tensor(y, dtype=torch.int64), num_classes).float()


# ---------------------------------------------------------------- augmentation

def _on(generator: torch.Generator | None) -> torch.device:
    """Where random numbers are drawn: the generator's device (a GPU run draws on the GPU, so a
    step never waits for a copy from the host)."""
    return generator.device if generator is not None else torch.device("cpu")


def flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror a random half of the batch left-right."""
    mask = torch.rand(x.shape[0], generator=generator, device=_on(generator)).to(x.device) < 0.5
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)


def translate(x: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random shifts of up to `pad` pixels (reflect padding, then a random crop per image),
    done as one gather over the batch."""
    if pad <= 0:
        return x
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=_on(generator)).to(x.device)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=_on(generator)).to(x.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device).view(1, h))  # (n,h)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device).view(1, w))  # (n,w)
    xp = xp.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, xp.shape[3]))
    out = xp.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))
    return out.contiguous(memory_format=torch.channels_last)


def affine(x: torch.Tensor, rotation: float, shift: float,
           generator: torch.Generator | None = None, mirror: bool = False) -> torch.Tensor:
    """Keras ImageDataGenerator-style random rotation (up to `rotation` degrees) and shifts (up
    to `shift` of the width/height), nearest fill at the borders, for the whole batch at once.
    With `mirror`, a random half is also mirrored left-right afterwards, as `flip` would do it, but
    inside the sampling grid: the mirror of a sampled image samples at the mirrored pixel
    centres, so no pass over the images is added (the same random draws and, for power-of-two
    widths, where the centres are exactly symmetric, the same values as `flip` after it)."""
    if rotation <= 0 and shift <= 0:
        return flip(x, generator) if mirror else x
    n = x.shape[0]
    ang = (torch.rand(n, generator=generator, device=_on(generator)) * 2 - 1) * math.radians(rotation)
    tx = (torch.rand(n, generator=generator, device=_on(generator)) * 2 - 1) * shift * 2  # grid units span 2
    ty = (torch.rand(n, generator=generator, device=_on(generator)) * 2 - 1) * shift * 2
    cos, sin = (torch.cos(ang).to(x.device), torch.sin(ang).to(x.device))
    tx, ty = tx.to(x.device), ty.to(x.device)
    # F.affine_grid's sampling grid, by broadcasting over pixel centres instead of its batched
    # matmul (the same grid to 5e-7, and faster on a CPU, where the small batched matmul dominates)
    h, w = x.shape[-2:]
    xs = ((torch.arange(w, device=x.device, dtype=torch.float32) * 2 + 1) / w - 1).view(1, 1, w)
    ys = ((torch.arange(h, device=x.device, dtype=torch.float32) * 2 + 1) / h - 1).view(1, h, 1)
    if mirror:  # drawn as `flip` draws it; mirrored images read their columns from right to left
        mirrored = torch.rand(n, generator=generator, device=_on(generator)).to(x.device) < 0.5
        xs = torch.where(mirrored.view(n, 1, 1), -xs, xs)
    c, s = cos.view(n, 1, 1), sin.view(n, 1, 1)
    grid = torch.stack([c * xs - s * ys + tx.view(n, 1, 1), s * xs + c * ys + ty.view(n, 1, 1)], -1)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(x.dtype).contiguous(memory_format=torch.channels_last)


def cutout(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero one random size x size square per image (clipped at the borders), batched."""
    if size <= 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=generator, device=_on(generator)).to(x.device).view(n, 1, 1)
    cx = torch.randint(0, w, (n,), generator=generator, device=_on(generator)).to(x.device).view(n, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    half = size // 2
    inside = ((rows - cy).abs() <= half - (1 - size % 2) * (rows < cy)) & \
             ((cols - cx).abs() <= half - (1 - size % 2) * (cols < cx))
    return x.masked_fill(inside.unsqueeze(1), 0.0)


@dataclass(frozen=True)
class Augment:
    """What to do to each training batch. Defaults do nothing."""

    flip: bool = False
    translate: int = 0      # pixels, reflect-padded random crop (fast nets)
    rotation: float = 0.0   # degrees, Keras rotation_range
    shift: float = 0.0      # fraction of the side, Keras width/height_shift_range
    cutout: int = 0         # side of a square zeroed at a random place (0: off)

    @property
    def active(self) -> bool:
        return self.flip or self.translate > 0 or self.rotation > 0 or self.shift > 0 or self.cutout > 0

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        # with no crop between them, the flip is folded into the affine sampling grid (the same
        # values, one pass over the batch fewer)
        fold = self.flip and self.translate == 0 and (self.rotation > 0 or self.shift > 0)
        if self.rotation > 0 or self.shift > 0:
            x = affine(x, self.rotation, self.shift, generator, mirror=fold)
        if self.translate > 0:
            x = translate(x, self.translate, generator)
        if self.flip and not fold:
            x = flip(x, generator)
        if self.cutout > 0:
            x = cutout(x, self.cutout, generator)
        return x


# ---------------------------------------------------------------- test-time views

def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The image moved by (dy, dx) pixels, reflect-padded at the borders."""
    p = max(abs(dy), abs(dx))
    xp = F.pad(x, (p, p, p, p), mode="reflect")
    h, w = x.shape[2:]
    return xp[:, :, p - dy:p - dy + h, p - dx:p - dx + w]


def tta_views(x: torch.Tensor, level: int) -> list[torch.Tensor]:
    """Level 0: the image; 1: and its mirror; 2: both, also shifted by one pixel up-left and
    down-right (airbench's TTA)."""
    views = [x]
    if level >= 1:
        views.append(x.flip(3))
    if level >= 2:
        for d in (-1, 1):
            s = _shift(x, d, d)
            views += [s, s.flip(3)]
    return views
