"""The Keras-style summary table (`cifar4 summary`, a run's summary.txt): Layer (type) | Output
Shape | Param #, then total / trainable / non-trainable, batch-norm statistics counted as
non-trainable as Keras does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_KERAS_TYPE = {"BatchNormalization1D": "BatchNormalization", "BatchNormalization2D": "BatchNormalization",
               "ReLU": "Activation"}


def _shape(t: Any) -> str:
    if not isinstance(t, torch.Tensor):
        return "?"
    dims = list(t.shape[1:])
    if len(dims) == 3:  # show (H, W, C) as Keras does
        dims = [dims[1], dims[2], dims[0]]
    return "(None, " + ", ".join(str(d) for d in dims) + ")"


@dataclass
class Summary:
    name: str
    rows: list[tuple[str, str, int]]  # (layer (type), output shape, params)
    total: int
    trainable: int
    non_trainable: int

    @staticmethod
    def _size(n: int) -> str:
        b = float(n * 4)
        for unit in ("B", "KB", "MB", "GB"):
            if b < 1024 or unit == "GB":
                return f"{b:.2f} {unit}" if unit != "B" else f"{b:.2f} B"
            b /= 1024
        return ""

    def text(self) -> str:
        w0 = max([len("Layer (type)")] + [len(r[0]) for r in self.rows]) + 2
        w1 = max([len("Output Shape")] + [len(r[1]) for r in self.rows]) + 2
        lines = [f'Model: "{self.name}"', "", f"{'Layer (type)':<{w0}}{'Output Shape':<{w1}}Param #",
                 "-" * (w0 + w1 + 12)]
        lines += [f"{a:<{w0}}{b:<{w1}}{c:,}" for a, b, c in self.rows]
        lines += ["-" * (w0 + w1 + 12),
                  f"Total params: {self.total:,} ({self._size(self.total)})",
                  f"Trainable params: {self.trainable:,} ({self._size(self.trainable)})",
                  f"Non-trainable params: {self.non_trainable:,} ({self._size(self.non_trainable)})"]
        return "\n".join(lines)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, non-trainable); batch-norm running statistics count as non-trainable, as in Keras."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    stats = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    return trainable, frozen + stats


def summary(model: nn.Module, name: str = "model", input_shape: tuple[int, ...] = (3, 32, 32)) -> Summary:
    """Run one dummy image through the model and tabulate each leaf layer, Keras-style."""
    rows: list[tuple[str, str, int]] = [("input_layer (InputLayer)", _shape(torch.zeros(1, *input_shape)), 0)]
    hooks = []

    def hook(mod_name: str):
        def fn(module: nn.Module, inputs: Any, output: Any) -> None:
            own = sum(p.numel() for p in module.parameters(recurse=False))
            own += sum(b.numel() for n, b in module.named_buffers(recurse=False)
                       if n in ("running_mean", "running_var"))
            kind = _KERAS_TYPE.get(type(module).__name__, type(module).__name__)
            rows.append((f"{mod_name} ({kind})", _shape(output), own))
        return fn

    for mod_name, module in model.named_modules():
        if mod_name and not any(True for _ in module.children()):
            hooks.append(module.register_forward_hook(hook(mod_name)))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    trainable, non_trainable = count_params(model)
    return Summary(name, rows, trainable + non_trainable, trainable, non_trainable)
