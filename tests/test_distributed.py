"""Data-parallel training under torchrun: 2 gloo processes on the CPU train one run folder with
the same number of steps as one process, and a history that matches it closely; a killed
data-parallel run resumes under torchrun."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PY = sys.executable


@pytest.fixture
def npz(bigger_npz: Path) -> Path:
    return bigger_npz


def _train(npz: Path, run_dir: Path, *extra: str, nproc: int = 1, epochs: int = 3) -> list[str]:
    cmd = ["-m", "cifar4", "train", "--model", "cnn", "--epochs", str(epochs), "--batch-size", "32",
           "--precision", "fp32", "--data", str(npz), "--run-dir", str(run_dir), "-q", *extra]
    if nproc == 1:
        return [PY, *cmd]
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *cmd]


def _history(run: Path) -> list[dict]:
    with open(run / "history.csv") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


@pytest.mark.slow
def test_two_gloo_processes_train_like_one(npz, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(_train(npz, tmp_path / "one", "--json"), capture_output=True, text=True, env=env)
    two = subprocess.run(_train(npz, tmp_path / "two", "--json", nproc=2), capture_output=True, text=True, env=env)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    m1, m2 = json.loads(one.stdout), json.loads(two.stdout)  # only rank 0 prints
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["one", "two"]  # one folder per run
    assert m2["iterations"] == m1["iterations"] and m2["epochs"] == m1["epochs"] == 3
    # The ranks see exactly the batches one process sees (same order and augmentation), and the
    # averaged gradient of two half-batches equals the full batch's; what differs is the order
    # of floating-point sums in the all-reduce, so losses agree to 1e-4 relative, not bit for bit.
    for a, b in zip(_history(tmp_path / "one"), _history(tmp_path / "two"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4, abs=1e-6)
        assert abs(b["accuracy"] - a["accuracy"]) <= 1 / m1["split"]["train"]
    assert m2["test_accuracy"] == pytest.approx(m1["test_accuracy"], abs=2 / m1["split"]["test"])
    assert not (tmp_path / "two" / "state").exists() and (tmp_path / "two" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_killed_data_parallel_run_resumes_under_torchrun(npz, tmp_path):
    run = tmp_path / "run"
    # 8 epochs: the job is killed within 0.2 s of its first epoch's state, 7 epochs before its end
    proc = subprocess.Popen(_train(npz, run, nproc=2, epochs=8), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    end = time.monotonic() + 240
    while time.monotonic() < end and not (run / "state" / "last.json").exists():
        time.sleep(0.2)
    # A crash of the whole job: torchrun and its workers (which run in sessions of their own).
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(["pkill", "-9", "-f", "--", f"--run-dir {run}"], check=False)
    end = time.monotonic() + 30
    while time.monotonic() < end and subprocess.run(["pgrep", "-f", "--", f"--run-dir {run}"],
                                                    capture_output=True).returncode == 0:
        time.sleep(0.1)
    assert (run / "state" / "last.json").exists() and not (run / "metrics.json").exists()
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "cifar4",
                        "train", "--resume", str(run), "--data", str(npz), "--json", "--epochs", "30"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "cannot be combined with --epochs" in r.stderr  # resume keeps its config
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "cifar4",
                        "train", "--resume", str(run), "--data", str(npz), "--json", "-q"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout)
    assert m["epochs"] == 8 and m["resumed_from_epoch"] >= 1 and len(_history(run)) == 8
