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
