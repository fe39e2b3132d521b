"""Shared fixtures: small learnable datasets made here, and the real dataset when present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cifar4.data import Dataset, from_arrays
from cifar4.training.callbacks import Callback

REAL = Path(os.environ.get("CIFAR4_DATA", Path(__file__).parents[2] / "shared" / "data" / "cifar4.npz"))


def make_arrays(n: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images whose class shows in a coloured square and its position: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    Y = np.repeat(np.arange(4), n // 4)
    X = rng.integers(0, 80, size=(len(Y), 32, 32, 3), dtype=np.uint8)
    for k in range(4):
        r, c = divmod(k, 2)
        X[k == Y, r * 16:r * 16 + 16, c * 16:c * 16 + 16, k % 3] = 230
    is_test = np.zeros(len(Y), bool)
    is_test[np.arange(len(Y)) % 6 == 5] = True
    return X, Y.astype(np.int64), is_test


def save_tiny(path: Path) -> Path:
    """The tiny learnable images written as a dataset file at `path` (for module-scoped fixtures)."""
    X, Y, t = make_arrays()
    np.savez(path, X=X, Y=Y, is_test=t)
    return path


# Features extract with PyTorch unless a test is marked `onnx_extract`: on a CPU in fp32 the
# default engine exports each new backbone to ONNX first (several seconds), which tests of the
# cache's bookkeeping on fresh random backbones would pay dozens of times. Set for the whole
# session, so that module-scoped fixtures that train fill the cache the tests then read, and
# subprocesses inherit it; the marked tests run the default engine.
os.environ["CIFAR4_EXTRACT"] = "torch"


@pytest.fixture(autouse=True)
def _extract_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("onnx_extract") is not None:
        monkeypatch.setenv("CIFAR4_EXTRACT", "auto")


@pytest.fixture
def tiny() -> Dataset:
    X, Y, t = make_arrays()
    return from_arrays(X, Y, t, source="tiny")


@pytest.fixture
def tiny_npz(tmp_path: Path) -> Path:
    X, Y, t = make_arrays()
    p = tmp_path / "cifar4.npz"
    np.savez(p, X=X, Y=Y, is_test=t)
    return p


@pytest.fixture
def bigger_npz(tmp_path: Path) -> Path:
    """1,200 learnable images in a file: enough for a few seconds of training in a subprocess."""
    X, Y, t = make_arrays(1200, seed=3)
    p = tmp_path / "d.npz"
    np.savez(p, X=X, Y=Y, is_test=t)
    return p


@pytest.fixture(scope="session")
def real_path() -> Path:
    if not REAL.is_file():
        pytest.skip(f"real dataset not found at {REAL}")
    return REAL


@pytest.fixture(scope="session")
def real(real_path: Path) -> Dataset:
    from cifar4.data import load
    return load(real_path)


class Died(Exception):
    """Raised by `DieAt`: stands in for a kill in the middle of training."""


class DieAt(Callback):
    """Fails training at the end of epoch `epoch` (before the callbacks that follow it)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise Died
