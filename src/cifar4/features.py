"""Frozen-backbone features, computed once and cached on disk.

With a frozen backbone (transfer mode (b)) every epoch would push the same images through the
same network; instead each image's pooled features are computed once per view (the image, and
its mirror for flip augmentation and flip test-time augmentation) and kept in

    <cache>/features/<backbone>-<resolution>px-<view>-<precision>-<key>.npz

where <cache> is $CIFAR4_CACHE or the user cache folder, and <key> hashes the backbone's
weights, the resolution, the view, the precision and the dataset's sha256: another backbone,
size or dataset never reads stale features. A cache file covers the whole dataset and records
which rows are done, so a run on a subset computes only its rows and later runs fill the rest.
Files are written atomically (one .npz, features and done-mask together), so a killed run or two
runs at once never leave a torn or inconsistent cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from . import io as cio
from .data import Dataset, cache_dir
from .errors import DataError
from .transforms import Normalization

FORMAT = 2
PIXELS = Normalization()  # [0, 1] pixels: what a transfer model takes (it normalizes itself)
VIEWS = ("plain", "flip")


def features_dir() -> Path:
    root = os.environ.get("CIFAR4_CACHE")
    return (Path(root).expanduser() if root else cache_dir()) / "features"


@dataclass
class CacheFile:
    path: Path
    n: int
    dim: int

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """(features float16 (n, dim), done bool (n,)); empty when absent or unusable (a
        damaged cache file is recomputed, never trusted)."""
        empty = np.zeros((self.n, self.dim), np.float16), np.zeros(self.n, bool)
        if not self.path.is_file():
            return empty
        try:
            with np.load(self.path, allow_pickle=False) as z:
                feats, done = z["features"], z["done"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return empty
        if feats.shape != (self.n, self.dim) or feats.dtype != np.float16 or done.shape != (self.n,) \
                or done.dtype != bool:
            return empty
        return feats, done

    def write(self, feats: np.ndarray, done: np.ndarray) -> None:
        cio.write_with(self.path, lambda f: np.savez(f, features=feats, done=done))


def cache_file(model, ds: Dataset, view: str, precision: str, digest: str) -> CacheFile:
    key = hashlib.sha256(f"{FORMAT}|{digest}|{model.resolution}|{view}|{precision}|"
                         f"{ds.checksum()}".encode()).hexdigest()[:16]
    name = f"{model.spec.name}-{model.resolution}px-{view}-{precision}-{key}.npz"
    return CacheFile(features_dir() / name, len(ds), model.num_features)


@torch.no_grad()
def extract(model, X: np.ndarray, flip: bool, device: torch.device, precision: str,
            progress=None, task=None) -> np.ndarray:
    """Pooled backbone features (float16) of uint8 NHWC images, optionally mirrored, computed
    from the same input as `cifar4 evaluate` and `predict` feed the saved model."""
    model.eval()
    cast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
            else contextlib.nullcontext())
    out = np.empty((len(X), model.num_features), np.float16)
    batch = model.max_batch
    for i in range(0, len(X), batch):
        x = PIXELS.apply(torch.from_numpy(X[i:i + batch]).to(device))
        if flip:
            x = x.flip(3)
        with cast:
            f = model.embed(x)
        out[i:i + len(x)] = f.float().cpu().numpy().astype(np.float16)
        if progress is not None:
            progress.advance(task, len(x))
    return out


@dataclass
class FeatureSet:
    """Features of the requested rows, per view, with where they came from."""

    views: dict[str, np.ndarray]   # view -> (len(rows), dim) float32
    seconds: float                 # wall time, extraction and cache I/O
    extracted: int                 # images pushed through the backbone now
    cached: int                    # images read from the cache
    files: list[str]

    @property
    def status(self) -> str:
        return "hit" if not self.extracted else ("miss" if not self.cached else "partial")


def features(model, ds: Dataset, rows: np.ndarray, views: tuple[str, ...], device: torch.device,
             precision: str, show_progress: bool = False, use_cache: bool = True) -> FeatureSet:
    """Features of `ds.X[rows]` for each view, from the cache where present, computing (and
    caching) the rest."""
    t0 = time.perf_counter()
    for v in views:
        if v not in VIEWS:
            raise DataError(f"feature view '{v}' is unknown; expected one of {', '.join(VIEWS)}")
    digest = model.backbone_digest()
    rows = np.asarray(rows)
    out, files, extracted, cached = {}, [], 0, 0
    plan = []
    for v in views:
        cf = cache_file(model, ds, v, precision, digest)
        feats, done = cf.read() if use_cache else (np.zeros((len(ds), model.num_features), np.float16),
                                                   np.zeros(len(ds), bool))
        todo = np.unique(rows[~done[rows]])
        plan.append((v, cf, feats, done, todo))
    total = sum(len(p[4]) for p in plan)
    progress = None
    if show_progress and total:
        progress = Progress(TextColumn("features {task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn(),
                            transient=True, console=Console(file=sys.stderr))
    with progress if progress is not None else contextlib.nullcontext():
        for v, cf, feats, done, todo in plan:
            if len(todo):
                task = progress.add_task(f"{model.spec.name} {model.resolution}px {v}",
                                         total=len(todo)) if progress is not None else None
                feats[todo] = extract(model, ds.X[todo], v == "flip", device, precision, progress, task)
                done[todo] = True
                if use_cache:
                    cf.write(feats, done)
            extracted += len(todo)
            cached += len(np.unique(rows)) - len(todo)
            out[v] = feats[rows].astype(np.float32)
            files.append(str(cf.path))
    return FeatureSet(out, time.perf_counter() - t0, extracted, cached, files)
