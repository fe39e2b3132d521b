"""Keras-named layers on plain torch, so summaries read like the session's `model.summary()`
and the initialisation matches Keras (Glorot-uniform kernels, zero biases): the session's
numbers, such as the raw-pixel MLP's first-epoch loss in the tens, depend on it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import native


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
    """Keras Conv2D (padding 'valid' unless told) with an optional fused ReLU.

    `reads=(side, used)`: when training on side x side images, the layers after this one use
    only the outputs computed from the first `used` rows and columns (valid convolutions and
    pools that drop an odd last row, as in the session CNN: 32 -> 30), so the rest is not
    computed: the same values and gradients (in fp32 up to rounding: the sums run in another
    order), fewer operations. Inference and summaries see the whole image (their shapes stay
    Keras')."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, padding: str | int = 0,
                 activation: str | None = "relu", bias: bool = True, reads: tuple[int, int] | None = None):
        super().__init__(c_in, c_out, kernel_size, padding=padding, bias=bias)
        self.activation = activation
        self.reads = reads
        _glorot(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.reads is not None and x.shape[-2:] == (self.reads[0],) * 2:
            x = x[..., :self.reads[1], :self.reads[1]]
        x = super().forward(x)
        return F.relu(x) if self.activation == "relu" else x


class _PoolScatterGrad(torch.autograd.Function):
    """Max pooling over windows that do not overlap (stride = window), then optionally a ReLU,
    whose backward hands each window's gradient to its maximum with `max_unpool2d` instead of
    max pooling's own backward: the same gradient (each input position belongs to one window,
    so scattering equals accumulating), and faster than the library's pooling backward for the
    course CNN's pools. The ReLU runs in place on the pooled map; its backward is F.relu's own
    op, which keeps channels_last (a masked_fill there returned NCHW, and the copies after it
    slowed the step)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, window: int, relu: bool) -> torch.Tensor:
        out, indices = F.max_pool2d(x, window, return_indices=True)
        if relu:
            out.clamp_min_(0)
        ctx.save_for_backward(indices, out if relu else None)
        ctx.window, ctx.size = window, x.shape[-2:]
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        indices, out = ctx.saved_tensors
        if out is not None:  # the ReLU's gradient: F.relu's own backward (keeps channels_last)
            grad = torch.ops.aten.threshold_backward(grad, out, 0)
        return F.max_unpool2d(grad, indices, ctx.window, output_size=ctx.size), None, None


class _PoolByteIndices(torch.autograd.Function):
    """The same pooling (and ReLU) through the compiled kernel (models/native.py): one byte of
    window position per output instead of an int64 index, and a backward that writes the input's
    gradient in one pass instead of a zero fill and a scatter. The same values and gradients bit
    for bit, with less memory written and read in both passes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, window: int, relu: bool) -> torch.Tensor:
        kernels = native.ops()
        assert kernels is not None
        out, positions = kernels.pool2x2_forward(x, relu)
        ctx.save_for_backward(positions)
        ctx.size = x.shape[-2:]
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (positions,) = ctx.saved_tensors
        kernels = native.ops()
        assert kernels is not None
        return kernels.pool2x2_backward(grad, positions, ctx.size[0], ctx.size[1]), None, None


class MaxPooling2D(nn.MaxPool2d):
    """Keras MaxPooling2D, with an optional ReLU applied after the pooling. Max pooling commutes
    with ReLU (both are monotone), so a Conv2D's ReLU can move behind the pool that follows it
    and run on a map 4x smaller: the same values, and the same gradients but at exact ties, for
    a quarter of the ReLU's work. Training on a CPU takes the compiled kernel where the trainer loaded it
    (_PoolByteIndices), else _PoolScatterGrad (the same values and gradients, both with a faster
    backward than the library's); elsewhere, and without gradients, the library's pooling."""

    native_kernel = "pool2x2"  # what the trainer has models/native.py load before training

    def __init__(self, pool_size: int = 2, activation: str | None = None):
        super().__init__(pool_size)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.requires_grad and torch.is_grad_enabled() and x.ndim == 4:
            relu = self.activation == "relu"
            if (self.kernel_size == 2 and x.dtype in (torch.float32, torch.bfloat16) and native.ops() is not None
                    and x.is_contiguous(memory_format=torch.channels_last)):
                return _PoolByteIndices.apply(x, self.kernel_size, relu)
            return _PoolScatterGrad.apply(x, self.kernel_size, relu)
        x = super().forward(x)
        return F.relu(x) if self.activation == "relu" else x


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


# ---------------------------------------------------------------- 3x3 convolutions (fast nets)

MATMUL_WGRAD_MAX_PIXELS = 64    # feature maps of at most 8x8 ...
MATMUL_WGRAD_MIN_CHANNELS = 64  # ... with at least 64 input channels


class _MatmulWeightGrad(torch.autograd.Function):
    """A 3x3, stride-1, zero-padded convolution whose backward computes the weight gradient as
    one matmul over the padded input's nine shifts (im2col), and the input gradient with the
    library's kernel. On some CPUs (AMX Xeons) oneDNN's bf16 weight-gradient kernel is several
    times slower than its forward kernel on small, wide maps, where one matmul is not. For
    larger maps with few channels the library wins, so only small, wide maps take this path
    (and only when training measured it faster: training/precision.py)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return F.conv2d(x, w, padding=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, w = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(grad, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                     [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            n, c, h, wd = x.shape
            xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # NHWC, zero border
            cols = torch.cat([xp[:, i:i + h, j:j + wd] for i in range(3) for j in range(3)], -1)
            g2 = grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1])
            gw = (g2.T @ cols.reshape(-1, 9 * c)).view(-1, 3, 3, c).permute(0, 3, 1, 2)
        return gx, gw


class Conv3x3(nn.Conv2d):
    """3x3 convolution, stride 1, 'same' padding, no bias. With `matmul_weight_grad` set (see
    `matmul_weight_grads`), bf16 training steps on a CPU take the weight gradient of small,
    wide feature maps as a matmul (_MatmulWeightGrad); the forward pass and its values are the
    same either way."""

    matmul_weight_grad = False

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, kernel_size=3, padding="same", bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.matmul_weight_grad and x.device.type == "cpu" and torch.is_grad_enabled()
                and torch.is_autocast_enabled("cpu") and self.weight.requires_grad
                and x.shape[-2] * x.shape[-1] <= MATMUL_WGRAD_MAX_PIXELS
                and self.in_channels >= MATMUL_WGRAD_MIN_CHANNELS):
            return _MatmulWeightGrad.apply(x.to(torch.bfloat16), self.weight.to(torch.bfloat16))
        return super().forward(x)


def matmul_weight_grads(model: nn.Module, on: bool) -> int:
    """Switch the matmul weight gradient of `model`'s Conv3x3 layers; returns how many it has."""
    layers = [m for m in model.modules() if isinstance(m, Conv3x3)]
    for m in layers:
        m.matmul_weight_grad = on
    return len(layers)
