"""The dataset: find it, load it without ever unpickling, check every array, describe it.

The default is CIFAR-4: 24,000 RGB images, 32x32 uint8, of four CIFAR-10 classes (bird, cat,
frog, horse). Any other set of classes works the same way: a dataset carries its class names.
Images are square, 32 px or more (`cifar4 data import --size` keeps your photos larger); each
model takes its own size from the dataset (`Dataset.at_size`).
Two file layouts are read: the practical session's pair `CIFAR4_X.npy` (N,32,32,3) uint8 +
`CIFAR4_Y.npy` (N,) integer labels (CIFAR-4's classes), and one `.npz` with keys X, Y and
optionally is_test, classes (the names, in label order) and source (what `cifar4 data fetch`
and `cifar4 data import` write; a file without `classes` holds CIFAR-4). Building datasets from
CIFAR-10 lives in `fetch.py`, from a folder of images in `folder.py`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from platformdirs import user_cache_dir

from ..errors import DataError

CLASSES: tuple[str, ...] = ("bird", "cat", "frog", "horse")
NPZ_NAME = "cifar4.npz"
NPY_NAMES = ("CIFAR4_X.npy", "CIFAR4_Y.npy")
ENV_VAR = "CIFAR4_DATA"
IMAGE_SHAPE = (32, 32, 3)
MIN_SIZE = IMAGE_SHAPE[0]  # the smallest side a dataset's images have (CIFAR's)


def cache_dir() -> Path:
    """The per-user folder where `cifar4 data fetch` puts the dataset by default."""
    return Path(user_cache_dir("cifar4", appauthor=False))


def work_cache() -> Path:
    """Where cifar4 keeps what it computes once per machine and reuses (frozen-backbone
    features, precision choices, splits): $CIFAR4_CACHE, else the per-user cache folder."""
    root = os.environ.get("CIFAR4_CACHE")
    return Path(root).expanduser() if root else cache_dir()


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images X (N,S,S,3) uint8 RGB (S >= 32: CIFAR's 32, or the size a folder was imported
    at), labels Y (N,) int64 in 0..len(classes)-1, optional is_test (N,) bool, and the class
    names."""

    X: np.ndarray
    Y: np.ndarray
    is_test: np.ndarray | None = None
    source: str = "<memory>"
    classes: tuple[str, ...] = CLASSES
    _sha: list = field(default_factory=list, repr=False)
    _sized: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        validate_classes(self.classes, self.source)
        validate_arrays(self.X, self.Y, self.is_test, name=self.source, classes=self.classes)
        object.__setattr__(self, "Y", as_labels(self.Y, len(self.classes), self.source))

    def __len__(self) -> int:
        return len(self.Y)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def is_cifar4(self) -> bool:
        """The session's dataset: its four classes in its order (results comparable with it)."""
        return tuple(self.classes) == CLASSES

    @property
    def size(self) -> int:
        """The side of its images in pixels (32 for CIFAR)."""
        return int(self.X.shape[1])

    def at_size(self, size: int) -> Dataset:
        """The same images at `size` px (Lanczos, as on import), for a model that takes that
        size: the dataset itself when its images already are. A model never resizes the 32 px
        models' inputs batch by batch: the dataset is resized once here, kept for the next call,
        and split, batches and model see it as any 32 px dataset. Only downscaling: a model
        given more pixels than stored would see no more detail. The copy names the same data
        (its checksum is this dataset's): runs and caches record the file, and the size apart."""
        size = int(size)
        if size == self.size:
            return self
        if size > self.size:
            raise DataError(f"{self.source}: images are {self.size} px; cannot give {size} px images "
                            f"(only smaller)")
        if size not in self._sized:
            from PIL import Image  # the dataset layer needs Pillow only to resize

            from .images import resize
            X = np.stack([np.asarray(resize(Image.fromarray(x), size), dtype=np.uint8) for x in self.X])
            self._sized[size] = Dataset(X, self.Y, self.is_test, self.source, self.classes,
                                        [self.checksum()])
        return self._sized[size]

    def checksum(self) -> str:
        """sha256 of the pixels and labels: names this exact data in runs and caches."""
        if not self._sha:
            h = hashlib.sha256(np.ascontiguousarray(self.X).tobytes())
            h.update(np.ascontiguousarray(self.Y, dtype=np.int64).tobytes())
            self._sha.append(h.hexdigest())
        return self._sha[0]


# ---------------------------------------------------------------- locate

def _dataset_in_dir(folder: Path) -> Path | None:
    if (folder / NPZ_NAME).is_file():
        return folder / NPZ_NAME
    if all((folder / n).is_file() for n in NPY_NAMES):
        return folder / NPY_NAMES[0]
    return None


def candidates() -> list[tuple[str, Path]]:
    """Where the dataset is looked for, in order (after an explicit --data)."""
    out = []
    if os.environ.get(ENV_VAR):
        out.append((f"${ENV_VAR}", Path(os.environ[ENV_VAR])))
    out.append(("./data", Path("data")))
    out.append(("cache", cache_dir()))
    return out


def locate(path: str | os.PathLike | None = None) -> Path:
    """The file to load: `path` (a file or a folder holding one), else $CIFAR4_DATA, else
    ./data/, else the user cache folder."""
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise DataError(f"data path '{p}' does not exist; expected a {NPZ_NAME} or "
                            f"{NPY_NAMES[0]} file, or a folder holding one")
        if p.is_dir():
            found = _dataset_in_dir(p)
            if found is None:
                raise DataError(f"data folder '{p}' holds no {NPZ_NAME} nor the pair "
                                f"{NPY_NAMES[0]} + {NPY_NAMES[1]}")
            return found
        return p
    for label, p in candidates():
        if label.startswith("$"):
            # An explicit environment setting that is wrong is an error, not a fallthrough.
            return locate(p)
        if p.is_dir() and (found := _dataset_in_dir(p)) is not None:
            return found
    looked = ", ".join(str(p) for _, p in candidates())
    raise DataError(f"no CIFAR-4 dataset found (looked in {looked}); run 'cifar4 data fetch' "
                    f"or pass --data PATH")


# ---------------------------------------------------------------- safe reading

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(6)
    except IsADirectoryError:
        raise DataError(f"data file '{path}' is a folder; expected a .npy or .npz file") from None
    except OSError as e:
        raise DataError(f"cannot read data file '{path}': {e.strerror or e}") from None


def read_npy(path: str | os.PathLike) -> np.ndarray:
    """Load one .npy array, never unpickling; any damage becomes a DataError naming the file."""
    path = Path(path)
    head = _magic(path)
    if not head:
        raise DataError(f"data file '{path}' is empty (0 bytes); expected a .npy array")
    if head != _NPY_MAGIC:
        raise DataError(f"data file '{path}' is not a .npy file (bad magic bytes {head[:6]!r})")
    try:
        with open(path, "rb") as f:
            return np.load(f, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise DataError(f"data file '{path}' holds an object/pickled array; cifar4 never "
                            f"unpickles data: save a plain uint8 array with np.save") from None
        raise DataError(f"data file '{path}' is truncated or corrupt ({e})") from None
    except Exception as e:  # a damaged header reaches numpy's parser: EOFError, TokenError, ...
        raise DataError(f"data file '{path}' is truncated or corrupt ({type(e).__name__}: {e})") from None


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load every array of a .npz, never unpickling."""
    path = Path(path)
    head = _magic(path)
    if not head:
        raise DataError(f"data file '{path}' is empty (0 bytes); expected a .npz archive")
    if head[:4] != _ZIP_MAGIC:
        raise DataError(f"data file '{path}' is not a .npz archive (bad magic bytes {head!r})")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise DataError(f"data file '{path}' holds an object/pickled array; cifar4 never "
                            f"unpickles data: save plain arrays with np.savez") from None
        raise DataError(f"data file '{path}' is truncated or corrupt ({e})") from None
    except Exception as e:  # BadZipFile, EOFError, zlib.error, a damaged member's header, ...
        raise DataError(f"data file '{path}' is truncated or corrupt ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------- validation

def _fmt_shape(shape: tuple) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def validate_images(X: np.ndarray, name: str = "X") -> None:
    if not isinstance(X, np.ndarray):
        raise DataError(f"{name}: expected a numpy array of images, got {type(X).__name__}")
    if X.dtype == object:
        raise DataError(f"{name}: object array; expected uint8 pixels")
    if X.dtype.kind == "f" and X.size and not np.isfinite(X).all():
        raise DataError(f"{name}: contains NaN or inf; expected uint8 pixels 0-255")
    if X.ndim == 4 and X.shape[1] == 3 and X.shape[2] == X.shape[3] >= MIN_SIZE:
        raise DataError(f"{name}: shape {_fmt_shape(X.shape)} looks channels-first; expected "
                        f"(N, 32, 32, 3) channels-last (np.transpose(X, (0, 2, 3, 1)))")
    if X.ndim != 4 or X.shape[3] != 3 or X.shape[1] != X.shape[2] or X.shape[1] < MIN_SIZE:
        raise DataError(f"{name}: shape {_fmt_shape(X.shape)}; expected (N, 32, 32, 3) RGB images "
                        f"(or square ones larger than 32 px, (N, S, S, 3))")
    if X.shape[0] == 0:
        raise DataError(f"{name}: holds no images (N = 0)")
    if X.dtype != np.uint8:
        hint = " (scaled floats? use (X * 255).round().astype(np.uint8))" if X.dtype.kind == "f" else ""
        raise DataError(f"{name}: dtype {X.dtype}; expected uint8 pixels 0-255{hint}")


def validate_classes(classes: tuple[str, ...], name: str = "dataset") -> None:
    if len(classes) < 2:
        raise DataError(f"{name}: {len(classes)} class name(s) {list(classes)}; expected at least 2 classes")
    if len(set(classes)) != len(classes) or not all(isinstance(c, str) and c.strip() for c in classes):
        raise DataError(f"{name}: class names {list(classes)}; expected distinct, non-empty names")


def as_labels(Y: np.ndarray, num_classes: int, name: str = "Y",
              classes: tuple[str, ...] | None = None) -> np.ndarray:
    """Check labels and return them as int64 (N,); one-hot (N, C) rows are accepted too."""
    if not isinstance(Y, np.ndarray):
        raise DataError(f"{name}: expected a numpy array of labels, got {type(Y).__name__}")
    if Y.ndim == 2 and Y.shape[1] == num_classes and Y.dtype.kind in "iuf b":
        if not (np.isin(Y, (0, 1)).all() and (Y.sum(axis=1) == 1).all()):
            raise DataError(f"{name}: shape {_fmt_shape(Y.shape)} but rows are not one-hot")
        Y = Y.argmax(axis=1)
    if Y.ndim != 1:
        raise DataError(f"{name}: shape {_fmt_shape(Y.shape)}; expected (N,) integer labels")
    if Y.dtype.kind not in "iu":
        raise DataError(f"{name}: dtype {Y.dtype}; expected integer labels 0..{num_classes - 1}")
    if Y.size and (Y.min() < 0 or Y.max() >= num_classes):
        bad = Y[(Y < 0) | (num_classes <= Y)][0]
        names = classes or CLASSES[:num_classes]
        raise DataError(f"{name}: label {bad} out of range; expected 0..{num_classes - 1} "
                        f"({', '.join(f'{i}={c}' for i, c in enumerate(names))})")
    return Y.astype(np.int64, copy=False)


def validate_arrays(X, Y, is_test=None, name: str = "dataset", classes=CLASSES) -> None:
    validate_images(X, f"{name}: X")
    Y = as_labels(Y, len(classes), f"{name}: Y", classes)
    if len(Y) != len(X):
        raise DataError(f"{name}: X has {len(X)} images but Y has {len(Y)} labels; "
                        f"expected the same length")
    if is_test is not None and (not isinstance(is_test, np.ndarray) or is_test.shape != (len(X),)
                                or is_test.dtype != bool):
            raise DataError(f"{name}: is_test must be a bool array of shape ({len(X)},), got "
                            f"{getattr(is_test, 'dtype', type(is_test).__name__)} "
                            f"{_fmt_shape(getattr(is_test, 'shape', ()))}")


# ---------------------------------------------------------------- load

def from_arrays(X: np.ndarray, Y: np.ndarray, is_test: np.ndarray | None = None,
                source: str = "<memory>", classes: tuple[str, ...] | list[str] | None = None) -> Dataset:
    """A Dataset from arrays (validated; labels may be int or one-hot). Inputs are not modified.
    `classes`: the names in label order (default: CIFAR-4's)."""
    names = tuple(str(c) for c in classes) if classes is not None else CLASSES
    validate_classes(names, source)
    validate_images(X, f"{source}: X")
    return Dataset(X=X, Y=as_labels(Y, len(names), f"{source}: Y", names), is_test=is_test, source=source,
                   classes=names)


def _names(arrays: dict[str, np.ndarray], key: str, p: Path) -> list[str] | None:
    """A string array of an .npz (class names, the source), or None when absent."""
    if key not in arrays:
        return None
    a = arrays[key]
    if a.dtype.kind not in "US" or a.ndim > 1:
        raise DataError(f"data file '{p}': '{key}' is a {a.dtype} array of shape {_fmt_shape(a.shape)}; "
                        f"expected strings")
    return [str(v) for v in np.atleast_1d(a).astype(str)]


def load(path: str | os.PathLike | None = None) -> Dataset:
    """Find (see `locate`), read and validate the dataset."""
    p = locate(path)
    if p.suffix == ".npz":
        arrays = read_npz(p)
        missing = [k for k in ("X", "Y") if k not in arrays]
        if missing:
            raise DataError(f"data file '{p}' lacks key(s) {', '.join(missing)}; expected keys "
                            f"X, Y (and optionally is_test), found {', '.join(arrays) or 'none'}")
        classes = _names(arrays, "classes", p)
        origin = _names(arrays, "source", p)
        source = f"{p} ({origin[0]})" if origin else str(p)
        return from_arrays(arrays["X"], arrays["Y"], arrays.get("is_test"), source=source, classes=classes)
    if p.name == NPY_NAMES[1] or p.name.endswith("_Y.npy"):
        x_path, y_path = p.with_name(p.name[:-5] + "X.npy"), p
    elif p.suffix == ".npy":
        x_path = p
        y_found = p.with_name(p.name[:-5] + "Y.npy") if p.name.endswith("_X.npy") else None
        if y_found is None or not y_found.is_file():
            want = y_found or p.with_name(NPY_NAMES[1])
            raise DataError(f"data file '{p}': cannot find its labels; expected '{want}' beside "
                            f"it (or give a .npz with X and Y)")
        y_path = y_found
    else:
        raise DataError(f"data file '{p}': unknown kind; expected .npz or a "
                        f"{NPY_NAMES[0]} / {NPY_NAMES[1]} pair")
    if not x_path.is_file():
        raise DataError(f"data file '{x_path}' does not exist; it must accompany '{y_path}'")
    return from_arrays(read_npy(x_path), read_npy(y_path), None, source=str(x_path))


def info(ds: Dataset) -> dict:
    """Shapes, dtype, class counts and pixel statistics (the session's data checks)."""
    X = ds.X
    # Per-channel statistics in [0,1], computed in chunks to keep memory flat.
    s = np.zeros(3)
    s2 = np.zeros(3)
    for i in range(0, len(X), 4096):
        c = X[i:i + 4096].reshape(-1, 3).astype(np.float64) / 255.0
        s += c.sum(0)
        s2 += (c * c).sum(0)
    n = X.shape[0] * X.shape[1] * X.shape[2]
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0))
    counts = np.bincount(ds.Y, minlength=ds.num_classes)
    out = {
        "source": ds.source,
        "name": dataset_name(ds),
        "images": int(len(ds)),
        "X_shape": list(X.shape),
        "X_dtype": str(X.dtype),
        "Y_shape": list(ds.Y.shape),
        "classes": list(ds.classes),
        "class_counts": {c: int(k) for c, k in zip(ds.classes, counts, strict=True)},
        "pixel_min": int(X.min()),
        "pixel_max": int(X.max()),
        "channel_mean": [round(float(v), 5) for v in mean],
        "channel_std": [round(float(v), 5) for v in std],
        "first_pixel": [int(v) for v in X[0, 0, 0]],
        "X_sha256": hashlib.sha256(np.ascontiguousarray(X).tobytes()).hexdigest(),
    }
    if ds.is_test is not None:
        out["official_test_images"] = int(ds.is_test.sum())
    return out


def dataset_name(ds: Dataset) -> str:
    """CIFAR-4, CIFAR-10, or the classes it holds."""
    if ds.is_cifar4:
        return "CIFAR-4"
    if tuple(ds.classes) == CIFAR10_CLASSES:
        return "CIFAR-10"
    return f"{len(ds.classes)} classes: " + ", ".join(ds.classes)


CIFAR10_CLASSES: tuple[str, ...] = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                    "horse", "ship", "truck")
