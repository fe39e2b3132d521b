"""Keras-named layers on plain torch, so summaries read like the session's `model.summary()`
and the initialisation matches Keras (Glorot-uniform kernels, zero biases): the session's
numbers, such as the raw-pixel MLP's first-epoch loss in the tens, depend on it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _glorot(module: nn.Linear | nn.Conv2d) -> None:
    nn.init.xavier_uniform_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class Dense(nn.Linear):
    """Keras Dense: a linear layer with an optional fused ReLU."""

    def __init__(self, n_in: int, n_out: int, activation: str | None = "relu", bias: bool = True):
        super().__init__(n_in, n_out, bias=bias)
        self.activation = activation
        _glorot(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return F.relu(x) if self.activation == "relu" else x


class Conv2D(nn.Conv2d):
    """Keras Conv2D (padding 'valid' unless told) with an optional fused ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, padding: str | int = 0,
                 activation: str | None = "relu", bias: bool = True):
        super().__init__(c_in, c_out, kernel_size, padding=padding, bias=bias)
        self.activation = activation
        _glorot(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return F.relu(x) if self.activation == "relu" else x


class MaxPooling2D(nn.MaxPool2d):
    def __init__(self, pool_size: int = 2):
        super().__init__(pool_size)


class Flatten(nn.Flatten):
    pass


class Dropout(nn.Dropout):
    pass


class ReLU(nn.ReLU):
    """A separate activation, used after batch normalization."""


class BatchNormalization1D(nn.BatchNorm1d):
    def __init__(self, n: int):
        super().__init__(n, eps=1e-3, momentum=0.01)  # Keras defaults (momentum 0.99)


class BatchNormalization2D(nn.BatchNorm2d):
    def __init__(self, n: int):
        super().__init__(n, eps=1e-3, momentum=0.01)
