"""Where a model looks: Grad-CAM maps (Captum's LayerGradCam) on the last convolution of a
network, a gradient saliency map (Captum's Saliency) for a network without one (an MLP), and
the randomisation that checks a map depends on what was learned (Adebayo et al. 2018,
"Sanity Checks for Saliency Maps").

Every map is for the class the model predicts, upsampled to the image's 32x32 and scaled to
[0, 1] per image, so maps of different models and layers compare on one scale.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import MissingExtraError
from ..models.ensemble import Ensemble


def require_captum() -> Any:
    try:
        import captum.attr
    except ImportError:
        raise MissingExtraError("attention maps need the 'interpret' extra (captum); "
                                "run: pip install 'cifar4[interpret]'") from None
    return captum.attr


def captum_available() -> bool:
    try:
        require_captum()
    except MissingExtraError:
        return False
    return True


def last_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The last convolution a model registers (name, layer): the session CNN's second Conv2D,
    the fast net's group3.conv2, a transfer backbone's last conv (EfficientNet-Lite0's
    _conv_head, a ResNet's last bottleneck conv). Grad-CAM reads it because it is the last
    layer that still keeps positions: after it, pooling or flattening mixes them. None for a
    network without convolutions (an MLP)."""
    found = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            found = (name, m)
    return found


@dataclass
class Maps:
    """Attention maps (N, 32, 32) in [0, 1] for the predicted classes `target`."""

    method: str    # "grad-cam" or "saliency"
    layer: str     # the layer Grad-CAM read ("" for saliency)
    maps: np.ndarray
    target: np.ndarray


@contextlib.contextmanager
def _plain(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode, an ensemble with one view per member in fp32: Grad-CAM hooks a
    layer once per forward pass, and test-time views would run it several times."""
    was = model.training
    model.eval()
    saved = None
    if isinstance(model, Ensemble):
        saved = (list(model.tta), model.member_precision)
        model.tta, model.member_precision = [0] * len(model.tta), False
    try:
        yield model
    finally:
        model.train(was)
        if isinstance(model, Ensemble) and saved is not None:
            model.tta, model.member_precision = saved


def _scaled(a: torch.Tensor) -> np.ndarray:
    """(N, 1|C, h, w) attributions -> (N, 32, 32) in [0, 1], each image on its own scale."""
    a = a.detach().float()
    if a.shape[1] > 1:
        a = a.abs().amax(1, keepdim=True)
    if a.shape[-2:] != (32, 32):
        a = torch.nn.functional.interpolate(a, size=(32, 32), mode="bilinear", align_corners=False)
    a = a[:, 0].clamp_min(0)
    top = a.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return (a / top).numpy()


def attention(model: nn.Module, x: torch.Tensor, layer: nn.Module | str | None = "auto",
              target: torch.Tensor | None = None) -> Maps:
    """Maps for normalized images `x` (N, 3, 32, 32) on the CPU or the model's device:
    Grad-CAM on `layer` ('auto': the last convolution; a module or its name), gradient
    saliency where the model has no convolution or `layer` is None. `target`: the classes to
    explain (default: the predicted ones)."""
    attr = require_captum()
    with _plain(model), torch.enable_grad():
        x = x.float()
        if target is None:
            with torch.no_grad():
                target = model(x).argmax(1)
        name = ""
        if isinstance(layer, str) and layer != "auto":
            name, layer = layer, dict(model.named_modules())[layer]
        elif layer == "auto":
            found = last_conv(model)
            name, layer = found if found else ("", None)
        elif isinstance(layer, nn.Module):
            name = next((n for n, m in model.named_modules() if m is layer), "")
        if layer is None:
            a = attr.Saliency(model).attribute(x.clone().requires_grad_(True), target=target, abs=True)
            return Maps("saliency", "", _scaled(a.cpu()), target.cpu().numpy())
        a = attr.LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
        return Maps("grad-cam", name, _scaled(a.cpu()), target.cpu().numpy())


def member_attention(model: Ensemble, x: torch.Tensor, target: torch.Tensor | None = None) -> list[tuple[str, Maps]]:
    """An ensemble's maps, one per member: Grad-CAM of the ensemble's averaged output (the
    class the ensemble predicts) on each member's last convolution, or the saliency of that
    output for an ensemble whose member has none. `x`: the images as the ensemble takes
    them ([0, 1]-scaled)."""
    out = []
    for i, member in enumerate(model.members):
        found = last_conv(member)
        layer = found[1] if found else None
        maps = attention(model, x, layer, target)
        maps.layer = f"members.{i}.{found[0]}" if found else ""
        out.append((f"member {i + 1} ({type(member).__name__})", maps))
    return out


def randomized(model: nn.Module, top: int | None = None, seed: int = 0) -> nn.Module:
    """A copy of `model` with the weights of its last `top` layers (those with parameters, in
    registration order; None: all of them) drawn afresh by each layer's own initialiser: the
    cascading randomisation of Adebayo et al. A map that explains what the model learned
    changes as the learned weights go; one that only reflects the input or the architecture
    does not."""
    copied = copy.deepcopy(model)
    layers = [m for m in copied.modules()
              if hasattr(m, "reset_parameters") and any(True for _ in m.parameters(recurse=False))]
    chosen = layers if top is None else layers[len(layers) - top:]
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for m in chosen:
            m.reset_parameters()  # type: ignore[operator]
    finally:
        torch.random.set_rng_state(state)
    return copied


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Spearman rank correlation between two sets of maps (N, H, W), image by image. A
    constant map (nothing attended) has no ranks: it counts as 1 beside the same constant map
    and as 0 (uncorrelated) beside any other."""
    from scipy.stats import spearmanr
    values = []
    for u, v in zip(a.reshape(len(a), -1), b.reshape(len(b), -1), strict=True):
        if u.std() == 0 or v.std() == 0:
            values.append(float(np.array_equal(u, v)))
            continue
        r = spearmanr(u, v).statistic
        values.append(0.0 if np.isnan(r) else float(r))
    return float(np.mean(values)) if values else float("nan")
