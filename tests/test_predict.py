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


def test_predict_over_folders_keeps_going_past_bad_files(tiny, tmp_path, capsys):
    import csv
    import json

    from cifar4.cli import main
    r = pipeline.train(config.from_dict({"name": "p", "model": {"name": "cnn"},
                                         "train": {"epochs": 1, "batch_size": 32}}), tiny,
                       runs_root=tmp_path / "runs", progress=False)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i in range(5):
        Image.fromarray(tiny.X[i]).save(tmp_path / "imgs" / ("sub" if i % 2 else ".") / f"{i}.png")
    Image.fromarray(tiny.X[5]).save(tmp_path / "imgs" / "five.JPG")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image, not an image extension: skipped")
    out_csv = tmp_path / "pred.csv"
    code = main(["predict", str(r.run_dir), str(tmp_path / "imgs"), "--out", str(out_csv), "--batch-size", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "1 of 7 images could not be read" in err and "Traceback" not in err
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 7 and list(rows[0]) == ["file", "class", *tiny.classes, "error"]
    bad = [row for row in rows if row["error"]]
    assert len(bad) == 1 and bad[0]["file"].endswith("broken.png") and "not an image" in bad[0]["error"]
    good = [row for row in rows if not row["error"]]
    assert all(abs(sum(float(row[c]) for c in tiny.classes) - 1) < 1e-4 for row in good)
    direct = predict(r.run_dir, [row["file"] for row in good])  # batches of 2 give the same answers
    assert [p.label for p in direct] == [row["class"] for row in good]
    code = main(["predict", str(r.run_dir), str(tmp_path / "imgs" / "sub"), "--json"])
    assert code == 0 and len(json.loads(capsys.readouterr().out)) == 2
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(r.run_dir), str(tmp_path / "empty")]) == 2
    assert "holds no image files" in capsys.readouterr().err
