"""Several things at once: a lab folder, a run folder and a feature-cache file have one writer
at a time (real processes, real file locks); a killed holder frees its lock at once; two
extractions into one cache file keep both sets of rows; read-only folders and full disks end
in one line with the previous files intact."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar4 import locks, models, runs
from cifar4.data import load
from cifar4.errors import LockedError, RunError
from cifar4.training import features

PY = sys.executable


@pytest.fixture
def npz(bigger_npz: Path) -> Path:
    return bigger_npz


def _wait_for(cond, timeout: float = 120.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _held_by(lock: Path, pid: int) -> bool:
    info = locks.holder(lock)
    return bool(info) and info.get("pid") == pid and locks.is_held(lock)


def _lab(npz: Path, lab_dir: Path, *extra: str) -> list[str]:
    """A lab of two short experiments (the tests that need it to last hold it with SIGSTOP)."""
    exps = []
    for name, model, epochs in (("small-mlp", "mlp-20", 2), ("small-cnn", "cnn", 4)):
        p = npz.parent / f"{name}.toml"
        p.write_text(f'name = "{name}"\ndescription = "test"\n[model]\nname = "{model}"\n'
                     f'[train]\nepochs = {epochs}\nbatch_size = 16\n')
        exps.append(str(p))
    return [PY, "-m", "cifar4", "lab", *exps, "--data", str(npz), "--lab-dir", str(lab_dir),
            "--report-dir", str(lab_dir / "report"), "-q", *extra]


def _one_line_error(err: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.startswith("cifar4: error")]
    assert len(lines) == 1 and "Traceback" not in err, err


# ---------------------------------------------------------------- the lock itself

HOLDER = textwrap.dedent("""
    import sys, time
    from cifar4 import locks
    with locks.hold(sys.argv[1], "the test's resource"):
        print("held", flush=True)
        time.sleep(600)
""")


def test_a_held_lock_names_its_holder_and_frees_at_once_when_the_holder_is_killed(tmp_path):
    lock = tmp_path / "thing.lock"
    proc = subprocess.Popen([PY, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert locks.is_held(lock)
        with pytest.raises(LockedError, match=f"in use by pid {proc.pid} since"), \
                locks.hold(lock, "the test's resource", wait=False):
            pass
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        t0 = time.monotonic()
        with locks.hold(lock, "the test's resource", wait=False):  # no stale lock
            assert locks.holder(lock)["pid"] == os.getpid()
        assert time.monotonic() - t0 < 1.0
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_is_reentrant_within_a_process(tmp_path):
    lock = tmp_path / "x.lock"
    with locks.hold(lock, "x", wait=False):
        with locks.hold(lock, "x", wait=False):  # the lab holding a folder its own runs use
            pass
        assert not locks.is_held(lock)  # held by us: not "another process"
    assert not locks.is_held(lock)


# ---------------------------------------------------------------- two labs on one folder

@pytest.mark.slow
def test_two_labs_on_one_folder_train_each_experiment_once(npz, tmp_path):
    lab_dir = tmp_path / "lab"
    first = subprocess.Popen(_lab(npz, lab_dir), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    _wait_for(lambda: _held_by(lab_dir / ".lock", first.pid), what="the first lab's lock")
    # Stopped, the first lab keeps its lock for as long as the test needs, on any machine's speed
    first.send_signal(signal.SIGSTOP)
    try:
        refused = subprocess.run(_lab(npz, lab_dir, "--no-wait"), capture_output=True, text=True)
        assert refused.returncode == 2
        _one_line_error(refused.stderr)
        assert f"lab folder '{lab_dir}' is in use by pid {first.pid}" in refused.stderr
        second = subprocess.Popen(_lab(npz, lab_dir), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(second.stderr.readline, "")), daemon=True)
        reader.start()
        _wait_for(lambda: any("waiting for lab folder" in line for line in lines), what="the second lab to wait")
    finally:
        first.send_signal(signal.SIGCONT)
    out1, err1 = first.communicate(timeout=300)
    second.wait(timeout=300)
    reader.join(timeout=10)
    err2 = "".join(lines)
    assert first.returncode == 0 and second.returncode == 0, (err1, err2)
    assert f"waiting for lab folder '{lab_dir}': in use by pid {first.pid}" in err2
    assert err1.count(": test accuracy") == 2  # the first trained both
    assert err2.count("finished before, kept") == 2  # the second trained nothing
    for name in ("small-mlp", "small-cnn"):
        m = runs.read_metrics(lab_dir / "runs" / name)
        assert m["resumed_from_epoch"] is None
    assert (lab_dir / "report" / "index.html").is_file()


@pytest.mark.slow
def test_a_lab_killed_while_holding_its_folder_is_continued_at_once(npz, tmp_path):
    lab_dir = tmp_path / "lab"
    first = subprocess.Popen(_lab(npz, lab_dir), stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    state = lab_dir / "runs" / "small-cnn" / "state" / "last.json"
    _wait_for(state.exists, what="an epoch of small-cnn")
    first.send_signal(signal.SIGKILL)
    first.wait()
    t0 = time.monotonic()
    again = subprocess.run(_lab(npz, lab_dir, "--no-wait"), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "finished before, kept" in again.stderr and "resuming after an interruption" in again.stderr
    assert time.monotonic() - t0 < 120
    for name in ("small-mlp", "small-cnn"):
        folder = lab_dir / "runs" / name
        assert runs.read_metrics(folder)["epochs"] >= 1
        assert not (folder / "state").exists()
        assert not list(folder.rglob("*.tmp"))


# ---------------------------------------------------------------- a run folder

@pytest.mark.slow
def test_resume_refuses_a_run_another_process_is_training(npz, tmp_path):
    run = tmp_path / "run"
    cmd = [PY, "-m", "cifar4", "train", "--data", str(npz), "--model", "cnn", "--epochs", "4",
           "--batch-size", "16", "--run-dir", str(run), "-q"]
    trainer = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for((run / "state" / "last.json").exists, what="the first epoch")
        trainer.send_signal(signal.SIGSTOP)  # mid-run, holding the run's lock while the test needs it
        listed = runs.list_runs(tmp_path)
        assert [r["status"] for r in listed if r["run"] == str(run)] == ["training"]
        res = subprocess.run([PY, "-m", "cifar4", "train", "--resume", str(run), "--data", str(npz)],
                             capture_output=True, text=True)
        assert res.returncode == 2
        _one_line_error(res.stderr)
        assert f"run '{run}' is in use by pid {trainer.pid}" in res.stderr
        over = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True)
        assert over.returncode == 2 and f"in use by pid {trainer.pid}" in over.stderr
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    assert [r["status"] for r in runs.list_runs(tmp_path) if r["run"] == str(run)] == ["unfinished"]
    res = subprocess.run([PY, "-m", "cifar4", "train", "--resume", str(run), "--data", str(npz), "-q",
                          "--json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["epochs"] == 4


# ---------------------------------------------------------------- one feature-cache file

EXTRACT = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from cifar4 import models
    from cifar4.training import features
    from cifar4.data import load
    torch.manual_seed(0)
    m = models.build("transfer", weights="none", resolution=32)
    ds = load(sys.argv[1])
    rows = np.arange(int(sys.argv[2]), int(sys.argv[3]))
    fs = features.features(m, ds, rows, ("plain",), torch.device("cpu"), "fp32")
    print(json.dumps({"extracted": fs.extracted, "cached": fs.cached, "file": fs.files[0]}))
""")


@pytest.mark.parametrize("a,b", [((0, 500), (500, 1000)), ((0, 700), (300, 1000))],
                         ids=["disjoint", "overlapping"])
def test_two_processes_filling_one_cache_file_keep_both_sets_of_rows(npz, tmp_path, monkeypatch, a, b):
    env = {**os.environ, "CIFAR4_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([PY, "-c", EXTRACT, str(npz), str(lo), str(hi)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for lo, hi in (a, b)]
    outs = []
    for p in procs:
        o, e = p.communicate(timeout=300)
        assert p.returncode == 0, e
        outs.append(json.loads(o))
    union = np.arange(min(a[0], b[0]), max(a[1], b[1]))
    assert sum(o["extracted"] for o in outs) == len(union)  # rows the other computed are read, not redone
    with np.load(outs[0]["file"]) as z:
        done, feats = z["done"], z["features"]
    assert done[union].all() and done.sum() == len(union)
    torch.manual_seed(0)
    m = models.build("transfer", weights="none", resolution=32)
    ds = load(npz)
    ref = features.extract(m, ds.X[union], False, torch.device("cpu"), "fp32")
    assert np.array_equal(feats[union], ref)
    assert not [p for p in Path(outs[0]["file"]).parent.iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_during_extraction_keeps_the_cache_file_as_it_was(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    m = models.build("transfer", weights="none", resolution=32)
    dev = torch.device("cpu")
    a = features.features(m, tiny, np.arange(20), ("plain",), dev, "fp32")
    before = Path(a.files[0]).read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(RunError, match="No space left on device"):
        features.features(m, tiny, np.arange(40), ("plain",), dev, "fp32")
    assert Path(a.files[0]).read_bytes() == before
    assert not [p for p in Path(a.files[0]).parent.iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_during_the_report_keeps_the_previous_report(tiny, tmp_path, monkeypatch):
    from cifar4 import lab
    from cifar4.lab.report import write_report
    entries = lab.run_lab(["mlp-20"], tiny, tmp_path / "lab", quick=True, progress=False)
    out = tmp_path / "report"
    write_report([(e.name, e.run_dir) for e in entries], tiny, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(RunError, match="No space left on device"):
        write_report([(e.name, e.run_dir) for e in entries], tiny, out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------- read-only folders

def _read_only(folder: Path, *cmd: str) -> subprocess.CompletedProcess:
    """Run `cmd` in a private mount namespace where `folder` is a read-only bind mount: root
    ignores permission bits, not a read-only mount."""
    script = ('mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"')
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
                           str(folder), *cmd], capture_output=True, text=True)


@pytest.fixture
def can_mount_read_only(tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    if not shutil.which("unshare"):
        pytest.skip("no 'unshare' command to make a read-only mount")
    r = _read_only(probe, "touch", str(probe / "x"))
    if "Read-only file system" not in r.stderr:
        pytest.skip(f"cannot make a read-only bind mount here ({r.stderr.strip()[:120]})")


@pytest.mark.slow
def test_read_only_folders_give_one_line_and_keep_their_files(npz, tmp_path, can_mount_read_only):
    lab_dir = tmp_path / "lab"
    subprocess.run(_lab(npz, lab_dir), check=True, capture_output=True)
    before = {p: p.read_bytes() for p in lab_dir.rglob("*") if p.is_file()}
    again = _read_only(lab_dir, *_lab(npz, lab_dir))
    assert again.returncode == 2, again.stderr
    _one_line_error(again.stderr)
    assert "Read-only file system" in again.stderr
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    train = _read_only(runs_dir, PY, "-m", "cifar4", "train", "--data", str(npz), "--model", "mlp-20",
                       "--epochs", "1", "--runs-dir", str(runs_dir), "-q")
    assert train.returncode == 2
    _one_line_error(train.stderr)
    assert "Read-only file system" in train.stderr or "not writable" in train.stderr
    assert {p: p.read_bytes() for p in lab_dir.rglob("*") if p.is_file()} == before
