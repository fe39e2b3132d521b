"""A folder of your own images as a dataset (`cifar4 data import DIR`).

The ImageFolder convention: one subfolder per class, named for it, holding that class's
images (any format Pillow opens, searched recursively). Every image is decoded under the same
limits as `cifar4 predict` (40 megapixels, EXIF orientation, alpha flattened on white), cut to
its centre square (so nothing is squashed), and resized to `size` x `size` with Lanczos
filtering: 32 (CIFAR's size, what most models take) or more, up to the largest resolution a
built-in transfer experiment feeds its backbone, so that a transfer model sees the photos'
detail; the 32 px models then get them at 32 px (`Dataset.at_size`). Files that cannot be read
are listed and skipped, never silently. The result is one .npz with the class names (the
subfolder names, sorted) and its source, usable by every command with --data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError, ImageError
from . import MIN_SIZE, Dataset, from_arrays
from .images import IMAGE_EXTENSIONS, read_image

MIN_PER_CLASS = 10  # so that the 70/15/15 split leaves every class in validation and test
SIZE = MIN_SIZE     # the default: what the 32 px models take (transfer models upsample inside)


@dataclass
class ImportReport:
    dataset: Dataset
    counts: dict[str, int]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)


def class_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"image folder '{root}' does not exist or is not a folder; expected one "
                        f"subfolder per class")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        raise DataError(f"image folder '{root}' has {len(folders)} class subfolder(s); expected at least 2 "
                        f"(one per class, e.g. {root}/cat/*.jpg, {root}/dog/*.jpg)")
    return folders


def max_size() -> int:
    """The largest image side worth storing: the largest resolution a built-in transfer
    experiment feeds its backbone (more pixels than that would be thrown away by every model)."""
    from ..config import builtin_names, load_dict  # the experiments, read where they are kept

    sizes = [int(d["model"].get("options", {}).get("resolution", MIN_SIZE))
             for d in (load_dict(n)[0] for n in builtin_names())
             if d.get("model", {}).get("name") == "transfer"]
    return max([MIN_SIZE, *sizes])


def check_size(size: object) -> int:
    """`size` as an integer from 32 to `max_size()`; anything else is a one-line DataError."""
    top = max_size()
    text = str(size).strip()
    if isinstance(size, bool) or not (isinstance(size, int) or text.isdigit()) or \
            not MIN_SIZE <= int(text) <= top:
        raise DataError(f"--size {size!r}: expected a whole number of pixels from {MIN_SIZE} to {top} "
                        f"(32 for CIFAR's size; up to {top}, the largest resolution of the transfer "
                        f"experiments)")
    return int(text)


def import_folder(root: str | Path, size: int | str = SIZE,
                  progress: Callable[[int, int], None] | None = None) -> ImportReport:
    """Read `root/<class>/**/<image>` into a Dataset of `size` px images (labels in sorted
    class-name order)."""
    size = check_size(size)
    root = Path(root)
    folders = class_folders(root)
    files = [(k, p) for k, d in enumerate(folders) for p in sorted(d.rglob("*"))
             if p.is_file() and not p.name.startswith(".")]
    images, labels, skipped = [], [], []
    for i, (k, p) in enumerate(files):
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append((str(p), f"not an image extension ({p.suffix or 'none'})"))
        else:
            try:
                images.append(read_image(p, crop=True, size=size))
                labels.append(k)
            except ImageError as e:
                skipped.append((str(p), str(e)))
        if progress is not None:
            progress(i + 1, len(files))
    classes = tuple(d.name for d in folders)
    counts = {c: int(sum(1 for y in labels if y == k)) for k, c in enumerate(classes)}
    short = [(c, n) for c, n in counts.items() if n < MIN_PER_CLASS]
    if short:
        c, n = short[0]
        raise DataError(f"class '{c}' ({root / c}) has {n} readable image(s); expected at least "
                        f"{MIN_PER_CLASS} per class so that the 70/15/15 split gives it training, "
                        f"validation and test images")
    ds = from_arrays(np.stack(images), np.asarray(labels, np.int64), np.zeros(len(labels), bool),
                     source=f"image folder {root.resolve()}", classes=classes)
    return ImportReport(ds, counts, skipped)
