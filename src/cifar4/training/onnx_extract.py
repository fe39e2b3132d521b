"""Feature extraction through ONNX Runtime on a CPU that computes in fp32.

A frozen backbone's pass over every image is most of a fresh transfer run's time on a CPU
without bf16 arithmetic (AVX2 only, or AVX-512 without BF16): there PyTorch's eager
EfficientNet-Lite (normalization, bilinear upsampling, folded batch norms, depthwise
convolutions in channels_last) runs up to twice as slow as the same function exported to ONNX
and run by ONNX Runtime's CPU kernels (the transfer benchmarks give the rates per CPU). So where
extraction is fp32 on a CPU and the `export` extra is installed, `features.extract` runs the
model's `cache_embed` as an ONNX graph: the same function (the export is checked against
PyTorch on the first batch), and its own feature-cache key, so that a cache never mixes the two.

The graph takes a batch of [0, 1] images (N, 3, S, S) at the dataset's size and returns what
the cache holds per image, flattened. It is exported once per backbone's weights, resolution,
cut or levels and input size, and kept in <cache>/features/graphs/ (the export takes several
seconds; a later run loads the file). CIFAR4_EXTRACT=torch keeps PyTorch's extraction.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import io as cio
from ..data import work_cache
from ..errors import ConfigError, ModelError

ENV_VAR = "CIFAR4_EXTRACT"
ENGINES = ("auto", "torch", "onnxruntime")
OPSET = 18
AGREEMENT = 1e-3  # largest difference from PyTorch accepted, relative to the features' largest value


def asked() -> str:
    """The engine $CIFAR4_EXTRACT asks for: auto (the default), torch or onnxruntime."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in ENGINES:
        raise ConfigError(f"{ENV_VAR}='{os.environ[ENV_VAR]}' is not an extraction engine; expected one "
                          f"of {', '.join(ENGINES)}")
    return value


def installed() -> bool:
    """Whether the export extra's runtime and exporter are installed (without importing them)."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnxscript", "onnx"))


def _runtime() -> Any | None:
    try:
        import onnxruntime  # noqa: PLC0415 (the export extra)
        import onnxscript  # noqa: F401, PLC0415 (torch.onnx.export's dynamo exporter)
    except ImportError:
        return None
    return onnxruntime


def engine(device: torch.device, precision: str) -> str:
    """The engine that extracts features: "onnxruntime" for fp32 on a CPU where the export
    extra is installed (unless $CIFAR4_EXTRACT=torch), else "torch". bf16 stays with PyTorch:
    oneDNN's bf16 kernels (AMX, AVX512-BF16) are what make extraction fast there, and ONNX
    Runtime's CPU kernels are fp32."""
    want = asked()
    if device.type != "cpu" or precision != "fp32" or want == "torch":
        return "torch"
    if not installed():
        if want == "onnxruntime":
            raise ConfigError(f"{ENV_VAR}=onnxruntime needs the 'export' extra (onnx, onnxruntime, "
                              "onnxscript); install it with pip install 'cifar4[export]'")
        return "torch"
    return "onnxruntime"


def model_device(model: Any) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _CacheEmbed(nn.Module):
    """`model.cache_embed` as a module, for the exporter: the folded backbone it runs is the
    submodule whose weights the graph takes (the model itself is not one: its fold is keyed by
    its weights' storage, which the exporter's traced tensors do not have)."""

    model: Any

    def __init__(self, model: Any):
        super().__init__()
        object.__setattr__(self, "model", model)
        self.fused = model._inference_backbone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.cache_embed(x)


@dataclass
class Session:
    run: Any        # onnxruntime.InferenceSession
    shape: tuple[int, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run.run(None, {"x": x.contiguous().numpy()})[0])


def graph_path(model: Any, shape: tuple[int, ...]) -> Path:
    """Where the exported graph of `model.cache_embed` for inputs of `shape` (3, S, S) is kept."""
    cut, levels = getattr(model, "cut", None), getattr(model, "levels", 1)
    key = hashlib.sha256(f"{model.backbone_digest()}|{model.resolution}|{cut}|{levels}|{shape}|"
                         f"{torch.__version__}|{OPSET}".encode()).hexdigest()[:16]
    return work_cache() / "features" / "graphs" / f"{model.spec.name}-{model.resolution}px-{key}.onnx"


def session(model: Any, x: torch.Tensor) -> Session:
    """An ONNX Runtime session computing `model.cache_embed` for batches shaped like `x`: kept on
    the model (rebuilt when its weights change), loaded from the graph cache or exported there."""
    ort = _runtime()
    if ort is None:
        raise ConfigError(f"extraction through ONNX Runtime needs the 'export' extra; set {ENV_VAR}=torch "
                          "or install it with pip install 'cifar4[export]'")
    shape = tuple(x.shape[1:])
    fused = model._inference_backbone()  # rebuilt (a new object) whenever the weights change
    held = getattr(model, "_onnx_session", None)
    if held is not None and held[0] is fused and held[1].shape == shape:
        return held[1]
    path = graph_path(model, shape)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.log_severity_level = 3  # errors only
    run = None
    if path.is_file():
        try:
            run = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception:  # a damaged or foreign file: exported again below  # noqa: BLE001
            run = None
    if run is None:
        blob = _export(model, x)
        run = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
        _check(model, x, run)
        with contextlib.suppress(OSError):  # a read-only cache: the graph is exported again next time
            path.parent.mkdir(parents=True, exist_ok=True)
            cio.write_with(path, lambda f: None if f.write(blob) else None)
    out = Session(run, shape)
    object.__setattr__(model, "_onnx_session", (fused, out))  # not a submodule: not saved
    return out


def _export(model: Any, x: torch.Tensor) -> bytes:
    """The ONNX graph of `model.cache_embed` (in evaluation mode: the exporter traces the
    backbone's plain layers, whose batch norms must read their statistics, not update them), or a
    ModelError naming the way around it."""
    batch = torch.export.Dim("batch", min=1)
    quiet = logging.getLogger("torch.onnx")
    old, was_training = quiet.level, model.training
    quiet.setLevel(logging.ERROR)
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # deprecations inside torch and onnxscript
            program = torch.onnx.export(_CacheEmbed(model).eval(), (x[:2],), input_names=["x"],
                                        output_names=["y"], dynamic_shapes=({0: batch},),
                                        opset_version=OPSET, dynamo=True, verbose=False, optimize=True)
    except Exception as e:  # the exporter's errors are many kinds, and pages long
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelError(f"{model.spec.name} at {model.resolution} px could not be exported to ONNX for "
                         f"feature extraction ({first}); set {ENV_VAR}=torch to extract with PyTorch") from None
    finally:
        quiet.setLevel(old)
        model.train(was_training)
    assert program is not None
    return program.model_proto.SerializeToString()


def _check(model: Any, x: torch.Tensor, run: Any) -> None:
    """The exported graph against PyTorch on a batch: the same function, or a ModelError
    naming the way around it (a graph that computes something else must not fill a cache)."""
    with torch.no_grad():
        ref = model.cache_embed(x).float().numpy()
    got = run.run(None, {"x": x.contiguous().numpy()})[0]
    scale = float(np.abs(ref).max()) or 1.0
    diff = float(np.abs(got - ref).max()) / scale
    if not diff <= AGREEMENT:
        raise ModelError(f"the ONNX graph of {model.spec.name} at {model.resolution} px differs from "
                          f"PyTorch by {diff:.1e} of its largest feature (expected at most {AGREEMENT:g}); "
                          f"set {ENV_VAR}=torch to extract with PyTorch")
