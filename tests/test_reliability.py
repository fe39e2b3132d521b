"""Reliability: arbitrary bytes never crash the loaders with anything but a named error, a full
disk leaves no torn file, and a training process killed with SIGKILL resumes to the same
result as an uninterrupted run."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cifar4 import data, io, runs
from cifar4.errors import CheckpointError, DataError, ImageError, RunError
from cifar4.serving.predict import read_image
from conftest import make_arrays

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _each_as(tmp_path, blob, names):
    """The bytes written under each name in turn (beside a valid label file)."""
    np.save(tmp_path / "CIFAR4_Y.npy", np.zeros(3, np.int64))
    for name in names:
        p = tmp_path / name
        p.write_bytes(blob)
        yield p


@FUZZ
@given(blob=st.binary(max_size=400))
def test_any_bytes_as_a_data_file_is_a_data_error(tmp_path, blob):
    for p in _each_as(tmp_path, blob, ("f.npz", "CIFAR4_X.npy")):
        with pytest.raises(DataError):
            data.load(p)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=2000), flip=st.integers(min_value=0, max_value=2000))
def test_damaged_npy_is_a_data_error(tmp_path, cut, flip):
    X, Y, _ = make_arrays(8)
    np.save(tmp_path / "CIFAR4_X.npy", X)
    np.save(tmp_path / "CIFAR4_Y.npy", Y)
    raw = bytearray((tmp_path / "CIFAR4_X.npy").read_bytes())
    raw[flip % 128] ^= 0xFF  # damage the header
    (tmp_path / "CIFAR4_X.npy").write_bytes(bytes(raw[: len(raw) - cut]))
    try:
        ds = data.load(tmp_path)
        assert ds.X.shape[1:] == (32, 32, 3)  # a harmless flip may still load: then it is valid
    except DataError:
        pass


@FUZZ
@given(blob=st.binary(max_size=300))
def test_any_bytes_as_an_image_is_an_image_error(tmp_path, blob):
    p = tmp_path / "x.png"
    p.write_bytes(blob)
    try:
        x = read_image(p)
        assert x.shape == (32, 32, 3)
    except ImageError:
        pass


@FUZZ
@given(blob=st.binary(max_size=300))
@example(blob=b"")
@example(blob=b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}")
def test_any_bytes_as_weights_is_a_checkpoint_error(tmp_path, blob):
    """Garbage never loads silently: it is a CheckpointError naming the file; bytes that do
    load are a well-formed file, read as the library itself reads it, tensor for tensor."""
    import io as _io

    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load
    for p in _each_as(tmp_path, blob, ("w.safetensors", "w.pth")):
        try:
            got = runs.read_weights(p)
        except CheckpointError as e:
            assert str(p) in str(e)
            continue
        try:
            ref = st_load(blob) if p.suffix == ".safetensors" else \
                torch.load(_io.BytesIO(blob), map_location="cpu", weights_only=True)
        except (SafetensorError, Exception) as e:  # the library refuses what was loaded: a silent load
            raise AssertionError(f"{p.name}: {blob!r} loaded, but is no weights file ({e})") from None
        assert isinstance(got, dict) and got.keys() == ref.keys()
        assert all(isinstance(v, torch.Tensor) and torch.equal(v, ref[k]) for k, v in got.items())


def test_a_damaged_pth_is_one_line_without_torchs_warning(tmp_path):
    """torch warns about a pickle protocol it does not know before it fails: the user sees
    the one-line CheckpointError alone."""
    p = tmp_path / "w.pth"
    p.write_bytes(b"\x80\xd7" + bytes(range(40)))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="w.pth"):
            runs.read_weights(p)
    assert [str(w.message) for w in said] == []


def test_a_full_disk_leaves_the_old_file_intact_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    io.write_json(target, {"v": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(RunError, match="No space left"):
        io.write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def _train_cmd(npz: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cifar4", "train", "--data", str(npz), "--model", "cnn", "--epochs", "6",
            "--batch-size", "16", "--seed", "11", "--run-dir", str(run_dir), "-q", *extra]


def _files_complete(folder: Path) -> None:
    """Every file in a run directory is either absent or whole: no temporaries, JSON parses."""
    for p in folder.rglob("*"):
        assert not p.name.endswith(".tmp"), p
        if p.suffix == ".json":
            json.loads(p.read_text())
    if (folder / "state" / "last.json").exists():
        assert runs.load_state(folder) is not None


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(bigger_npz, tmp_path):
    full = tmp_path / "full"
    subprocess.run(_train_cmd(bigger_npz, full), check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(bigger_npz, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        last = killed / "state" / "last.json"
        if last.exists():
            try:
                if json.loads(last.read_text())["epoch"] >= 2:
                    break
            except (json.JSONDecodeError, OSError):  # only possible if writes were not atomic
                raise
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists(), "killed too late: the run had finished"
    _files_complete(killed)
    r = subprocess.run([sys.executable, "-m", "cifar4", "train", "--resume", str(killed), "--data",
                        str(bigger_npz), "-q", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed_from_epoch"] >= 2
    a = runs.read_history(full)
    b = runs.read_history(killed)
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert strip(a) == strip(b)
    assert (full / "model.safetensors").read_bytes() == (killed / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_sigterm_stops_cleanly_with_a_resume_hint(bigger_npz, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(bigger_npz, run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "state" / "last.json").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if (run / "metrics.json").exists():
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130 and "--resume" in err and "Traceback" not in err
    _files_complete(run)


def test_written_files_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        io.write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == io._MODE
