"""Sweeps on Optuna: the search space as schema-checked data, validation accuracy as the only
objective (the test split held out until the best trial is chosen), several worker processes on
one study (a local file, and PostgreSQL when a server answers), a killed worker's trial failed
by the heartbeat, and `sweep show`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from cifar4 import config
from cifar4.errors import ConfigError

optuna = pytest.importorskip("optuna")
from cifar4.lab import sweep as sw  # noqa: E402

PY = sys.executable
PG_URL = os.environ.get("CIFAR4_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

SPACE = """
name = "sw"
description = "test sweep"
[model]
name = "mlp-deep"
options = {{ hidden = [32, 16] }}
[train]
epochs = {epochs}
batch_size = 16
[sweep]
"train.lr" = {{ log_uniform = [1e-4, 1e-2] }}
"model.options.dropout" = {{ uniform = [0.0, 0.5] }}
"train.batch_size" = {{ choice = [16, 32] }}
"""


@pytest.fixture
def setup(tmp_path):
    from conftest import make_arrays
    X, Y, t = make_arrays(600, seed=5)
    npz = tmp_path / "d.npz"
    np.savez(npz, X=X, Y=Y, is_test=t)
    exp = tmp_path / "sw.toml"
    exp.write_text(SPACE.format(epochs=3))
    return tmp_path, npz, exp


def _cmd(exp: Path, npz: Path, root: Path, trials: int, *extra: str) -> list[str]:
    return [PY, "-m", "cifar4", "sweep", str(exp), "--trials", str(trials), "--data", str(npz),
            "--sweeps-dir", str(root / "sweeps"), "--json", *extra]


def _finished(study) -> list:
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))


def test_the_search_space_is_checked_by_the_schema():
    base = {"name": "x", "model": {"name": "mlp-deep"}}
    for sweep, match in [({"train.lrr": {"uniform": [0, 1]}}, "no such key 'train.lrr'"),
                         ({"train.lr": {"uniform": [0.1, 0.01]}}, "empty or reversed"),
                         ({"train.lr": {"log_uniform": [0.1, 0.1]}}, "empty or reversed"),
                         ({"train.batch_size": {"choice": []}}, "choice is empty"),
                         ({"train.lr": {"uniform": [0, 1], "choice": [1]}}, "exactly one"),
                         ({"train.lr": {"normal": [0, 1]}}, "unknown key"),
                         ({"model.options.nope": {"choice": [1]}}, "no option nope"),
                         ({"train.batch_size": {"choice": [0, 32]}}, "greater than 0")]:
        with pytest.raises(ConfigError, match=match):
            config.from_dict({**base, "sweep": sweep})
    for name in ("mlp-regularized-sweep", "cnn-augmented-sweep"):
        assert len(config.load(name).sweep) == 4


def test_a_trial_is_the_experiment_with_its_sampled_values(setup):
    exp = config.load(setup[2])
    t = sw.trial_experiment(exp, {"train.lr": 0.003, "model.options.dropout": 0.25, "train.batch_size": 32}, 7)
    assert (t.train.lr, t.model.options["dropout"], t.train.batch_size, t.name) == (0.003, 0.25, 32, "sw-trial-7")
    assert t.sweep == {}


def test_a_sweep_optimizes_validation_and_holds_the_test_split_out(setup, capsys):
    root, npz, exp = setup
    from cifar4.data import load
    ds = load(npz)
    res = sw.sweep(config.load(exp), ds, trials=3, sweeps_dir=root / "sweeps")
    assert res.finished == 3 and (root / "sweeps" / "sw" / "study.db").is_file()
    study = optuna.load_study(study_name="sw", storage=res.storage)
    for t in study.trials:
        m = json.loads((Path(t.user_attrs["run_dir"]) / "metrics.json").read_text())
        assert m["val_accuracy"] == t.value and m["test_accuracy"] is None and m["held_out_test"]
        assert sorted(t.intermediate_values) == [1, 2, 3]  # validation reported every epoch
    best = res.best
    assert best["val_accuracy"] == max(t.value for t in study.trials) and 0 <= best["test_accuracy"] <= 1
    assert study.user_attrs["best_test"] == {"number": best["number"], "test_accuracy": best["test_accuracy"]}
    from cifar4.cli import main
    assert main(["sweep", "show", "sw", "--sweeps-dir", str(root / "sweeps"), "--data", str(npz)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy of the best trial, computed once after the search" in out
    assert (root / "sweeps" / "sw" / "optimization_history.png").is_file()
    again = sw.sweep(config.load(exp), ds, trials=3, sweeps_dir=root / "sweeps")
    assert again.finished == 3 and len(optuna.load_study(study_name="sw", storage=res.storage).trials) == 3


def test_sweep_errors_are_one_line(setup, capsys):
    root, npz, exp = setup
    from cifar4.cli import main
    assert main(["sweep", "cnn", "--trials", "2", "--data", str(npz), "--sweeps-dir", str(root)]) == 2
    assert main(["sweep", "show", "nothing", "--sweeps-dir", str(root)]) == 2
    assert main(["sweep", str(exp), "--trials", "1", "--data", str(npz), "--storage", "nosuchdb://x",
                 "--sweeps-dir", str(root)]) == 2
    err = capsys.readouterr().err
    assert "no [sweep] table" in err and "no sweep 'nothing'" in err and "cannot open it" in err
    assert err.count("cifar4: error") == 3 and "Traceback" not in err


def _two_workers(cmd: list[str]) -> list[dict]:
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = []
    for p in procs:
        o, e = p.communicate(timeout=600)
        assert p.returncode == 0, e[-2000:]
        outs.append(json.loads(o))
    return outs


def _check_study(study, trials: int) -> None:
    done = _finished(study)
    # --trials N finishes N: a worker starts a trial only while finished + running < N
    assert len(done) == trials and len(study.trials) == trials, [(t.number, t.state.name) for t in study.trials]
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    dirs = [t.user_attrs["run_dir"] for t in study.trials]
    assert len(dirs) == len(set(dirs))  # one run folder per trial, none shared
    for t in done:
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert json.loads((Path(t.user_attrs["run_dir"]) / "metrics.json").read_text())["val_accuracy"] == t.value


RACE_WORKER = """
import sys, time
import optuna
from cifar4 import locks
from cifar4.lab import sweep as sw
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name="race", storage=sys.argv[1])
sw._run_trials(study, lambda t: (time.sleep(0.02), t.suggest_float("x", 0, 1))[1], int(sys.argv[2]),
               None, 30.0, turn=lambda: locks.hold(sys.argv[3], "race"))
"""


def test_workers_that_finish_together_start_no_trial_past_the_count(tmp_path):
    """Four workers with trials of a few hundredths of a second: without one snapshot of the
    study per count and a turn to count and start, about every other study ended with 13 or 14."""
    for round_ in range(2):
        url = f"sqlite:///{tmp_path / f'race{round_}.db'}"
        optuna.create_study(study_name="race", storage=url)
        cmd = [PY, "-c", RACE_WORKER, url, "12", str(tmp_path / "trials.lock")]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
        for p in procs:
            _, e = p.communicate(timeout=120)
            assert p.returncode == 0, e[-2000:]
        study = optuna.load_study(study_name="race", storage=url)
        assert [t.state.name for t in study.trials] == ["COMPLETE"] * 12


@pytest.mark.slow
def test_two_workers_share_one_study_in_a_file(setup):
    root, npz, exp = setup
    outs = _two_workers(_cmd(exp, npz, root, 5))  # odd: the last trial is one worker's alone
    study = optuna.load_study(study_name="sw", storage=outs[0]["storage"])
    _check_study(study, 5)
    assert [o["finished"] for o in outs] == [5, 5]  # each worker waited for the other's last trial
    assert {o["storage"] for o in outs} == {sw.default_storage(root / "sweeps" / "sw")}


@pytest.mark.slow
def test_a_killed_workers_trial_ends_failed_and_the_command_continues(setup):
    root, npz, exp = setup
    exp.write_text(SPACE.format(epochs=40))  # a trial long enough to be killed in the middle
    worker = subprocess.Popen(_cmd(exp, npz, root, 3, "--heartbeat", "1"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    storage = sw.default_storage(root / "sweeps" / "sw")
    end = time.monotonic() + 120
    while time.monotonic() < end:
        time.sleep(0.5)
        if (root / "sweeps" / "sw" / "trial-0000" / "state" / "last.json").exists():
            break
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    killed = optuna.load_study(study_name="sw", storage=storage).trials[0]
    assert killed.state == optuna.trial.TrialState.RUNNING  # until the heartbeat says otherwise
    exp.write_text(SPACE.format(epochs=40).replace("epochs = 40", "epochs = 2"))
    r = subprocess.run(_cmd(exp, npz, root, 3, "--heartbeat", "1"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    study = optuna.load_study(study_name="sw", storage=storage)
    assert study.trials[0].state == optuna.trial.TrialState.FAIL
    assert len(_finished(study)) == 3


def _postgres_or_skip() -> None:
    try:
        import psycopg
        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=3):
            pass
    except Exception as e:  # no driver, no server: the reason is the skip message
        pytest.skip(f"no PostgreSQL answers at 127.0.0.1:5432/test ({type(e).__name__}: {str(e)[:80]})")


@pytest.mark.slow
def test_two_workers_share_one_study_in_postgresql(setup):
    _postgres_or_skip()
    root, npz, exp = setup
    study_name = f"cifar4-test-{uuid.uuid4().hex[:8]}"
    try:
        outs = _two_workers(_cmd(exp, npz, root, 5, "--storage", PG_URL, "--study", study_name))
        assert outs[0]["storage"] == PG_URL
        _check_study(optuna.load_study(study_name=study_name, storage=PG_URL), 5)
    finally:
        optuna.delete_study(study_name=study_name, storage=PG_URL)
