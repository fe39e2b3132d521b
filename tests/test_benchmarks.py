"""The benchmark scripts' own rules: the Keras reference needs no TensorFlow to say what it needs,
and time_to_accuracy.py pairs Keras' runs with cifar4's by experiment and round."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "benchmarks"
# runs a script with TensorFlow hidden, as on a machine where it is not installed
NO_TF = ("import runpy, sys; sys.modules['tensorflow'] = None; sys.argv = sys.argv[1:]; "
         "runpy.run_path(sys.argv[0], run_name='__main__')")


def _env_without_data() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "CIFAR4_DATA"}


def test_keras_reference_without_tensorflow_names_the_install_in_one_line(tiny_npz):
    out = subprocess.run([sys.executable, "-c", NO_TF, str(BENCH / "keras_reference.py"), "cnn",
                          "--data", str(tiny_npz)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "keras_reference.py: TensorFlow/Keras is not installed: pip install tensorflow"]


def test_keras_reference_asks_for_the_dataset_in_one_line():
    out = subprocess.run([sys.executable, str(BENCH / "keras_reference.py"), "mlp-deep"],
                         capture_output=True, text=True, timeout=120, env=_env_without_data())
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "keras_reference.py: no dataset: pass --data PATH or set CIFAR4_DATA to the cifar4 .npz file"]


def test_time_to_accuracy_stops_with_the_keras_reference_error_before_training(tiny_npz, tmp_path):
    wrapper = tmp_path / "python-without-tf"
    wrapper.write_text(f"#!{sys.executable}\n{NO_TF.replace('; ', chr(10))}\n")
    wrapper.chmod(0o755)
    out = subprocess.run([sys.executable, str(BENCH / "time_to_accuracy.py"), "cnn", "--epochs", "1",
                          "--keras", "--keras-python", str(wrapper), "--data", str(tiny_npz),
                          "--out", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "keras_reference.py: TensorFlow/Keras is not installed: pip install tensorflow")
    assert not (tmp_path / "r.json").exists()


def test_speedups_pair_each_keras_run_with_cifar4s_runs_of_its_round(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from time_to_accuracy import speedups
    rows = [{"experiment": "keras:cnn", "round": 1, "train_seconds": 30.0},
            {"experiment": "cnn", "round": 1, "train_seconds": 10.0},
            {"experiment": "cnn", "round": 1, "train_seconds": 20.0},
            {"experiment": "cnn", "round": 2, "train_seconds": 8.0},
            {"experiment": "keras:cnn", "round": 2, "train_seconds": 24.0},
            {"experiment": "fast", "round": 1, "train_seconds": 60.0}]
    assert speedups(rows) == {"cnn": [2.0, 3.0]}
