"""Splits: the session's exact split by default, stratified and official ones by option."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from cifar4.data.split import make_split
from cifar4.errors import ConfigError


def test_session_split_equals_the_notebook_calls(tiny):
    sp = make_split(tiny, "session", 42)
    X_train, X_test, Y_train, Y_test = train_test_split(tiny.X, tiny.Y, train_size=0.7, random_state=42)
    X_val, X_test, Y_val, Y_test = train_test_split(X_test, Y_test, train_size=0.5, random_state=42)
    assert (tiny.X[sp.train] == X_train).all() and (tiny.X[sp.val] == X_val).all()
    assert (tiny.Y[sp.test] == Y_test).all()


def test_parts_are_disjoint_and_cover_everything(tiny):
    for kind in ("session", "stratified", "official"):
        sp = make_split(tiny, kind, 1)
        allidx = np.concatenate([sp.train, sp.val, sp.test])
        assert len(allidx) == len(tiny) and len(np.unique(allidx)) == len(tiny)


def test_stratified_is_balanced_and_official_uses_is_test(tiny):
    sp = make_split(tiny, "stratified", 0)
    assert set(np.bincount(tiny.Y[sp.train])) == {42}
    off = make_split(tiny, "official", 0)
    assert tiny.is_test[off.test].all() and not tiny.is_test[off.train].any()


def test_seed_changes_the_split(tiny):
    assert not np.array_equal(make_split(tiny, "session", 1).train, make_split(tiny, "session", 2).train)


def test_unknown_split_and_official_without_is_test(tiny):
    from cifar4.data import from_arrays
    with pytest.raises(ConfigError, match="unknown"):
        make_split(tiny, "random")
    with pytest.raises(ConfigError, match="is_test"):
        make_split(from_arrays(tiny.X, tiny.Y), "official")


def test_real_session_split_sizes(real):
    assert make_split(real).sizes() == {"train": 16800, "val": 3600, "test": 3600}


def test_a_split_is_kept_and_a_new_process_reads_it_without_scikit_learn(tiny_npz, tmp_path, monkeypatch):
    import subprocess
    import sys

    from cifar4.data import load
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    ds = load(tiny_npz)
    made = make_split(ds, "stratified", 3)
    kept = list((tmp_path / "cache" / "splits").glob("stratified-seed3-*.npz"))
    assert len(kept) == 1
    code = ("import sys, numpy as np; from cifar4.data import load; from cifar4.data.split import make_split; "
            f"sp = make_split(load({str(tiny_npz)!r}), 'stratified', 3); "
            f"np.savez({str(tmp_path / 'read.npz')!r}, train=sp.train, val=sp.val, test=sp.test); "
            "print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    read = np.load(tmp_path / "read.npz")
    for part in ("train", "val", "test"):
        assert np.array_equal(read[part], getattr(made, part))
    # another seed, kind or label set is another file
    make_split(ds, "stratified", 4)
    make_split(ds, "session", 3)
    assert len(list((tmp_path / "cache" / "splits").glob("*.npz"))) == 3


def test_a_damaged_or_foreign_kept_split_is_made_again(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path))
    made = make_split(tiny, "session", 5)
    (path,) = (tmp_path / "splits").glob("*.npz")
    for bad in (b"not a zip file", None):
        if bad is None:  # rows that are not this dataset's (out of range, repeated)
            np.savez(path, train=np.array([0, 0, 1]), val=np.array([len(tiny) + 5]), test=np.array([2]))
        else:
            path.write_bytes(bad)
        again = make_split(tiny, "session", 5)
        assert np.array_equal(again.train, made.train) and np.array_equal(again.test, made.test)
        assert np.array_equal(np.load(path)["val"], made.val)  # written again, whole
    monkeypatch.setenv("CIFAR4_CACHE", str(path))  # a file where the folder should be: nothing kept
    assert np.array_equal(make_split(tiny, "stratified", 5).train, make_split(tiny, "stratified", 5).train)


def test_subsets_of_an_official_split_of_a_class_sorted_file_hold_every_class(tmp_path, monkeypatch):
    """CIFAR-10's file is stored class by class and the official split keeps that order: a
    subset taken from the front would be one class, so it is spread over the part instead;
    the shuffled splits keep their first rows."""
    from cifar4.config import DataConfig
    from cifar4.data import from_arrays
    from cifar4.data.split import split_indices
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path))
    rng = np.random.default_rng(0)
    Y = np.repeat(np.arange(10), 60)  # sorted by class
    is_test = np.tile(np.r_[np.zeros(50, bool), np.ones(10, bool)], 10)
    ds = from_arrays(rng.integers(0, 256, (600, 32, 32, 3), dtype=np.uint8), Y, is_test, source="sorted",
                     classes=[f"c{i}" for i in range(10)])
    sp, idx = split_indices(DataConfig(split="official", train_subset=40, eval_subset=20), ds)
    assert len(idx["train"]) == 40 and set(Y[idx["train"]]) == set(range(10))
    assert len(idx["test"]) == 20 and set(Y[idx["test"]]) == set(range(10))
    assert set(idx["val"]) <= set(sp.val)
    _, shuffled = split_indices(DataConfig(split="session", train_subset=40), ds)
    assert (shuffled["train"] == make_split(ds, "session", 42).train[:40]).all()
