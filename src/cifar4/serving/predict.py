"""Using a trained model: read any image Pillow can decode (safely: a pixel limit against
decompression bombs, EXIF orientation, alpha flattened on white, 16-bit and palette images
converted), bring it to RGB 32x32 uint8, and return the class and the probabilities."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .. import io as cio
from ..errors import ImageError
from ..runs import LoadedModel, load_model
from ..training.evaluate import predict_logits, softmax

MAX_PIXELS = 40_000_000  # about 6300 x 6300; larger files are refused before decoding


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image file -> (32, 32, 3) uint8 RGB, the dataset's layout."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image '{path}' does not exist")
    if path.is_dir():
        raise ImageError(f"image '{path}' is a folder; expected an image file")
    return decode_image(path, str(path), max_pixels)


def decode_image(source: Path | bytes, name: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A file or the bytes of an upload -> (32, 32, 3) uint8 RGB. The size is checked from the
    header before any pixel is decoded; no process-wide setting is touched (the server decodes
    many uploads at once)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            if img.width * img.height > max_pixels:
                raise ImageError(f"image '{name}' is {img.width}x{img.height} pixels; "
                                 f"expected at most {max_pixels:,} (decompression-bomb guard)")
            img.load()
            return to_rgb32(img)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"image '{name}' exceeds the {max_pixels:,}-pixel limit "
                         f"(decompression-bomb guard)") from None
    except UnidentifiedImageError:
        raise ImageError(f"'{name}' is not an image Pillow can read; expected PNG, JPEG, BMP, "
                         f"GIF, WebP, TIFF, ...") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"image '{name}' is truncated or corrupt ({e})") from None


def to_rgb32(img: Image.Image) -> np.ndarray:
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        a = np.asarray(img)
        a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0)
        scale = 255.0 if a.max() <= 1.0 else 1.0
        img = Image.fromarray(np.clip(a * scale, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGB" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    img = img.convert("RGB")
    if img.size != (32, 32):
        img = img.resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8).copy()


@dataclass
class Prediction:
    """One image's result: its class and probabilities, or the error that stopped it."""

    path: str
    label: str
    index: int
    probabilities: dict[str, float]
    error: str | None = None


def predict_arrays(loaded: LoadedModel, X: np.ndarray, tta: int = 0) -> np.ndarray:
    """Probabilities (N, C) for uint8 images (N, 32, 32, 3)."""
    logits = predict_logits(loaded.model, torch.from_numpy(np.ascontiguousarray(X)), loaded.norm,
                            device=loaded.device, precision=loaded.inference_precision, tta=tta)
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
    X = np.stack([read_image(p) for p in images])
    return [_result(loaded, str(p), pr) for p, pr in zip(images, predict_arrays(loaded, X, tta), strict=True)]


# Every extension Pillow can open, as registered by its plugins (.png, .jpg, .jpeg, .webp, ...).
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


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
                images.append(read_image(f))
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
