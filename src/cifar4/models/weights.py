"""Reading weight files and loading them strictly: safetensors, or a third-party .pth read with
weights_only=True (tensors only, no pickled code); every key and shape must match the
architecture, and a mismatch is a one-line CheckpointError naming the file."""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from torch import nn

from ..errors import CheckpointError

# What torch.load(weights_only=True) raises on damaged or hostile bytes (measured by fuzzing
# truncated, bit-flipped and random files): a bug elsewhere still shows its traceback.
_TORCH_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, UnicodeDecodeError, IndexError,
                      KeyError, ValueError, TypeError, AttributeError, OSError, zipfile.BadZipFile,
                      struct.error, OverflowError)

def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a third-party .pth read with weights_only=True (no pickled code)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read weights '{path}': {e.strerror or e}") from None
    if path.suffix in (".pth", ".pt"):
        # torch warns before it fails on some damaged files ("Detected pickle protocol 215 in the
        # checkpoint..."): the one-line error says it all, so its warnings show only on success
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            try:
                obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except _TORCH_LOAD_ERRORS as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CheckpointError(f"weights '{path}' are not a plain state dict loadable with "
                                      f"weights_only=True ({first[:200]})") from None
        for w in said:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"weights '{path}' hold a {type(obj).__name__}; expected a "
                                  f"state dict of tensors")
        return obj
    try:
        return st_load(data)
    except SafetensorError as e:
        raise CheckpointError(f"weights '{path}' are not a readable safetensors file "
                              f"(corrupt or truncated: {str(e)[:160]})") from None


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strict key and shape matching, with a one-line account of any mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        raise CheckpointError(f"weights '{where}' do not fit the architecture: "
                              f"{len(missing)} missing key(s) (e.g. {missing[:2]}), "
                              f"{len(extra)} unexpected (e.g. {extra[:2]})")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"weights '{where}': {k} has shape {tuple(state[k].shape)}; "
                                  f"the architecture expects {tuple(v.shape)}")
    model.load_state_dict(state, strict=True)
