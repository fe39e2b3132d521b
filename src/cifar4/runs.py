"""Run directories: creating them without clobbering, saving and loading trained models
(safetensors + a JSON description, never pickle), resumable training state, and listing runs.

    runs/<experiment>-<YYYYmmdd-HHMMSS>/
      config.toml     the resolved experiment
      history.csv     one row per epoch: epoch, loss, accuracy, val_loss, val_accuracy, seconds, lr
      metrics.json    accuracies, losses, per-class accuracy, timings, versions, machine, seed
      model.safetensors + model.json   weights; architecture, classes, input normalization
      curves.png  confusion.png  summary.txt
      predictions.npz the final evaluation's logits and dataset rows per split (ensembles read them)
      state/          last complete epoch (weights, optimizer, RNG), for --resume
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from . import io as cio
from . import locks, models, record
from .data import Dataset
from .data.transforms import Normalization
from .device import cpu_features, cpu_name, inference_precision, pick_device
from .errors import CheckpointError, ModelError, RunError
from .models.weights import load_weights_into, read_weights

MODEL_FORMAT = record.MODEL_FORMAT
HISTORY_KEYS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds", "lr")  # history.csv


# ---------------------------------------------------------------- creating

def create_run_dir(root: str | Path, name: str, run_dir: str | Path | None = None,
                   overwrite: bool = False) -> Path:
    """Make a fresh run folder. mkdir is atomic, so two processes never share one."""
    if run_dir is not None:
        path = Path(run_dir)
        if path.exists():
            if not overwrite:
                raise RunError(f"run directory '{path}' already exists; pass --overwrite to "
                               f"replace it or --resume to continue it")
            if not path.is_dir():
                raise RunError(f"run directory '{path}' is a file; expected a folder")
            for p in path.iterdir():  # its lock file stays: the caller holds it
                if p.is_file() and p.name != ".lock" and (p.name in (*RUN_FILES, CHECKPOINT_FILE)
                                                          or p.name.startswith(".")):
                    p.unlink()
            return path
        try:
            path.mkdir(parents=True)
        except OSError as e:
            raise RunError(f"cannot create run directory '{path}': {e.strerror or e}") from None
        return path
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create runs folder '{root}': {e.strerror or e}") from None
    if not os.access(root, os.W_OK):
        raise RunError(f"runs folder '{root}' is not writable")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for k in range(1000):
        path = root / (f"{name}-{stamp}" if k == 0 else f"{name}-{stamp}-{k + 1}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise RunError(f"cannot create run directory '{path}': {e.strerror or e}") from None
    raise RunError(f"cannot find a free run directory name under '{root}'")


def open_run(held: contextlib.ExitStack, root: str | Path, name: str, run_dir: str | Path | None = None,
             overwrite: bool = False) -> Path:
    """A new run folder (create_run_dir), locked for as long as `held` is open. With
    `overwrite`, an existing `run_dir` is locked before it is cleared, so a run another process
    is training is never replaced."""
    if run_dir is not None and overwrite and Path(run_dir).is_dir():
        held.enter_context(locks.run_lock(run_dir))
    folder = create_run_dir(root, name, run_dir, overwrite)
    held.enter_context(locks.run_lock(folder))
    return folder


CHECKPOINT_FILE = "best.safetensors"  # ModelCheckpoint: the best epoch's weights (checkpoint_best)
PREDICTIONS_FILE = "predictions.npz"  # the final evaluation's logits per split, with their rows
RUN_FILES = ("config.toml", "history.csv", "metrics.json", "model.safetensors", "model.json",
             "curves.png", "confusion.png", "summary.txt", PREDICTIONS_FILE)  # every finished run has these


# ---------------------------------------------------------------- what a run records

@dataclass
class Result:
    """What a finished training returns: where it lives and its numbers."""

    run_dir: Path
    metrics: dict[str, Any]
    history: list[dict]
    model: torch.nn.Module


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("cifar4", "torch", "numpy", "scikit-learn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def machine(device: torch.device) -> dict[str, Any]:
    cpu = cpu_name()
    if cpu == "unknown CPU":
        cpu = platform.processor() or platform.machine()
    out = {"platform": platform.platform(), "cpu": cpu, "cpu_features": cpu_features(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


# ---------------------------------------------------------------- models

def save_model(folder: Path, model: nn.Module, name: str, options: dict, classes: tuple[str, ...],
               norm: Normalization, precision: str = "fp32", size: int = models.MODEL_SIZE) -> None:
    """model.safetensors and model.json (`size`: the side of the images the model was trained
    on, which evaluate, predict, serve and export give it)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = record.model_info(name, options, classes, norm.to_dict(), precision, size)
    cio.write_bytes(folder / "model.safetensors", st_save(state))
    record.write_model_info(folder, meta)


@dataclass
class LoadedModel:
    model: nn.Module
    name: str
    options: dict
    classes: tuple[str, ...]
    norm: Normalization
    folder: Path
    precision: str = "fp32"  # what evaluation used at the end of training
    device: torch.device = torch.device("cpu")
    input_size: int = models.MODEL_SIZE  # the side of the images it was trained on (model.json)

    @property
    def inference_precision(self) -> str:
        """The recorded precision where this device runs it natively, else fp32."""
        return inference_precision(self.precision, self.device)

    def images(self, ds: Dataset) -> Dataset:
        """`ds` at the size this model was trained on (Dataset.at_size), or as stored where its
        images are smaller (a transfer model resizes inside)."""
        return ds.at_size(min(ds.size, self.input_size))

    def to(self, device: str | torch.device) -> LoadedModel:
        """Move the model to a device ('auto': the GPU when there is one)."""
        self.device = pick_device(device) if isinstance(device, str) else device
        self.model.to(self.device)
        return self


def load_model(run: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """A finished run's model, in eval mode, on `device` ('auto': the GPU when there is one)."""
    folder = resolve_run(run)
    meta_path = folder / record.MODEL_FILE
    meta = record.read_model_info(folder)
    try:
        classes = tuple(str(c) for c in meta["classes"])
        norm = Normalization.from_dict(meta["normalization"])
        model = models.build(meta["model"], num_classes=int(meta["num_classes"]), **meta["options"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"'{meta_path}' is incomplete or malformed ({type(e).__name__}: {e})") from None
    except ModelError as e:
        raise CheckpointError(f"'{meta_path}' describes no buildable model ({e})") from None
    if len(classes) != int(meta["num_classes"]):
        raise CheckpointError(f"'{meta_path}': {len(classes)} class names for "
                              f"{meta['num_classes']} classes")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise RunError(f"run '{folder}' has no model.safetensors; is the run finished?")
    load_weights_into(model, read_weights(weights), str(weights))
    model.eval()
    precision = meta.get("precision", "fp32")
    if precision not in ("fp32", "bf16"):
        raise CheckpointError(f"'{meta_path}': precision '{precision}'; expected fp32 or bf16")
    shape = meta.get("input_shape", [3, models.MODEL_SIZE, models.MODEL_SIZE])
    if not (isinstance(shape, list) and len(shape) == 3 and shape[0] == 3 and shape[1] == shape[2]
            and isinstance(shape[1], int) and shape[1] >= models.MODEL_SIZE):
        raise CheckpointError(f"'{meta_path}': input_shape {shape}; expected [3, S, S] with S >= 32")
    return LoadedModel(model, meta["model"], meta["options"], classes, norm, folder, precision,
                       input_size=shape[1]).to(device)


# ---------------------------------------------------------------- predictions

def write_predictions(folder: Path, parts: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """part -> (dataset rows, float32 logits) of the final evaluation."""
    arrays: dict[str, Any] = {}
    for k, (rows, logits) in parts.items():
        arrays[f"{k}_rows"] = np.asarray(rows, np.int64)
        arrays[f"{k}_logits"] = np.asarray(logits, np.float32)
    cio.write_with(folder / PREDICTIONS_FILE, lambda f: np.savez(f, **arrays))


def read_predictions(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """What write_predictions wrote; None for a run that has none (made before they existed)."""
    path = Path(folder) / PREDICTIONS_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            parts = {k[:-5] for k in z.files if k.endswith("_rows")}
            out = {k: (z[f"{k}_rows"], z[f"{k}_logits"]) for k in parts}
    except cio.NPZ_ERRORS as e:
        raise RunError(f"'{path}' is unreadable ({e}); expected the run's saved predictions") from None
    for k, (rows, logits) in out.items():
        if rows.ndim != 1 or logits.ndim != 2 or len(rows) != len(logits):
            raise RunError(f"'{path}': {k} holds {len(rows)} rows for {len(logits)} logits")
    return out


# ---------------------------------------------------------------- history and metrics

def write_history(folder: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(HISTORY_KEYS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in HISTORY_KEYS})
    cio.write_text(folder / "history.csv", buf.getvalue())


def read_history(folder: Path) -> list[dict]:
    path = Path(folder) / "history.csv"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return [{k: (int(r[k]) if k == "epoch" else float(r[k])) for k in HISTORY_KEYS} for r in rows]
    except FileNotFoundError:
        raise RunError(f"run '{folder}' has no history.csv") from None
    except (KeyError, ValueError, TypeError, OSError, csv.Error) as e:
        raise RunError(f"'{path}' is malformed ({e})") from None


def read_metrics(folder: str | Path) -> dict:
    """A finished run's metrics.json (record.read_metrics)."""
    return record.read_metrics(folder)


def resolve_run(run: str | Path) -> Path:
    p = Path(run)
    if not p.exists():
        raise RunError(f"run '{run}' does not exist; expected a run directory (see 'cifar4 runs')")
    if not p.is_dir():
        raise RunError(f"run '{run}' is not a folder; expected a run directory")
    return p


def list_runs(root: str | Path = "runs") -> list[dict[str, Any]]:
    """Every run under `root` with its key numbers; unfinished runs are listed as such."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        row: dict[str, Any] = {"run": str(d), "status": "finished"}
        try:
            m = read_metrics(d)
            row.update({k: m.get(k) for k in ("experiment", "model", "epochs", "params",
                                              "train_accuracy", "val_accuracy", "test_accuracy",
                                              "train_seconds")})
        except RunError:
            if locks.is_held(d / locks.LOCK_NAME):
                row["status"] = "training"
            else:
                row["status"] = "unfinished" if (d / "state" / "last.json").exists() else "incomplete"
        out.append(row)
    return out


# ---------------------------------------------------------------- training state (resume)

def _pack(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """Split a nested structure into JSON and a flat dict of tensors (for safetensors)."""
    if isinstance(obj, torch.Tensor):
        key = path or "t"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError("dict keys must be str or int")
        return {"__dict__": [[k, _pack(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_pack(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot save {type(obj).__name__} in training state")


def _unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _unpack(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_unpack(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def snapshot(state: Any) -> Any:
    """A copy of a nested state whose tensors no longer change as training goes on."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: snapshot(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot(v) for v in state)
    return state


def save_state(folder: Path, state: dict[str, Any], epoch: int, extra: dict[str, Any]) -> None:
    """The last complete epoch: tensors as safetensors, the rest as JSON; the JSON is written
    last and names the tensor file, so a reader never pairs a new JSON with an old tensor file."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _pack(state, tensors, "s")
    sdir = folder / "state"
    tensor_name = f"epoch-{epoch}.safetensors"
    cio.write_bytes(sdir / tensor_name, st_save(tensors))
    cio.write_json(sdir / "last.json", {"epoch": epoch, "tensors": tensor_name,
                                        "state": skeleton, **extra})
    for old in sdir.glob("epoch-*.safetensors"):
        if old.name != tensor_name:
            old.unlink(missing_ok=True)


def load_state(folder: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    sdir = Path(folder) / "state"
    meta_path = sdir / "last.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        tensors = st_load((sdir / meta["tensors"]).read_bytes())
    except (OSError, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError) as e:
        raise CheckpointError(f"training state in '{sdir}' is unreadable ({str(e)[:160]}); "
                              f"start the run again") from None
    return _unpack(meta.pop("state"), tensors), meta
