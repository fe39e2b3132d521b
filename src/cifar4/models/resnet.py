"""ResNet-18/34/50/101/152 with torchvision's module names and shapes, so that a torchvision
checkpoint (`resnet50-*.pth`, a plain state dict) loads with strict key and shape matching.
torchvision itself does not install beside this project's CPU torch; this is the architecture
of its `torchvision.models.resnet` (v1.5: a bottleneck's stride sits on its 3x3 convolution),
expecting torchvision's input normalization (ImageNet mean and std on [0, 1] pixels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
          101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3))}


def _conv(c_in: int, c_out: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv(c_in, width, 3, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv(width, width, 3)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = _shortcut(c_in, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv(c_in, width, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv(width, width, 3, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv(width, width * 4, 1)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.downsample = _shortcut(c_in, width * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return F.relu(h + (self.downsample(x) if self.downsample is not None else x))


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))


class ResNet(nn.Module):
    """torchvision's ResNet: conv1 7x7/2 -> bn1 -> relu -> maxpool 3x3/2 -> layer1..4 -> avgpool
    -> fc. `features()` gives the pooled features (512 or 2048) that fc reads."""

    def __init__(self, depth: int = 50, num_classes: int = 1000):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}")
        kind, counts = DEPTHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1: nn.Sequential
        self.layer2: nn.Sequential
        self.layer3: nn.Sequential
        self.layer4: nn.Sequential
        c, widths = 64, list[int]()
        for i, (n, width) in enumerate(zip(counts, (64, 128, 256, 512), strict=True)):
            layers = []
            for j in range(n):
                layers.append(block(c, width, 2 if (j == 0 and i > 0) else 1))
                c = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            widths.insert(0, c)
        self.num_features = c
        self._level_widths = widths
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stages(self) -> list[list[nn.Module]]:
        """Bottom to top: the stem, then each residual block."""
        out: list[list[nn.Module]] = [[self.conv1, self.bn1]]
        for i in range(1, 5):
            out += [[b] for b in getattr(self, f"layer{i}")]
        return out

    def conv_bn_pairs(self) -> list[tuple[nn.Module, str, str]]:
        """(parent, conv, batch norm) triples, for folding the norms into the convolutions."""
        pairs: list[tuple[nn.Module, str, str]] = [(self, "conv1", "bn1")]
        for i in range(1, 5):
            for b in getattr(self, f"layer{i}"):
                pairs += [(b, f"conv{j}", f"bn{j}") for j in (1, 2, 3) if hasattr(b, f"conv{j}")]
                if b.downsample is not None:
                    pairs.append((b.downsample, "0", "1"))
        return pairs

    def level_widths(self) -> list[int]:
        """Widths of the pooled feature levels, top first: layer4's, then layer3's to layer1's."""
        return list(self._level_widths)

    def features(self, x: torch.Tensor, levels: int = 1) -> torch.Tensor:
        """layer4's pooled features, followed by those of the `levels` - 1 layers below it
        (top first)."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        pooled = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            if i > 4 - levels:
                pooled.append(x.mean((2, 3)))
        return torch.cat(pooled[::-1], 1) if len(pooled) > 1 else pooled[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
