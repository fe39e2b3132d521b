"""The practical session's architectures, exactly: the 20-unit MLP (61,544 parameters), the deep
MLP 1024-768-512-256-128 (4,492,420) and the CNN conv32-pool-conv64-pool-dense4 (28,612), with
the session's cures for overfitting as options (dropout, batch normalization; L2 is a training
option, as Keras puts it in the loss)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from ..errors import ModelError
from .layers import BatchNormalization1D, BatchNormalization2D, Conv2D, Dense, Dropout, Flatten, MaxPooling2D, ReLU
from .registry import register


def _per_layer(value: float | Sequence[float], n: int, name: str) -> list[float]:
    vals = [float(value)] * n if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(vals) != n:
        raise ModelError(f"option {name}: {len(vals)} values for {n} hidden layers")
    return vals


class Named(nn.Sequential):
    """A Sequential that names layers the Keras way: dense, dense_1, dense_2, ..."""

    def __init__(self, layers: list[nn.Module]):
        counts: dict[str, int] = {}
        named = OrderedDict()
        for layer in layers:
            base = _keras_name(type(layer).__name__)
            k = counts.get(base, 0)
            counts[base] = k + 1
            named[base if k == 0 else f"{base}_{k}"] = layer
        super().__init__(named)


def _keras_name(cls: str) -> str:
    return {"Dense": "dense", "Conv2D": "conv2d", "MaxPooling2D": "max_pooling2d",
            "Flatten": "flatten", "Dropout": "dropout", "ReLU": "activation",
            "BatchNormalization1D": "batch_normalization",
            "BatchNormalization2D": "batch_normalization"}.get(cls, cls.lower())


def mlp(num_classes: int = 4, hidden: Sequence[int] = (20,), dropout: float | Sequence[float] = 0.0,
        batchnorm: bool = False) -> nn.Module:
    drops = _per_layer(dropout, len(hidden), "dropout")
    layers: list[nn.Module] = [Flatten()]
    n_in = 32 * 32 * 3
    for width, p in zip(hidden, drops, strict=True):
        if batchnorm:
            layers += [Dense(n_in, width, activation=None), BatchNormalization1D(width), ReLU()]
        else:
            layers.append(Dense(n_in, width))
        if p > 0:
            layers.append(Dropout(p))
        n_in = width
    layers.append(Dense(n_in, num_classes, activation=None))
    return Named(layers)


def read_side(side: int, blocks: int) -> int:
    """How many of an image's first rows (and columns) a stack of `blocks` valid 3x3
    convolutions, each followed by a 2x2 max pool, uses: a pool drops the last row of an odd
    map, and with it whatever reached only that row. The session CNN on 32x32 images: 30."""
    out = side
    for _ in range(blocks):
        out = (out - 2) // 2
    for _ in range(blocks):
        out = out * 2 + 2
    return out


def cnn(num_classes: int = 4, filters: Sequence[int] = (32, 64), dropout: float = 0.0,
        batchnorm: bool = False) -> nn.Module:
    layers: list[nn.Module] = []
    c_in, side = 3, 32
    # Training computes only what reaches the Dense layer: the first convolution on 30x30, the
    # second on 14x14 (not with batch norm, whose statistics would change without the dropped
    # rows). The convolutions do fewer operations for the same values and gradients, so a
    # training step is shorter in fp32 and bf16 alike.
    used = read_side(side, len(filters))
    reads = (side, used) if used < side and not batchnorm else None
    for c in filters:
        if batchnorm:
            layers += [Conv2D(c_in, c, 3, activation=None), BatchNormalization2D(c), ReLU(), MaxPooling2D()]
        else:  # the conv's ReLU runs after the pool (the same values, 4x fewer: MaxPooling2D)
            layers += [Conv2D(c_in, c, 3, activation=None, reads=None if layers else reads),
                       MaxPooling2D(activation="relu")]
        c_in, side = c, (side - 2) // 2
    layers.append(Flatten())
    if dropout > 0:
        layers.append(Dropout(dropout))
    layers.append(Dense(c_in * side * side, num_classes, activation=None))
    return Named(layers)


register("mlp-20", "the session's first MLP: Flatten, Dense(20, relu), Dense(4) - 61,544 params",
         mlp, hidden=(20,), dropout=0.0, batchnorm=False)
register("mlp-deep", "the session's deep MLP: Dense 1024-768-512-256-128, Dense(4) - 4,492,420 params",
         mlp, hidden=(1024, 768, 512, 256, 128), dropout=0.0, batchnorm=False)
register("cnn", "the session's CNN: Conv2D(32)-MaxPool-Conv2D(64)-MaxPool-Flatten-Dense(4) - 28,612 params",
         cnn, filters=(32, 64), dropout=0.0, batchnorm=False)
