"""Any image Pillow reads becomes RGB 32x32 uint8; unsafe or broken images are refused."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cifar4 import config
from cifar4.errors import ImageError
from cifar4.serving.predict import predict, read_image
from cifar4.training import pipeline


def save(tmp_path, name, img, **kw):
    p = tmp_path / name
    img.save(p, **kw)
    return p


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16", "1", "CMYK", "LA"])
def test_every_mode_becomes_rgb32(tmp_path, mode):
    img = Image.new(mode, (50, 40))
    ext = "jpg" if mode == "CMYK" else "png"
    if mode == "I;16":
        img = Image.fromarray((np.arange(2000).reshape(40, 50) * 30).astype(np.uint16))
    x = read_image(save(tmp_path, f"a.{ext}", img))
    assert x.shape == (32, 32, 3) and x.dtype == np.uint8


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    img = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    assert read_image(save(tmp_path, "w.png", img)).min() == 255


def test_transparent_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    assert (read_image(save(tmp_path, "t.png", img)) == 255).all()


def test_tiny_and_large_images(tmp_path):
    assert read_image(save(tmp_path, "1.png", Image.new("RGB", (1, 1), (9, 9, 9)))).max() == 9
    big = save(tmp_path, "big.png", Image.new("RGB", (3000, 2000)))
    assert read_image(big).shape == (32, 32, 3)
    with pytest.raises(ImageError, match="decompression-bomb"):
        read_image(big, max_pixels=1_000_000)


def test_broken_images(tmp_path):
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(ImageError, match="not an image Pillow can read"):
        read_image(tmp_path / "x.png")
    good = save(tmp_path, "g.png", Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    data = good.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        read_image(tmp_path / "trunc.png")
    with pytest.raises(ImageError, match="does not exist"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="is a folder"):
        read_image(tmp_path)


def test_predict_returns_class_and_probabilities(tiny, tmp_path):
    e = config.from_dict({"name": "p", "train": {"epochs": 4, "batch_size": 32}})
    r = pipeline.train(e, tiny, runs_root=tmp_path, progress=False)
    paths = [save(tmp_path, f"{k}.png", Image.fromarray(tiny.X[k * 60])) for k in range(4)]
    preds = predict(r.run_dir, paths)
    assert [p.label for p in preds] == ["bird", "cat", "frog", "horse"]
    assert all(abs(sum(p.probabilities.values()) - 1) < 1e-4 for p in preds)
