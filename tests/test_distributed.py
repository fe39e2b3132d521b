"""Data-parallel training under torchrun: 2 gloo processes on the CPU, on one node or as two
nodes meeting through a c10d rendezvous, train one run folder with the same number of steps as
one process, and a history that matches it closely; a killed data-parallel run resumes under
torchrun."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def npz(bigger_npz: Path) -> Path:
    return bigger_npz


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[Path, Path, dict]:
    """The data (as bigger_npz), and the one-process run every data-parallel run is compared to."""
    from conftest import make_arrays
    root = tmp_path_factory.mktemp("one")
    X, Y, t = make_arrays(1200, seed=3)
    np.savez(root / "d.npz", X=X, Y=Y, is_test=t)
    r = subprocess.run(_train(root / "d.npz", root / "one", "--json"), capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "d.npz", root / "one", json.loads(r.stdout)


def _train(npz: Path, run_dir: Path, *extra: str, nproc: int = 1, epochs: int = 3) -> list[str]:
    cmd = ["-m", "cifar4", "train", "--model", "cnn", "--epochs", str(epochs), "--batch-size", "32",
           "--precision", "fp32", "--data", str(npz), "--run-dir", str(run_dir), "-q", *extra]
    if nproc == 1:
        return [PY, *cmd]
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *cmd]


def _history(run: Path) -> list[dict]:
    with open(run / "history.csv") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _trains_like_one_process(one: Path, m1: dict, two: Path, m2: dict) -> None:
    assert m2["iterations"] == m1["iterations"] and m2["epochs"] == m1["epochs"] == 3
    # The ranks see exactly the batches one process sees (same order and augmentation), and the
    # averaged gradient of two half-batches equals the full batch's; what differs is the order
    # of floating-point sums in the all-reduce, so losses agree to 1e-4 relative, not bit for bit.
    for a, b in zip(_history(one), _history(two), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4, abs=1e-6)
        assert abs(b["accuracy"] - a["accuracy"]) <= 1 / m1["split"]["train"]
    assert m2["test_accuracy"] == pytest.approx(m1["test_accuracy"], abs=2 / m1["split"]["test"])
    assert not (two / "state").exists() and (two / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_gloo_processes_train_like_one(one_process, tmp_path):
    npz, one, m1 = one_process
    two = subprocess.run(_train(npz, tmp_path / "two", "--json", nproc=2), capture_output=True, text=True, env=ENV)
    assert two.returncode == 0, two.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["two"]  # one folder per run
    _trains_like_one_process(one, m1, tmp_path / "two", json.loads(two.stdout))  # only rank 0 prints


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_meeting_through_a_c10d_rendezvous_train_like_one_process(one_process, tmp_path):
    """Two torchrun agents, one process each, as two machines would start them (the shared
    folder stands for the first machine's disk: only rank 0 writes the run)."""
    npz, one, m1 = one_process
    port, rdzv_id = _free_port(), uuid.uuid4().hex[:12]
    cmd = _train(npz, tmp_path / "two", "--json")[1:]  # python -m cifar4 train ... -> -m cifar4 train ...
    nodes = [subprocess.Popen([PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(rank), "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rdzv_id,
                               "--rdzv-conf", "join_timeout=120", "--local-addr", "127.0.0.1", *cmd],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for rank in (0, 1)]
    try:
        outs = [n.communicate(timeout=600) for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    assert [n.returncode for n in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    printed = [o for o, _ in outs if o.strip()]
    assert len(printed) == 1  # rank 0 (whichever node the rendezvous made it) prints
    assert [p.name for p in tmp_path.iterdir()] == ["two"]  # one run folder for the whole job
    _trains_like_one_process(one, m1, tmp_path / "two", json.loads(printed[0]))


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


def test_a_process_that_joined_a_group_ends_with_its_atexit_handlers_run_and_its_output_flushed(tmp_path):
    """`exit_process` skips the interpreter's shutdown (where gloo's worker threads can abort a
    finished process) but not what a normal exit does for the program: the atexit handlers run,
    buffered output reaches its pipe, and the exit code is the one given."""
    marker = tmp_path / "atexit-ran"
    code = ("import atexit, pathlib, sys\n"
            "from cifar4.training.distributed import exit_process\n"
            f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'yes')\n"
            "sys.stdout.write('{\"buffered\": true}')\n"  # no newline: still in the buffer
            "sys.stderr.write('to stderr')\n"
            "exit_process(3)\n"
            "print('never printed')\n")
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3
    assert r.stdout == '{"buffered": true}' and r.stderr == "to stderr"
    assert marker.read_text() == "yes"
