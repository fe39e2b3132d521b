"""One schema checks every experiment; errors name the file, key and value."""

from __future__ import annotations

import subprocess
import sys
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


@pytest.mark.parametrize("text", ["line\rbreak", "tab\there", "bell\x07 and nul-free\x1f", 'quote " and \\ back',
                                  "new\nline", "unicode é ✓"])
def test_any_description_survives_a_toml_round_trip(text):
    e = config.from_dict({"name": "x", "description": text})
    back = config.from_dict(tomllib.loads(e.to_toml()))
    assert back == e and back.description == text


def test_a_key_with_a_dot_is_written_quoted():
    text = config.dump_toml({"sweep": {"train.lr": {"log_uniform": [1e-4, 1e-2]}}})
    assert tomllib.loads(text) == {"sweep": {"train.lr": {"log_uniform": [1e-4, 1e-2]}}}


def test_set_overrides_any_key_and_flags_are_sugar_over_it():
    a = config.from_flags("cnn", {"epochs": 3, "lr": 0.002, "dropout": 0.2})
    b = config.from_flags("cnn", sets=["train.epochs=3", "train.lr=0.002", "model.options.dropout=0.2"])
    assert a == b and a.train.epochs == 3 and a.model.options == {"dropout": 0.2}
    c = config.from_flags("fast", sets=["augment.cutout=4", "data.split=stratified", "train.tta=1"],
                          name="mine")
    assert (c.augment.cutout, c.data.split, c.train.tta, c.name) == (4, "stratified", 1, "mine")
    with pytest.raises(ConfigError, match="unknown key 'train.lrr'"):
        config.from_flags("cnn", sets=["train.lrr=0.1"])
    with pytest.raises(ConfigError, match="not SECTION.KEY=VALUE"):
        config.from_flags("cnn", sets=["epochs=3"])


def test_augment_flag_reads_the_sessions_augmentation_from_its_experiment_file():
    on = config.from_flags("cnn", {"augment": True})
    assert on.augment == config.load("cnn-augmented").augment
    off = config.from_flags("fast-28", {"augment": False})
    assert off.augment == config.AugmentConfig()


def test_early_stopping_flag_asks_keras_early_stopping_with_restore():
    e = config.from_flags("cnn", {"early_stopping": 3})
    assert e.train.early_stopping == config.EarlyStoppingConfig(patience=3, restore_best_weights=True)
    assert config.EarlyStoppingConfig() == config.EarlyStoppingConfig(
        monitor="val_loss", patience=0, min_delta=0.0, restore_best_weights=False)  # Keras' defaults


def test_resume_refuses_other_flags():
    config.check_resume_flags({"epochs": None, "option": []})
    with pytest.raises(ConfigError, match="cannot be combined with --batch-size"):
        config.check_resume_flags({"epochs": None, "batch_size": 32})


def test_model_options_are_built_once_per_process_and_bad_ones_always_refused(monkeypatch):
    """An experiment's model is checked by building it on the meta device; a command checks its
    experiment, members, fallbacks and GPU variant many times, so each name and options build
    once. A bad option is refused every time it is met."""
    from cifar4 import models
    monkeypatch.setattr(config, "_BUILT", set())
    built = []
    real = models.build
    monkeypatch.setattr(models, "build", lambda name, **kw: built.append(name) or real(name, **kw))
    config.load("transfer")
    first = len(built)
    assert first >= 1
    config.load("transfer")
    config.load("fast-long")  # its transfer member: the same options again
    assert built.count("transfer") == first
    for _ in range(2):
        with pytest.raises(ConfigError, match="widths"):
            config.from_dict({"name": "x", "model": {"name": "fast", "options": {"widths": [8]}}})


def test_fast_long_trains_transfer_first_and_its_fast_member_runs_fasts_gpu_recipe():
    """fast-long gives `transfer` the command's first minutes (a fresh machine extracts its
    features), then fast-15 what is left up to its own 175 s; on a GPU fast-15 is `fast` as
    measured there (the GPU figures stay true), apart from the limit and the CPU fallbacks."""
    long = config.load("fast-long")
    assert long.ensemble is not None and long.ensemble.members == ["transfer", "fast-15"]
    f15, fast = config.load("fast-15"), config.load("fast")
    assert f15.train.epochs > fast.train.epochs and f15.train.time_limit > fast.train.time_limit
    assert f15.train.time_limit < long.train.time_limit
    same = {"name": "x", "description": "", "fallbacks": []}
    g15, g = f15.on_gpu().model_copy(update=same), fast.on_gpu().model_copy(update=same)
    assert g15.train.model_copy(update={"time_limit": 0}) == g.train.model_copy(update={"time_limit": 0})
    assert g15.model_copy(update={"train": g.train}) == g
    # fewer channels, more epochs where the net's own do not fit (an AVX2-only CPU in fp32)
    widths = [f15.fallback(i).model.options["widths"] for i in range(len(f15.fallbacks))]
    assert widths == [[24, 64, 128], [16, 48, 96]]


def test_checking_experiments_does_not_import_torchs_compiler():
    # a model checked on the meta device ran its initialisers as Python references, whose first
    # use imported torch._dynamo: 2.0-2.4 s of every command (a 2-core Cascade Lake Xeon); the
    # commands that do not train now save it (a training command imports it with its optimizer)
    code = ("import sys; from cifar4 import config\n"
            "for n in ('fast', 'fast-long', 'best', 'cnn', 'mlp-deep', 'transfer-finetune', 'transfer-random'):\n"
            "    config.load(n)\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
