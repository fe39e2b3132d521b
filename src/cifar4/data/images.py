"""Reading images safely, for predict, the server and `cifar4 data import`: any format Pillow
decodes, with a pixel limit against decompression bombs checked from the header before any
pixel is decoded, EXIF orientation, alpha flattened on white, 16-bit and palette images
converted, brought to RGB uint8 at a square size (32x32 unless a model takes more: the size
it was trained on). No process-wide setting of Pillow
is touched, so many threads can decode at once."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError

# Every extension Pillow can open, as registered by its plugins (.png, .jpg, .jpeg, .webp, ...).
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


MAX_PIXELS = 40_000_000  # about 6300 x 6300; larger files are refused before decoding
SIZE = 32                # the side of a CIFAR image, and of what the 32 px models take


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS, crop: bool = False,
               size: int = SIZE) -> np.ndarray:
    """An image file -> (size, size, 3) uint8 RGB, the dataset's layout (`crop`: its centre
    square first, so that nothing is squashed)."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image '{path}' does not exist")
    if path.is_dir():
        raise ImageError(f"image '{path}' is a folder; expected an image file")
    return decode_image(path, str(path), max_pixels, crop, size)


def decode_image(source: Path | bytes, name: str, max_pixels: int = MAX_PIXELS, crop: bool = False,
                 size: int = SIZE) -> np.ndarray:
    """A file or the bytes of an upload -> (size, size, 3) uint8 RGB. The size is checked from the
    header before any pixel is decoded; no process-wide setting is touched (the server decodes
    many uploads at once)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            if img.width * img.height > max_pixels:
                raise ImageError(f"image '{name}' is {img.width}x{img.height} pixels; "
                                 f"expected at most {max_pixels:,} (decompression-bomb guard)")
            img.load()
            return to_rgb(img, crop, size)
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


def resize(img: Image.Image, size: int) -> Image.Image:
    """`img` at size x size with Lanczos filtering: the one resampling every cifar4 image goes
    through, on import, for the 32 px models of a larger dataset, and for predict and serve."""
    if img.size == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)


def to_rgb(img: Image.Image, crop: bool = False, size: int = SIZE) -> np.ndarray:
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
    if crop and img.width != img.height:
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    return np.asarray(resize(img, size), dtype=np.uint8).copy()
