"""A folder of your own images as a dataset (`cifar4 data import DIR`).

The ImageFolder convention: one subfolder per class, named for it, holding that class's
images (any format Pillow opens, searched recursively). Every image is decoded under the same
limits as `cifar4 predict` (40 megapixels, EXIF orientation, alpha flattened on white), cut to
its centre square (so nothing is squashed), and resized to 32x32 with Lanczos filtering. Files
that cannot be read are listed and skipped, never silently. The result is one .npz with the
class names (the subfolder names, sorted) and its source, usable by every command with --data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError, ImageError
from . import Dataset, from_arrays
from .images import IMAGE_EXTENSIONS, read_image

MIN_PER_CLASS = 10  # so that the 70/15/15 split leaves every class in validation and test
SIZE = 32           # what every cifar4 model takes (transfer models upsample inside)


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


def import_folder(root: str | Path, size: int = SIZE,
                  progress: Callable[[int, int], None] | None = None) -> ImportReport:
    """Read `root/<class>/**/<image>` into a Dataset (labels in sorted class-name order)."""
    if size != SIZE:
        raise DataError(f"--size {size}: cifar4's models take {SIZE}x{SIZE} images (transfer models "
                        f"upsample inside); expected --size {SIZE}")
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
                images.append(read_image(p, crop=True))
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
