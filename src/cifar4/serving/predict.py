"""Using a trained model: images (read safely by data/images.py) -> class and probabilities;
files and folders in batches, with a row per unreadable file; CSV out."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import io as cio
from ..data.images import IMAGE_EXTENSIONS, read_image
from ..errors import ImageError
from ..runs import LoadedModel, load_model
from ..training.evaluate import predict_logits, softmax


@dataclass
class Prediction:
    """One image's result: its class and probabilities, or the error that stopped it."""

    path: str
    label: str
    index: int
    probabilities: dict[str, float]
    error: str | None = None


def predict_arrays(loaded: LoadedModel, X: np.ndarray, tta: int = 0, batch_size: int = 1000) -> np.ndarray:
    """Probabilities (N, C) for uint8 images (N, S, S, 3) (S: `loaded.input_size`, the size it
    was trained on), in forward passes of at most `batch_size` images."""
    logits = predict_logits(loaded.model, torch.from_numpy(np.ascontiguousarray(X)), loaded.norm,
                            batch_size=batch_size, device=loaded.device,
                            precision=loaded.inference_precision, tta=tta)
    return softmax(logits)


def _result(loaded: LoadedModel, name: str, probs: np.ndarray) -> Prediction:
    k = int(probs.argmax())
    return Prediction(name, loaded.classes[k], k,
                      {c: round(float(v), 6) for c, v in zip(loaded.classes, probs, strict=True)})


def predict(run: str | Path | LoadedModel, images: list[str | Path], tta: int = 0) -> list[Prediction]:
    """Class and probabilities of each image file; the first unreadable file is an ImageError
    (`predict_files` goes on past it instead)."""
    loaded = run if isinstance(run, LoadedModel) else load_model(run, device="auto")
    if not images:
        raise ImageError("no image given; expected one or more image files")
    X = np.stack([read_image(p, size=loaded.input_size) for p in images])
    return [_result(loaded, str(p), pr) for p, pr in zip(images, predict_arrays(loaded, X, tta), strict=True)]


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, and folders expanded recursively to the image files in them (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise ImageError(f"folder '{p}' holds no image files; expected files such as .png, .jpg, "
                                 f".jpeg, .bmp, .gif, .webp, .tif ({len(IMAGE_EXTENSIONS)} extensions)")
            out += found
        else:
            out.append(p)
    if not out:
        raise ImageError("no image given; expected image files or folders")
    return out


def predict_files(loaded: LoadedModel, paths: Sequence[str | Path], tta: int = 0, batch_size: int = 256,
                  progress: Callable[[int], None] | None = None) -> list[Prediction]:
    """Every image under `paths` (folders recursively), predicted in batches; a file that cannot
    be read gets its own row with `error` set and the others go on. `progress(n)` is called as
    images are done."""
    files = image_files(paths)
    out: list[Prediction] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        rows: list[Prediction | None] = []
        images = []
        for f in chunk:
            try:
                images.append(read_image(f, size=loaded.input_size))
                rows.append(None)
            except ImageError as e:
                rows.append(Prediction(str(f), "", -1, {}, str(e)))
        probs = iter(predict_arrays(loaded, np.stack(images), tta) if images else [])
        out += [r if r is not None else _result(loaded, str(f), next(probs)) for f, r in zip(chunk, rows, strict=True)]
        if progress is not None:
            progress(len(chunk))
    return out


def write_csv(preds: list[Prediction], classes: tuple[str, ...], path: str | Path) -> None:
    """file, class, one probability column per class, error (empty when none)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "class", *classes, "error"])
    for p in preds:
        w.writerow([p.path, p.label, *[f"{p.probabilities[c]:.6f}" if p.error is None else "" for c in classes],
                    p.error or ""])
    cio.write_text(Path(path), buf.getvalue())
