"""Train / validation / test splits, as index arrays into a Dataset.

`session` reproduces the practical session exactly: `train_test_split(X, Y, train_size=0.7,
random_state=seed)`, then the rest cut in half with the same seed (16,800 / 3,600 / 3,600 on
CIFAR-4 with seed 42). Splitting `arange(N)` with the same calls yields the same rows.
`stratified` does the same with class-balanced parts; `official` keeps CIFAR-10's own test
images as the test set and draws a stratified 15% validation set from the rest.

A split, once made, is kept in <cache>/splits/ ($CIFAR4_CACHE or the user cache folder), keyed
on what it depends on (kind, seed, the labels, is_test, scikit-learn's version): a later run
reads its rows there and does not import scikit-learn (whose import is a visible share of a
short GPU command). A missing, damaged or
unwritable file only means the split is made again.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import io as cio
from ..errors import ConfigError, DataError, RunError
from . import Dataset, work_cache

if TYPE_CHECKING:
    from ..config import DataConfig

KINDS = ("session", "stratified", "official")


@dataclass(frozen=True)
class Split:
    kind: str
    seed: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def describe(self) -> str:
        s = self.sizes()
        return f"{self.kind} (seed {self.seed}): {s['train']} train / {s['val']} val / {s['test']} test"


def make_split(ds: Dataset, kind: str = "session", seed: int = 42) -> Split:
    n = len(ds)
    if kind not in KINDS:
        raise ConfigError(f"split '{kind}' is unknown; expected one of {', '.join(KINDS)}")
    if n < 7:
        raise DataError(f"{ds.source}: {n} images are too few to split into train/val/test")
    path = _cache_file(ds, kind, seed)
    kept = _read(path, n)
    if kept is not None:
        return Split(kind, seed, *kept)
    sp = _make(ds, kind, seed)
    with contextlib.suppress(RunError):  # an unwritable cache only costs making the split again next time
        cio.write_with(path, lambda f: np.savez(f, train=sp.train, val=sp.val, test=sp.test))
    return sp


def _cache_file(ds: Dataset, kind: str, seed: int) -> Path:
    h = hashlib.sha256(f"{kind}|{seed}|{len(ds)}|{_sklearn_version()}|".encode())
    h.update(np.ascontiguousarray(ds.Y, dtype=np.int64).tobytes())
    if ds.is_test is not None:
        h.update(np.ascontiguousarray(ds.is_test, dtype=bool).tobytes())
    return work_cache() / "splits" / f"{kind}-seed{seed}-{h.hexdigest()[:16]}.npz"


def _sklearn_version() -> str:
    try:
        return metadata.version("scikit-learn")
    except metadata.PackageNotFoundError:
        return "unknown"


def _read(path: Path, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A kept split's (train, val, test) rows, or None where the file is absent or is not one
    (each part integer rows in 0..n-1, together every row at most once)."""
    got = cio.read_npz(path, ("train", "val", "test"))
    if got is None:
        return None
    parts = (got["train"], got["val"], got["test"])
    rows = np.concatenate(parts)
    if any(p.ndim != 1 or p.dtype.kind not in "iu" for p in parts) or \
            (len(rows) and (rows.min() < 0 or rows.max() >= n)) or len(np.unique(rows)) != len(rows):
        return None
    return parts


def _make(ds: Dataset, kind: str, seed: int) -> Split:
    # imported here: scikit-learn's import (most of a second) is paid by a run that makes a split,
    # not by every command (an error, predict, serve)
    from sklearn.model_selection import train_test_split
    n = len(ds)
    idx = np.arange(n)
    if kind == "official":
        if ds.is_test is None or not ds.is_test.any() or ds.is_test.all():
            raise ConfigError(f"split 'official' needs the is_test array of the .npz "
                              f"(with both kinds of rows); {ds.source} has none")
        test = idx[ds.is_test]
        rest = idx[~ds.is_test]
        train, val = train_test_split(rest, test_size=0.15, random_state=seed, stratify=ds.Y[rest])
        return Split(kind, seed, np.sort(train), np.sort(val), test)
    strat = ds.Y if kind == "stratified" else None
    try:
        train, rest = train_test_split(idx, train_size=0.7, random_state=seed, stratify=strat)
        val, test = train_test_split(rest, train_size=0.5, random_state=seed,
                                     stratify=None if strat is None else ds.Y[rest])
    except ValueError as e:
        raise DataError(f"{ds.source}: cannot make a {kind} split ({e})") from None
    return Split(kind, seed, train, val, test)


TRAIN_EVAL_ROWS = 5000  # the train split's final numbers come from this many of its rows (pipeline._eval_rows)


def sample_positions(count: int, n: int, kind: str) -> np.ndarray:
    """Positions of `n` of a split part's `count` rows (all where there are no more): its first
    ones where the split's order is random (session and stratified splits shuffle), evenly spaced
    over it for the official split, which keeps the file's order (split.py sorts its rows): a
    file stored class by class, as CIFAR-10's .npz is, would otherwise give one or two classes
    (CIFAR-10's first 5,000 training rows are nearly all airplanes). The subsets of
    `split_indices` and the train rows training evaluates are taken this way."""
    if count <= n:
        return np.arange(count)
    if kind != "official":
        return np.arange(n)
    return np.linspace(0, count - 1, n).round().astype(np.int64)


def split_indices(cfg: DataConfig, ds: Dataset) -> tuple[Split, dict[str, np.ndarray]]:
    """The experiment's split and the rows each part uses (its `train_subset` and
    `eval_subset` applied): what training, `cifar4 evaluate` and the report all read."""
    sp = make_split(ds, cfg.split, cfg.split_seed)
    idx = {"train": sp.train, "val": sp.val, "test": sp.test}
    if cfg.train_subset:
        idx["train"] = idx["train"][sample_positions(len(idx["train"]), cfg.train_subset, sp.kind)]
    if cfg.eval_subset:
        for part in ("val", "test"):
            idx[part] = idx[part][sample_positions(len(idx[part]), cfg.eval_subset, sp.kind)]
    return sp, idx
