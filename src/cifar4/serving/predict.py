"""Using a trained model: read any image Pillow can decode (safely: a pixel limit against
decompression bombs, EXIF orientation, alpha flattened on white, 16-bit and palette images
converted), bring it to RGB 32x32 uint8, and return the class and the probabilities."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

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
    old_limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = max_pixels
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > max_pixels:
                    raise ImageError(f"image '{path}' is {img.width}x{img.height} pixels; "
                                     f"expected at most {max_pixels:,} (decompression-bomb guard)")
                img.load()
                return to_rgb32(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image '{path}' exceeds the {max_pixels:,}-pixel limit "
                         f"(decompression-bomb guard)") from None
    except UnidentifiedImageError:
        raise ImageError(f"'{path}' is not an image Pillow can read; expected PNG, JPEG, BMP, "
                         f"GIF, WebP, TIFF, ...") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"image '{path}' is truncated or corrupt ({e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit


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
    path: str
    label: str
    index: int
    probabilities: dict[str, float]


def predict_arrays(loaded: LoadedModel, X: np.ndarray, tta: int = 0) -> np.ndarray:
    """Probabilities (N, C) for uint8 images (N, 32, 32, 3)."""
    logits = predict_logits(loaded.model, torch.from_numpy(np.ascontiguousarray(X)), loaded.norm,
                            device=loaded.device, precision=loaded.inference_precision, tta=tta)
    return softmax(logits)


def predict(run: str | Path | LoadedModel, images: list[str | Path], tta: int = 0) -> list[Prediction]:
    loaded = run if isinstance(run, LoadedModel) else load_model(run, device="auto")
    if not images:
        raise ImageError("no image given; expected one or more image files")
    X = np.stack([read_image(p) for p in images])
    probs = predict_arrays(loaded, X, tta)
    out = []
    for p, pr in zip(images, probs):
        k = int(pr.argmax())
        out.append(Prediction(str(p), loaded.classes[k], k,
                              {c: round(float(v), 6) for c, v in zip(loaded.classes, pr)}))
    return out
