"""One schema checks every experiment; errors name the file, key and value."""

from __future__ import annotations

import tomllib

import pytest

from cifar4 import config
from cifar4.errors import ConfigError


def test_builtin_experiments_are_valid():
    names = config.builtin_names()
    assert "cnn" in names
    for n in names:
        assert config.load(n).name == n


def test_toml_round_trip():
    e = config.from_dict({"name": "x", "model": {"name": "mlp-deep", "options": {"dropout": 0.1}},
                          "train": {"early_stopping": {"patience": 2}}, "augment": {"flip": True}})
    assert config.from_dict(tomllib.loads(e.to_toml())) == e


@pytest.mark.parametrize("bad,pattern", [
    ({"trian": {}}, "unknown key 'trian'"),
    ({"train": {"epochs": 0}}, "train.epochs.*greater than 0"),
    ({"train": {"epochs": -3}}, "train.epochs"),
    ({"train": {"batch_size": 0}}, "train.batch_size"),
    ({"train": {"batch_size": "big"}}, "train.batch_size.*'big'"),
    ({"train": {"optimizer": "adamw"}}, "train.optimizer"),
    ({"train": {"nesterov": True}}, "nesterov needs"),
    ({"train": {"optimizer": "adam", "momentum": 0.9}}, "momentum is not an adam option"),
    ({"model": {"name": "nope"}}, "model 'nope' is unknown"),
    ({"model": {"name": "cnn", "options": {"hidden": [1]}}}, "no option hidden"),
    ({"name": "bad name!"}, "name"),
    ({"augment": {"shift": 0.9}}, "augment.shift"),
])
def test_bad_experiments_are_named(bad, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        config.from_dict(bad, "my.toml")
    assert str(e.value).startswith("my.toml") and "\n" not in str(e.value)


def test_bad_files(tmp_path):
    (tmp_path / "x.toml").write_text("name = [unclosed")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(tmp_path / "x.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="neither a built-in"):
        config.load("no-such-experiment")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(tmp_path / "bin.toml")
