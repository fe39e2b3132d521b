"""Frozen-backbone features, computed once and cached on disk.

What is cached per image is what the model trains on (`cache_embed`): a frozen backbone's
pooled features, or, where its top blocks are tuned (`tune_blocks`), the activation map that
enters them, flattened (192 x 7 x 7 at 224 px, in fp16: 18.8 KB an image).

With a frozen backbone (transfer mode (b)) every epoch would push the same images through the
same network; instead each image's pooled features are computed once per view (the image, and
its mirror for flip augmentation and flip test-time augmentation) and kept in

    <cache>/features/<backbone>-<resolution>px-[from<size>px-][below<block>-]<view>-<precision>-<key>.npz

where <cache> is $CIFAR4_CACHE or the user cache folder, and <key> hashes the backbone's
weights, the resolution, the view, the precision, the dataset's sha256 and the size of its
images where not 32 px (an imported dataset stored larger), and for activation maps the block
they enter: another backbone, size or dataset never reads stale features. A cache file covers
the whole dataset and records which rows are done, so a run on a subset computes only its rows
and later runs fill the rest.
Files are written atomically (one .npz, features and done-mask together), so a reader never sees
a torn or inconsistent file; rows are added under the file's lock (locks.py), so two processes
filling one file keep each other's rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from .. import io as cio
from .. import locks
from ..data import Dataset, work_cache
from ..data.transforms import Augment, BatchAugment, FeatureInput, Normalization, ViewSample
from ..device import autocast, bf16_is_fast, synchronize, to_device
from ..errors import DataError
from ..models.base import FrozenBackbone, inference_batch
from ..models.registry import MODEL_SIZE
from . import onnx_extract
from .evaluate import predict_logits
from .precision import arithmetic

if TYPE_CHECKING:
    from ..config import Experiment

FORMAT = 2
PIXELS = Normalization()  # [0, 1] pixels: what a transfer model takes (it normalizes itself)
VIEWS = ("plain", "flip")


def features_dir() -> Path:
    return work_cache() / "features"


@dataclass
class CacheFile:
    path: Path
    n: int
    dim: int

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """(features float16 (n, dim), done bool (n,)); empty when absent or unusable (a
        damaged cache file is recomputed, never trusted)."""
        got = self._load(("features", "done"))
        if got is None or got["features"].shape != (self.n, self.dim) or got["features"].dtype != np.float16:
            return np.zeros((self.n, self.dim), np.float16), np.zeros(self.n, bool)
        return got["features"], got["done"]

    def done(self) -> np.ndarray:
        """Which rows the file holds (bool (n,)), reading that array alone: the features are
        tens of MB a view, and reading them only to count rows would cost far longer."""
        got = self._load(("done",))
        return np.zeros(self.n, bool) if got is None else got["done"]

    def _load(self, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
        """The named arrays, with a usable done mask, or None (absent, damaged, another shape)."""
        got = cio.read_npz(self.path, keys)
        if got is None:
            return None
        done = got["done"]
        return got if done.shape == (self.n,) and done.dtype == bool else None

    def write(self, feats: np.ndarray, done: np.ndarray) -> None:
        cio.write_with(self.path, lambda f: np.savez(f, features=feats, done=done))

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")


def cache_file(model, ds: Dataset, view: str, precision: str, digest: str) -> CacheFile:
    """The cache file of a backbone, view and precision for `ds` at its images' size: a dataset
    imported larger than 32 px gives a model its images at another size (Dataset.at_size, same
    checksum), so the size is part of the key and the name (absent at 32 px, CIFAR's files).
    So are the feature levels a model pools (absent for the top level alone, the older files),
    or, for activation maps, the block they enter (levels are then pooled above the cache)."""
    sized = "" if ds.size == MODEL_SIZE else f"|{ds.size}"
    cut = getattr(model, "cut", None)
    levels = 1 if cut is not None else getattr(model, "levels", 1)
    leveled = "" if levels == 1 else f"|levels{levels}"
    below = "" if cut is None else f"|below{cut}"
    # features from ONNX Runtime (onnx_extract) agree with PyTorch's to about 1e-5, not bit for
    # bit: their own key, so that a run reads what its own engine computes
    engine = onnx_extract.engine(onnx_extract.model_device(model), precision)
    ran = "" if engine == "torch" else f"|{engine}"
    key = hashlib.sha256(f"{FORMAT}|{digest}|{model.resolution}|{view}|{precision}|"
                         f"{ds.checksum()}{sized}{leveled}{below}{ran}".encode()).hexdigest()[:16]
    source = "" if ds.size == MODEL_SIZE else f"from{ds.size}px-"
    depth = ("" if levels == 1 else f"{levels}levels-") + ("" if cut is None else f"below{cut}-")
    name = f"{model.spec.name}-{model.resolution}px-{source}{depth}{view}-{precision}-{key}.npz"
    return CacheFile(features_dir() / name, len(ds), cache_dim(model))


def cache_dim(model) -> int:
    """Numbers the cache holds per image (the product of the model's `cache_shape`)."""
    return math.prod(model.cache_shape)


@torch.no_grad()
def extract(model, X: np.ndarray, flip: bool, device: torch.device, precision: str,
            progress=None, task=None, pad: bool | None = None) -> np.ndarray:
    """What the cache holds (float16, `cache_embed`: pooled backbone features or activation
    maps, flattened) of uint8 NHWC images, optionally mirrored, computed
    from the same input as `cifar4 evaluate` and `predict` feed the saved model. The images go
    to the device in one copy and the features come back in one (on a GPU no batch waits for
    the host; rounded to float16 there, as numpy rounds them). `pad` (default: on a GPU) fills
    a last, smaller batch up to a whole one: a GPU chooses and loads its kernels once per batch
    shape, so an unpadded last batch would load a second set of kernels for one batch)."""
    model.eval()
    cast = autocast(device, precision)
    ort = onnx_extract.engine(device, precision) == "onnxruntime"
    out = torch.empty((len(X), cache_dim(model)), dtype=torch.float16, device=device)
    batch = inference_batch(model, CHUNK, device)
    pad = device.type != "cpu" if pad is None else pad
    images = torch.from_numpy(X).to(device)
    for i in range(0, len(X), batch):
        part = images[i:i + batch]
        n = len(part)
        if pad and n < batch:
            part = torch.cat([part, part.new_zeros((batch - n, *part.shape[1:]))])
        x = PIXELS.apply(part)
        if flip:
            x = x.flip(3)
        if ort:
            f = onnx_extract.session(model, x)(x)
        else:
            with cast:
                f = model.cache_embed(x)
        out[i:i + n] = f[:n].float()
        if progress is not None:
            progress.advance(task, n)
    return out.cpu().numpy()


def pending(model, ds: Dataset, rows: np.ndarray, views: tuple[str, ...], precision: str) -> int:
    """Image views of `rows` that the cache does not hold yet: what `features` would extract
    now (a time limit counts them before choosing what to train)."""
    digest, rows = model.backbone_digest(), np.unique(rows)
    return sum(int((~cache_file(model, ds, v, precision, digest).done()[rows]).sum()) for v in views)


EXTRACTION_PROBE = 4       # inference batches timed at least for the extraction rate (after one untimed)
PROBE_SECONDS = 1.0        # ... and until this long has passed,
PROBE_MAX_IMAGES = 2048    # ... but no more images than this (a GPU's 4 batches)


def extraction_seconds(model, X: np.ndarray, device: torch.device, precision: str) -> float:
    """Seconds per image view of `extract` on this machine, from the first images of `X`: one
    batch to warm up, then batches timed one by one (at least EXTRACTION_PROBE, and for at
    least PROBE_SECONDS, up to PROBE_MAX_IMAGES: a CPU's batches are 8-25 images; a GPU's 512),
    the median batch's time per image. A few batches timed as one can read one slow moment as
    the rate, about twice the true time per view, and send a fresh `fast-long` to its lighter
    fallback for nothing."""
    batch = inference_batch(model, CHUNK, device)
    warm = min(batch, max(1, len(X) // (1 + EXTRACTION_PROBE)))  # (fewer images than that many batches)
    extract(model, X[:warm], False, device, precision)
    times: list[float] = []
    started = time.perf_counter()
    for i in range(warm, len(X), batch):
        x = X[i:i + batch]
        if len(x) < batch and times:  # a last, smaller batch would not time like the others
            break
        synchronize(device)
        t = time.perf_counter()
        extract(model, x, False, device, precision)
        synchronize(device)
        times.append((time.perf_counter() - t) / len(x))
        if (len(times) + 1) * batch > PROBE_MAX_IMAGES or \
                (len(times) >= EXTRACTION_PROBE and time.perf_counter() - started >= PROBE_SECONDS):
            break
    return float(np.median(times)) if times else 0.0


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
    caching) the rest.

    Rows missing from a cache file are computed under that file's lock, after reading the file
    again: what another process added meanwhile is kept and not recomputed, and the rows
    computed here are merged in (saved every SAVE_EVERY seconds, so a killed extraction keeps
    most of its work). A file already holding every row is read without waiting for anyone."""
    t0 = time.perf_counter()
    for v in views:
        if v not in VIEWS:
            raise DataError(f"feature view '{v}' is unknown; expected one of {', '.join(VIEWS)}")
    digest = model.backbone_digest()
    rows = np.asarray(rows)
    wanted = len(np.unique(rows))
    out, files, extracted = {}, [], 0
    console = Console(file=sys.stderr, soft_wrap=True)
    for v in views:
        cf = cache_file(model, ds, v, precision, digest)
        if not use_cache:
            feats = np.zeros((len(ds), cache_dim(model)), np.float16)
            todo = np.unique(rows)
            feats[todo] = _extract_rows(model, ds, todo, v, device, precision, show_progress)
            extracted += len(todo)
        else:
            feats, done = cf.read()
            if not done[rows].all():
                with locks.hold(cf.lock_path, f"feature cache file '{cf.path.name}'", wait=True,
                                notify=lambda msg: console.print(msg, highlight=False, markup=False)):
                    feats, done = cf.read()  # with what other processes added meanwhile
                    todo = np.unique(rows[~done[rows]])
                    _extract_into(cf, feats, done, todo, model, ds, v, device, precision,
                                  show_progress)
                    extracted += len(todo)
        out[v] = feats[rows].astype(np.float32)
        files.append(str(cf.path))
    cached = wanted * len(views) - extracted
    return FeatureSet(out, time.perf_counter() - t0, extracted, cached, files)


SAVE_EVERY = 60.0  # seconds of extraction between two merged saves of a cache file
CHUNK = 512        # images per extraction step between two looks at the clock (a GPU's batch)
GPU_CHUNK = 8192   # ... on a GPU (under a second there): one copy each way per 16 batches


def _progress(model, view: str, total: int, show: bool) -> tuple[Progress | None, Any]:
    if not show or not total:
        return None, None
    bar = Progress(TextColumn("features {task.description}"), BarColumn(),
                   TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn(),
                   transient=True, console=Console(file=sys.stderr))
    return bar, bar.add_task(f"{model.spec.name} {model.resolution}px {view}", total=total)


def _extract_rows(model, ds: Dataset, todo: np.ndarray, view: str, device: torch.device,
                  precision: str, show: bool) -> np.ndarray:
    bar, task = _progress(model, view, len(todo), show)
    with bar if bar is not None else contextlib.nullcontext():
        return extract(model, ds.X[todo], view == "flip", device, precision, bar, task)


def _extract_into(cf: CacheFile, feats: np.ndarray, done: np.ndarray, todo: np.ndarray, model,
                  ds: Dataset, view: str, device: torch.device, precision: str, show: bool) -> None:
    """Compute `todo` into feats/done, saving the file every SAVE_EVERY seconds and at the end
    (the caller holds the file's lock)."""
    if not len(todo):
        return
    bar, task = _progress(model, view, len(todo), show)
    last_save = time.perf_counter()
    chunk = CHUNK if device.type == "cpu" else GPU_CHUNK
    with bar if bar is not None else contextlib.nullcontext():
        for i in range(0, len(todo), chunk):
            part = todo[i:i + chunk]
            feats[part] = extract(model, ds.X[part], view == "flip", device, precision, bar, task)
            done[part] = True
            if time.perf_counter() - last_save > SAVE_EVERY and i + chunk < len(todo):
                cf.write(feats, done)
                last_save = time.perf_counter()
    cf.write(feats, done)


def feature_precision(asked: str, device: torch.device) -> str:
    """Precision of feature extraction (inference through the backbone): bf16 where the
    hardware runs it natively (several times fp32's images per second there), unless asked."""
    if asked == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return arithmetic(asked)


def feature_views(exp: Experiment) -> tuple[str, ...]:
    """The views a frozen-backbone run needs: the image, and its mirror when the experiment
    flips or asks for flip test-time augmentation."""
    return ("plain", "flip") if exp.augment.flip or exp.train.tta >= 1 else ("plain",)


SPLITS = ("train", "val", "test")


def cache_requests(exp: Experiment, model) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """The splits and views a run reads from the cache. A frozen backbone's features: every
    split in `feature_views`. Activation maps below tuned blocks: the image of every split, and
    the mirror image of validation and test under flip test-time augmentation, as `evaluate`
    and `predict` make it; training mirrors the cached map instead (a second extraction of the
    training images would double the extraction for a view the map's mirror nearly is)."""
    if getattr(model, "cut", None) is None:
        return [(SPLITS, feature_views(exp))]
    return [(SPLITS, ("plain",))] + ([(("val", "test"), ("flip",))] if exp.train.tta >= 1 else [])


class CachedFeatures:
    """Transfer modes (b) and (d): the frozen backbone's features of every split, or the
    activation maps entering its tuned top blocks, from the feature cache (computed there once),
    as inputs for training and evaluating what trains on them (the model's `on_cache`). Views:
    the image, plus, for features, its mirror when the experiment flips (training picks one view
    per row and step) or asks for flip test-time augmentation (logits averaged over both); for
    maps, the mirror of validation and test under flip test-time augmentation, while training
    mirrors the maps (cache_requests)."""

    def __init__(self, exp: Experiment, model: torch.nn.Module, ds: Dataset,
                 idx: dict[str, np.ndarray], device: torch.device, progress: bool,
                 precision: str | None = None):
        # the backbone's precision: a saved run's recorded one, or the rule for extraction
        self.precision = precision or feature_precision(exp.train.precision, device)
        self.engine = onnx_extract.engine(device, self.precision)
        maps = getattr(model, "cut", None) is not None
        self.flip_train = exp.augment.flip and not maps  # (maps: mirrored by the augmentation)
        shape: tuple[int, ...] = cast(FrozenBackbone, model).cache_shape
        to_device(model, device)
        requests = cache_requests(exp, model)
        sets = [features(model, ds, np.concatenate([idx[k] for k in parts]), views, device, self.precision,
                         progress) for parts, views in requests]
        model.cpu()
        self.fs = FeatureSet({}, sum(f.seconds for f in sets), sum(f.extracted for f in sets),
                             sum(f.cached for f in sets), [name for f in sets for name in f.files])
        self.device = device
        self.split: dict[str, dict[str, torch.Tensor]] = {k: {} for k in SPLITS}
        for (parts, _), fset in zip(requests, sets, strict=True):
            for v, a in fset.views.items():
                self.fs.views[v] = a
                start = 0
                for k in parts:
                    n = len(idx[k])
                    self.split[k][v] = torch.from_numpy(a[start:start + n]).view(n, *shape)
                    start += n
        self.augment: BatchAugment = ViewSample() if self.flip_train else Augment(flip=exp.augment.flip and maps)

    def train_inputs(self) -> dict[str, torch.Tensor]:
        out = {k: self.split[k]["plain"] for k in ("train", "val", "test")}
        if self.flip_train:
            out["train"] = torch.stack([self.split["train"]["plain"], self.split["train"]["flip"]], 1)
        return out

    def logits(self, head: torch.nn.Module, split: str, tta: int, precision: str,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """The head's logits for a split (or the given positions in it), averaged over the
        mirror too when tta >= 1."""
        views = ["plain", "flip"] if tta >= 1 else ["plain"]
        feats = {v: self.split[split][v] if rows is None else self.split[split][v][rows] for v in views}
        return torch.stack([predict_logits(head, feats[v], FeatureInput(), device=self.device,
                                           precision=precision) for v in views]).mean(0)

    def info(self) -> dict[str, Any]:
        fs = self.fs
        return {"views": list(fs.views), "precision": self.precision, "engine": self.engine, "cache": fs.status,
                "extracted": fs.extracted, "cached": fs.cached, "seconds": round(fs.seconds, 3),
                "files": fs.files}
