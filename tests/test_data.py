"""The dataset loader finds the data in the documented order, reads both layouts, and turns
every kind of bad file into a one-line DataError naming the file."""

from __future__ import annotations

import numpy as np
import pytest

from cifar4 import data
from cifar4.errors import DataError
from conftest import make_arrays


def test_loads_npz_and_npy_pair_identically(tmp_path, tiny_npz):
    X, Y, _ = make_arrays()
    np.save(tmp_path / "CIFAR4_X.npy", X)
    np.save(tmp_path / "CIFAR4_Y.npy", Y)
    a = data.load(tiny_npz)
    b = data.load(tmp_path / "CIFAR4_X.npy")
    assert a.X.shape == (240, 32, 32, 3) and a.Y.dtype == np.int64
    assert (a.X == b.X).all() and (a.Y == b.Y).all() and a.is_test is not None and b.is_test is None


def test_folder_prefers_npz_then_pair(tmp_path):
    X, Y, _ = make_arrays()
    np.save(tmp_path / "CIFAR4_X.npy", X)
    np.save(tmp_path / "CIFAR4_Y.npy", Y)
    assert data.locate(tmp_path).name == "CIFAR4_X.npy"
    np.savez(tmp_path / "cifar4.npz", X=X, Y=Y)
    assert data.locate(tmp_path).name == "cifar4.npz"


def test_locate_order_env_then_cwd_then_cache(tmp_path, monkeypatch, tiny_npz):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CIFAR4_DATA", str(tiny_npz))
    assert data.locate() == tiny_npz
    monkeypatch.delenv("CIFAR4_DATA")
    (tmp_path / "data").mkdir()
    X, Y, _ = make_arrays()
    np.savez(tmp_path / "data" / "cifar4.npz", X=X, Y=Y)
    assert data.locate().resolve() == (tmp_path / "data" / "cifar4.npz").resolve()


def test_nothing_found_says_how_to_get_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CIFAR4_DATA", raising=False)
    monkeypatch.setattr(data, "cache_dir", lambda: tmp_path / "nocache")
    with pytest.raises(DataError, match="cifar4 data fetch"):
        data.locate()


def test_one_hot_labels_are_accepted():
    X, Y, _ = make_arrays()
    ds = data.from_arrays(X, np.eye(4)[Y])
    assert (ds.Y == Y).all()


def test_inputs_are_not_modified():
    X, Y, _ = make_arrays()
    X0, Y0 = X.copy(), Y.copy()
    data.from_arrays(X, Y.astype(np.int32))
    assert (X == X0).all() and (Y == Y0).all()


def _save(tmp_path, X=None, Y=None, name="d.npz"):
    X0, Y0, _ = make_arrays(40)
    p = tmp_path / name
    np.savez(p, X=X0 if X is None else X, Y=Y0 if Y is None else Y)
    return p


BAD_ARRAYS = {
    "float pixels": (lambda X, Y: (X.astype(np.float32) / 255, Y), "dtype float32"),
    "int16 pixels": (lambda X, Y: (X.astype(np.int16), Y), "dtype int16"),
    "channels first": (lambda X, Y: (X.transpose(0, 3, 1, 2).copy(), Y), "channels-first"),
    "grayscale": (lambda X, Y: (X[..., 0].copy(), Y), r"shape \(40, 32, 32\)"),
    "four channels": (lambda X, Y: (np.concatenate([X, X[..., :1]], 3), Y), r"\(40, 32, 32, 4\)"),
    "not square": (lambda X, Y: (np.repeat(X, 2, axis=1), Y), r"shape \(40, 64, 32, 3\)"),
    "smaller than 32": (lambda X, Y: (X[:, :16, :16].copy(), Y), r"shape \(40, 16, 16, 3\)"),
    "larger, channels first": (lambda X, Y: (np.repeat(np.repeat(X, 2, 1), 2, 2).transpose(0, 3, 1, 2).copy(), Y),
                               "channels-first"),
    "label out of range": (lambda X, Y: (X, np.where(Y == 3, 7, Y)), "label 7 out of range"),
    "negative label": (lambda X, Y: (X, Y - 1), "label -1 out of range"),
    "float labels": (lambda X, Y: (X, Y.astype(np.float64) + 0.5), "dtype float64"),
    "length mismatch": (lambda X, Y: (X, Y[:-3]), "40 images but Y has 37 labels"),
    "empty": (lambda X, Y: (X[:0], Y[:0]), "no images"),
    "nan": (lambda X, Y: (np.full(X.shape, np.nan, np.float32), Y), "NaN or inf"),
    "inf": (lambda X, Y: (np.full(X.shape, np.inf, np.float64), Y), "NaN or inf"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARRAYS))
def test_bad_arrays_are_named_errors(tmp_path, case):
    change, pattern = BAD_ARRAYS[case]
    X, Y, _ = make_arrays(40)
    p = _save(tmp_path, *change(X, Y))
    with pytest.raises(DataError, match=pattern) as e:
        data.load(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_bad_files_are_named_errors(tmp_path):
    X, Y, _ = make_arrays(40)
    good = tmp_path / "good.npy"
    np.save(good, X)
    raw = good.read_bytes()
    cases = {
        "missing.npz": (None, "does not exist"),
        "empty.npz": (b"", "empty"),
        "text.npz": (b"hello world", "not a .npz"),
        "CIFAR4_X.npy": (raw[: len(raw) // 2], "truncated or corrupt"),
        "wrongmagic_X.npy": (b"GIF89a" + raw[6:], "not a .npy"),
    }
    for name, (content, pattern) in cases.items():
        p = tmp_path / name
        if content is not None:
            p.write_bytes(content)
        if name.endswith("X.npy"):
            np.save(tmp_path / name.replace("X.npy", "Y.npy"), Y)
        with pytest.raises(DataError, match=pattern):
            data.load(p)


def test_object_and_pickled_arrays_are_refused(tmp_path):
    obj = np.empty(3, dtype=object)
    obj[:] = [1, "a", None]
    np.save(tmp_path / "CIFAR4_X.npy", obj, allow_pickle=True)
    np.save(tmp_path / "CIFAR4_Y.npy", np.zeros(3, np.int64))
    with pytest.raises(DataError, match="never unpickles"):
        data.load(tmp_path)
    np.savez(tmp_path / "o.npz", X=obj, Y=np.zeros(3))
    with pytest.raises(DataError, match="never unpickles"):
        data.load(tmp_path / "o.npz")


def test_npz_missing_keys_and_folder_without_data(tmp_path):
    np.savez(tmp_path / "k.npz", images=np.zeros(3))
    with pytest.raises(DataError, match="lacks key"):
        data.load(tmp_path / "k.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no cifar4.npz"):
        data.load(tmp_path / "empty")


def test_info_reports_counts_and_statistics(tiny):
    inf = data.info(tiny)
    assert inf["class_counts"] == {"bird": 60, "cat": 60, "frog": 60, "horse": 60}
    assert inf["X_shape"] == [240, 32, 32, 3] and inf["pixel_max"] == 230
    assert len(inf["channel_mean"]) == 3 and 0 < inf["channel_mean"][0] < 1


def test_real_dataset_matches_reference(real):
    inf = data.info(real)
    assert inf["first_pixel"] == [164, 206, 84]
    assert inf["X_sha256"] == "1fc35e2d0c077aa77487e5f8f6bd3e4387d9d68feaf2dce60160244d785d13d0"
    assert inf["official_test_images"] == 4000


def test_larger_square_images_load_and_give_32_px_once(tmp_path):
    X, Y, _ = make_arrays(40)
    big = np.repeat(np.repeat(X, 3, 1), 3, 2)  # each pixel a 3x3 block: 96 px
    ds = data.load(_save(tmp_path, big, Y))
    assert ds.size == 96 and data.load(_save(tmp_path, X, Y, "small.npz")).size == 32
    small = ds.at_size(32)
    assert small.X.shape == (40, 32, 32, 3) and small is ds.at_size(32) and ds.at_size(96) is ds
    assert np.abs(small.X.astype(int) - X.astype(int)).mean() < 8  # blocks back to about their pixels
    from PIL import Image  # ... with Lanczos filtering, as on import
    lanczos = Image.fromarray(big[7]).resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=3.0)
    assert (small.X[7] == np.asarray(lanczos)).all()
    assert small.checksum() == ds.checksum() and (small.Y == ds.Y).all()
    inf = data.info(ds)
    assert inf["X_shape"] == [40, 96, 96, 3]
    assert inf["channel_mean"] == pytest.approx(data.info(data.from_arrays(X, Y))["channel_mean"], abs=1e-4)
