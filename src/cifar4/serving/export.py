"""ONNX export (`cifar4 export RUN`): a trained run as one .onnx file that takes what a user has,
a batch of uint8 RGB images (N, S, S, 3), S the side of the images it was trained on (32,
or the size a folder was imported at for a transfer model), and returns class probabilities
(N, classes).

Everything between the pixels and the probabilities is inside the graph: the run's input
normalization, a transfer model's upsampling and its backbone's normalization, and (with
`tta`) the test-time views averaged. The batch size is dynamic. The file's metadata carries the
class names, the experiment, the test accuracy and what the input is, so a program that has
only onnxruntime, numpy and Pillow can use it.

Export checks itself before it keeps the file: onnxruntime classifies the run's test split, and
the file is kept only if its top-1 agrees with PyTorch's (the same graph, fp32) on at least
99.9 % of the images.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import data as datamod
from .. import models, record
from ..data.split import split_indices
from ..data.transforms import Normalization, tta_views
from ..errors import ExportError, MissingExtraError, RunError
from ..runs import load_model, read_metrics, resolve_run

MIN_AGREEMENT = 0.999
INPUT, OUTPUT = "images", "probabilities"
OPSET = 18


def _require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise MissingExtraError("ONNX export needs the 'export' extra (onnx, onnxruntime, onnxscript); "
                          "run: pip install 'cifar4[export]'") from None
    return onnx, onnxruntime


class Deployable(nn.Module):
    """uint8 NHWC pixels -> probabilities: normalization, the model, the TTA views, softmax."""

    scale: torch.Tensor
    mean: torch.Tensor
    inv_std: torch.Tensor

    def __init__(self, model: nn.Module, norm: Normalization, tta: int):
        super().__init__()
        self.model, self.tta = model, int(tta)
        self.register_buffer("scale", torch.tensor(norm.scale, dtype=torch.float32))
        self.register_buffer("mean", torch.tensor(norm.mean, dtype=torch.float32))
        self.register_buffer("inv_std", 1 / torch.tensor(norm.std, dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = ((images.float() * self.scale - self.mean) * self.inv_std).permute(0, 3, 1, 2)
        logits = torch.stack([self.model(v) for v in tta_views(x, self.tta)]).mean(0)
        return torch.softmax(logits, dim=1)


@dataclass
class ExportReport:
    """What `cifar4 export` measured before keeping the file."""

    path: str
    images: int            # test images compared
    agreement: float       # top-1 agreement, onnxruntime vs PyTorch
    max_prob_diff: float   # largest absolute probability difference
    onnx_accuracy: float   # onnxruntime's accuracy on the test split
    run_test_accuracy: float
    tta: int
    seconds: float
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export(run: str | Path, out: str | Path | None = None, tta: int | bool | None = None,
           data: str | Path | datamod.Dataset | None = None, batch_size: int = 256) -> ExportReport:
    """Export a finished run to ONNX (default `RUN/model.onnx`), check it on the run's test
    split, and keep it only if it agrees with PyTorch."""
    onnx, ort = _require_onnx()
    t0 = time.perf_counter()
    folder = resolve_run(run)
    loaded = load_model(folder)
    metrics = read_metrics(folder)
    exp = record.read_experiment(folder)
    # tta: the test-time views in the graph, 0-2; default the run's. True / False, the earlier
    # on/off form, still mean: the run's views or at least the mirror / none.
    if isinstance(tta, bool):
        level = max(int(exp.train.tta), 1) if tta else 0
    else:
        level = int(exp.train.tta) if tta is None else int(tta)
    target = Path(out) if out is not None else folder / "model.onnx"
    if target.is_dir():
        raise RunError(f"--out '{target}' is a folder; expected a .onnx file name")
    ds = data if isinstance(data, datamod.Dataset) else datamod.load(data)
    _, idx = split_indices(exp.data, ds)
    ds = loaded.images(ds)  # the size it was trained on, which the ONNX model takes
    X, Y = ds.X[idx["test"]], ds.Y[idx["test"]]
    net = Deployable(models.full_precision(loaded.model), loaded.norm, level).eval()
    tmp = _export_to_temp(net, target, onnx, loaded.input_size)
    try:
        _add_metadata(tmp, onnx, loaded.classes, exp.name, metrics, level, folder, loaded.input_size)
        p_torch = _torch_probs(net, X, batch_size)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        p_onnx = np.concatenate([session.run([OUTPUT], {INPUT: X[i:i + batch_size]})[0]
                                 for i in range(0, len(X), batch_size)])
        agreement = float((p_onnx.argmax(1) == p_torch.argmax(1)).mean())
        diff = float(np.abs(p_onnx - p_torch).max())
        if agreement < MIN_AGREEMENT:
            raise ExportError(f"the ONNX model of '{folder}' agrees with PyTorch on {agreement:.2%} of the "
                              f"{len(X)} test images (largest probability difference {diff:.2e}); expected at "
                              f"least {MIN_AGREEMENT:.1%}, so the file was not kept")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(str(target), len(X), agreement, diff, float((p_onnx.argmax(1) == Y).mean()),
                        float(metrics["test_accuracy"]), level, round(time.perf_counter() - t0, 2),
                        target.stat().st_size)


def _export_to_temp(net: nn.Module, target: Path, onnx: Any, size: int) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    except OSError as e:
        raise RunError(f"cannot write '{target}': {e.strerror or e}") from None
    tmp = Path(name)
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    quiet = logging.getLogger("torch.onnx")
    old_level = quiet.level
    quiet.setLevel(logging.ERROR)  # the exporter's notes on torchvision ops it does not need
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # and on deprecations inside torch
            program = torch.onnx.export(net, (example,), input_names=[INPUT], output_names=[OUTPUT],
                                        dynamic_shapes=({0: batch},), opset_version=OPSET, dynamo=True,
                                        verbose=False, optimize=True)
    finally:
        quiet.setLevel(old_level)
    assert program is not None
    program.save(str(tmp))
    onnx.checker.check_model(str(tmp), full_check=True)
    return tmp


def _add_metadata(path: Path, onnx: Any, classes: tuple[str, ...], experiment: str,
                  metrics: dict[str, Any], tta: int, folder: Path, size: int) -> None:
    model = onnx.load(str(path))
    meta = {
        "classes": json.dumps(list(classes)),
        "experiment": experiment,
        "run": folder.name,
        "test_accuracy": f"{metrics['test_accuracy']:.6f}",
        "val_accuracy": f"{metrics['val_accuracy']:.6f}",
        "tta": str(tta),
        "input": f"images: uint8 (N, {size}, {size}, 3) RGB, any N",
        "output": "probabilities: float32 (N, classes), in the order of 'classes'",
        "producer": "cifar4",
    }
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    model.doc_string = f"cifar4 run {folder.name} ({experiment}): uint8 images -> class probabilities"
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


@torch.no_grad()
def _torch_probs(net: nn.Module, X: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([net(torch.from_numpy(X[i:i + batch_size])).numpy()
                           for i in range(0, len(X), batch_size)])
