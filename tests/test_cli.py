"""The command line: every command works from a fresh directory, and every bad input is one
line on stderr with exit code 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cifar4.cli import main

COMMANDS = [[], ["train"], ["evaluate"], ["predict"], ["runs"], ["models"], ["summary"],
            ["experiments"], ["data"], ["data", "fetch"], ["data", "info"], ["data", "show"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_help_reads_well(cmd, capsys):
    assert main([*cmd, "--help"]) == 0
    text = capsys.readouterr().out
    assert "Usage: cifar4" in text and "Traceback" not in text


def run_cli(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_train_evaluate_predict_runs(tiny_npz, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["train", "--data", str(tiny_npz), "--model", "cnn", "--epochs", "3",
                              "--batch-size", "32", "--json", "-q"], capsys)
    assert code == 0, err
    m = json.loads(out)
    assert m["epochs"] == 3 and m["model"] == "cnn" and m["run_dir"].startswith("runs/cnn-")
    run = m["run_dir"]
    code, out, _ = run_cli(["evaluate", run, "--data", str(tiny_npz), "--json"], capsys)
    assert code == 0 and json.loads(out)["test"]["accuracy"] == pytest.approx(m["test_accuracy"])
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(img)
    code, out, _ = run_cli(["predict", run, str(img), "--json"], capsys)
    assert code == 0 and json.loads(out)[0]["label"] in ("bird", "cat", "frog", "horse")
    code, out, _ = run_cli(["runs", "--json"], capsys)
    assert json.loads(out)[0]["run"] == run
    code, out, _ = run_cli(["train", "--data", str(tiny_npz), "--model", "mlp-20", "--epochs", "1",
                            "--no-scale", "--name", "raw", "-q"], capsys)
    assert code == 0 and "run directory: runs/raw-" in out


def test_summary_models_experiments_data(tiny_npz, tmp_path, capsys):
    code, out, _ = run_cli(["summary", "mlp-deep"], capsys)
    assert code == 0 and "Total params: 4,492,420" in out
    assert run_cli(["models"], capsys)[1].count("the session's") == 3
    assert "cnn" in run_cli(["experiments"], capsys)[1]
    code, out, _ = run_cli(["data", "info", "--data", str(tiny_npz), "--json"], capsys)
    assert json.loads(out)["images"] == 240
    code, out, _ = run_cli(["data", "show", "--data", str(tiny_npz), "--out", str(tmp_path / "s.png")], capsys)
    assert code == 0 and (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


BAD = {
    "zero epochs": ["train", "-e", "cnn", "--epochs", "0"],
    "negative batch": ["train", "-e", "cnn", "--batch-size", "-5"],
    "not a number": ["train", "-e", "cnn", "--epochs", "many"],
    "nothing to train": ["train", "--epochs", "3"],
    "unknown model": ["train", "--model", "vgg99"],
    "unknown optimizer": ["train", "-e", "cnn", "--optimizer", "lbfgs"],
    "unknown split": ["train", "-e", "cnn", "--split", "random"],
    "unknown flag": ["train", "--epoch", "3"],
    "preset and experiment": ["train", "--preset", "cnn", "--experiment", "cnn"],
    "missing experiment file": ["train", "--experiment", "nope.toml"],
    "resume with options": ["train", "--resume", "x", "--epochs", "3"],
    "missing data": ["data", "info", "--data", "/nonexistent/file.npz"],
    "missing run": ["evaluate", "/nonexistent/run"],
    "predict missing run": ["predict", "/nonexistent/run", "a.png"],
    "unknown summary model": ["summary", "resnet"],
    "unknown command": ["fly"],
    "unknown fetch source": ["data", "fetch", "--source", "ftp", "--out", "/tmp/x"],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_exit_2(case, capsys, tiny_npz, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CIFAR4_DATA", str(tiny_npz))
    code, out, err = run_cli(BAD[case], capsys)
    assert code == 2, (out, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err


def test_bad_data_file_through_cli(tmp_path, capsys):
    p = tmp_path / "bad.npz"
    np.savez(p, X=np.zeros((5, 32, 32), np.uint8), Y=np.zeros(5, np.int64))
    code, _, err = run_cli(["train", "-e", "cnn", "--data", str(p), "--epochs", "1"], capsys)
    assert code == 2 and "expected (N, 32, 32, 3)" in err and str(p) in err


def test_console_script_exit_code_and_debug(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cifar4", "data", "info", "--data", str(tmp_path / "x.npz")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    r = subprocess.run([sys.executable, "-m", "cifar4", "--debug", "data", "info", "--data",
                        str(tmp_path / "x.npz")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_version_and_completion(capsys):
    from cifar4 import __version__
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"cifar4 {__version__}"
    code, out, _ = run_cli(["--help"], capsys)
    assert "--install-completion" in out and "--show-completion" in out


def test_help_is_grouped_at_the_terminal_width_without_escapes(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    code, out, _ = run_cli(["--help"], capsys)
    panels = [p for p in ("Train", "Use a model", "Look at runs", "Data") if f"─ {p} ─" in out]
    assert code == 0 and len(panels) == 4, out
    assert out.index("─ Train ─") < out.index(" train ") < out.index("─ Use a model ─") < out.index(" predict ")
    for cmd in (["--help"], ["train", "--help"], ["runs", "--help"], ["sweep", "--help"]):
        text = run_cli(cmd, capsys)[1]
        assert "\\[" not in text and "[default: runs]" in run_cli(["runs", "--help"], capsys)[1]
        assert max(len(line) for line in text.splitlines()) == 100, cmd
    assert "sweep table" in run_cli(["sweep", "--help"], capsys)[1]


TYPOS = {
    "command": (["trian"], "'train'"),
    "option": (["train", "--epoch", "3"], "'--epochs'"),
    "choice": (["train", "--optimizer", "adamm"], "'adam'"),
    "choice of data fetch": (["data", "fetch", "--source", "npmm"], "'npm'"),
    "model": (["train", "--model", "cnnn"], "'cnn'"),
    "experiment": (["train", "-e", "cnnn"], "'cnn'"),
    "experiment key": (["train", "-e", "cnn", "--set", "train.lrr=0.1"], "'train.lr'"),
    "experiment value": (["train", "-e", "cnn", "--set", "train.optimizer='sgdd'"], "'sgd'"),
}


@pytest.mark.parametrize("case", sorted(TYPOS))
def test_a_typo_gets_one_suggestion(case, capsys):
    args, near = TYPOS[case]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.lower().count("did you mean") == 1 and f"did you mean {near}?" in err.lower(), err
    if case.startswith("choice"):
        assert f"'{args[-2]}'" in err and "is not one of" in err  # the flag and its choices


def test_fixed_choices_are_listed_in_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    text = " ".join(run_cli(["train", "--help"], capsys)[1].replace("│", " ").split())
    for choices in ("adam, sgd, rmsprop", "session, stratified, official", "auto, cpu, cuda",
                    "auto, fp32, bf16, bf16-matmul-wgrad"):
        assert f"Choices: {choices}." in text
    assert "Choices: median, hyperband, none." in run_cli(["sweep", "--help"], capsys)[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny finished run evaluated with one test-time view (its mirror), and its data file."""
    from conftest import save_tiny
    root = tmp_path_factory.mktemp("trained")
    npz = save_tiny(root / "cifar4.npz")
    for seed in ("0", "1"):
        assert main(["train", "--data", str(npz), "-e", "cnn", "--epochs", "1", "--set", "train.tta=1",
                     "--seed", seed, "--name", f"cnn{seed}", "--runs-dir", str(root / "runs"), "-q", "--json"]) == 0
    return sorted((root / "runs").iterdir())[0], npz


def test_tta_defaults_to_the_runs_setting_in_predict(trained, tmp_path, capsys):
    from cifar4.serving.predict import predict
    run, _ = trained
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(img)
    capsys.readouterr()
    code, out, _ = run_cli(["predict", str(run), str(img), "--json"], capsys)
    got = json.loads(out)[0]["probabilities"]
    assert code == 0 and got == pytest.approx(predict(run, [img], tta=1)[0].probabilities, abs=1e-6)
    assert got != pytest.approx(predict(run, [img], tta=0)[0].probabilities, abs=1e-6)
    code, out, _ = run_cli(["predict", str(run), str(img), "--json", "--tta", "0"], capsys)
    assert json.loads(out)[0]["probabilities"] == pytest.approx(predict(run, [img], tta=0)[0].probabilities, abs=1e-6)


def test_deprecated_spellings_work_and_warn(trained, tmp_path, capsys):
    run, npz = trained
    capsys.readouterr()
    other = next(p for p in run.parent.iterdir() if p != run)
    code, out, err = run_cli(["ensemble", str(run), str(other), "--weights", "0.25,0.75", "--data", str(npz),
                              "--runs-dir", str(tmp_path), "--json"], capsys)
    assert code == 0 and err.strip() == "'--weights' is deprecated; use '--member-weights'", err
    assert json.loads(out)["model_options"]["weights"] == [0.25, 0.75]
    code, out, err = run_cli(["export", str(run), "--no-tta", "--data", str(npz), "--out",
                              str(tmp_path / "a.onnx"), "--json"], capsys)
    assert code == 0 and json.loads(out)["tta"] == 0 and err.strip() == "'--no-tta' is deprecated; use '--tta 0'"
    code, out, err = run_cli(["export", str(run), "--tta", "--data", str(npz), "--out",
                              str(tmp_path / "b.onnx"), "--json"], capsys)
    assert code == 0 and json.loads(out)["tta"] == 1
    assert err.strip() == "'--tta' is deprecated; use '--tta 1' or '--tta 2'"
    code, out, err = run_cli(["export", str(run), "--tta", "2", "--data", str(npz), "--out",
                              str(tmp_path / "c.onnx"), "--json"], capsys)
    assert code == 0 and json.loads(out)["tta"] == 2 and err == ""
    code, _, err = run_cli(["serve", "--lab", str(tmp_path / "nolab")], capsys)
    assert code == 2 and err.splitlines()[0] == "'--lab' is deprecated; use '--lab-dir'" and "nolab" in err
    code, _, err = run_cli(["data", "fetch", "--out", str(tmp_path), "--archive", str(tmp_path / "no.tgz")], capsys)
    assert code == 2 and err.splitlines()[0] == "'--out' is deprecated; use '--out-dir'" and "no.tgz" in err


def test_one_name_one_meaning_in_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    helps = {c: run_cli([*c.split(), "--help"], capsys)[1] for c in
             ("evaluate", "predict", "export", "ensemble", "serve", "sweep", "lab", "compare", "data fetch")}
    for c in ("evaluate", "predict", "export"):
        assert "--tta" in helps[c] and "(default: the run's setting)" in helps[c] and "--no-tta" not in helps[c]
    assert "--member-weights" in helps["ensemble"] and "--weights" not in helps["ensemble"]
    assert "--out-dir" in helps["data fetch"] and "--out " not in helps["data fetch"]
    assert "--lab-dir" in helps["serve"] and "--lab " not in helps["serve"]
    assert all("-q" in helps[c] for c in ("predict", "sweep", "lab", "data fetch")) and "--progress" in helps["sweep"]
    for c in ("evaluate", "predict", "export", "ensemble", "serve", "compare"):
        assert " RUN " in helps[c] and "RUN_DIRS" not in helps[c] and "MEMBERS" not in helps[c], c


def test_bare_train_shows_usage_and_examples_and_trains_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["train"], capsys)
    assert code == 0 and err == "" and out.startswith("Usage: cifar4 train") and "cifar4 train -e cnn" in out
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("COLUMNS", "200")
    text = " ".join(run_cli(["train", "--help"], capsys)[1].replace("│", " ").split())
    assert "--model NAME alone trains experiment NAME's recipe where one exists" in text


def test_model_trains_the_experiment_of_that_name_and_says_so(tiny_npz, tmp_path, capsys):
    import tomllib
    from pathlib import Path

    from cifar4 import config
    common = ["--data", str(tiny_npz), "--epochs", "1", "--runs-dir", str(tmp_path), "-q", "--json"]

    def config_of(out):
        return tomllib.loads((Path(json.loads(out)["run_dir"]) / "config.toml").read_text())
    code, out, err = run_cli(["train", "--model", "mlp-deep", *common], capsys)
    assert code == 0 and "training experiment 'mlp-deep'" in err
    assert config_of(out).get("description") == config.load("mlp-deep").description != ""
    code, out, err = run_cli(["train", "--set", "model.name=mlp-deep", *common], capsys)
    assert code == 0 and "training experiment" not in err and not config_of(out).get("description")


def test_summary_shows_the_net_that_train_builds(capsys, tmp_path):
    from cifar4 import config, models
    for name in ("fast", "fast-15", "cnn"):
        exp = config.from_flags(name)
        n = sum(models.count_params(models.build(exp.model.name, **exp.model.options)))
        code, out, _ = run_cli(["summary", name, "--out", str(tmp_path / "s.txt")], capsys)
        assert code == 0 and f"Total params: {n:,}" in out
        assert f"Total params: {n:,}" in (tmp_path / "s.txt").read_text()
    bare = sum(models.count_params(models.build("fast")))
    assert f"{bare:,}" not in run_cli(["summary", "fast"], capsys)[1]
    assert "widths=[24, 64, 128]" in run_cli(["summary", "fast"], capsys)[1]  # a fallback, with its count


def test_every_function_in_the_cli_is_short():
    import ast
    import inspect

    import cifar4.cli as cli
    tree = ast.parse(inspect.getsource(cli))
    long = [(f.name, f.end_lineno - f.lineno + 1) for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef) and f.end_lineno - f.lineno + 1 >= 80]
    assert long == []


def _column(text: str, i: int) -> str:
    """Column i of a rich table's body, its folded lines joined."""
    return "".join(line.split("│")[i].strip() for line in text.splitlines() if line.count("│") > i)


def test_tables_fold_what_users_copy_at_80_columns(trained, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    run, npz = trained
    text = run_cli(["runs", "--runs-dir", str(run.parent)], capsys)[1]
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("run "))
    width = lines[head].index(" model")  # the run column, folded onto as many lines as it needs
    assert str(run) in "".join(line[:width].strip() for line in lines[head + 1:]) and "…" not in text, text
    assert "status" in text and "finished" in text and all(len(line) <= 80 for line in lines)
    lines = run_cli(["compare", *map(str, sorted(run.parent.iterdir()))], capsys)[1].splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("run "))
    width = lines[head].index(" model")
    assert str(run) in "".join(line[:width].strip() for line in lines[head + 1:])
    info = json.loads(run_cli(["data", "info", "--data", str(npz), "--json"], capsys)[1])
    text = run_cli(["data", "info", "--data", str(npz)], capsys)[1]
    checksum = info["X_sha256"]
    assert checksum in _column(text, 2) and "…" not in text, text


def test_runs_leave_out_empty_columns(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    (tmp_path / "cnn-20261206-000000").mkdir()  # a run that never got further than its folder
    text = run_cli(["runs", "--runs-dir", str(tmp_path)], capsys)[1]
    assert "status" in text and "incomplete" in text and "acc" not in text and "params" not in text


def test_experiments_are_grouped_one_line_each_within_80_columns(capsys, monkeypatch):
    from cifar4 import config
    monkeypatch.setenv("COLUMNS", "80")
    text = run_cli(["experiments"], capsys)[1]
    lines = text.splitlines()
    names = config.builtin_names()
    assert all(len(line) <= 80 for line in lines) and len(lines) == len(names) + 5 + lines.count("others"), text
    order = [text.index(g) for g in ("the practical session", "fast nets", "transfer learning", "ensembles", "sweeps")]
    assert order == sorted(order)
    assert text.index("fast-long") > text.index("ensembles") and text.index("cnn-augmented-sweep") > order[-1]
    assert text.index(" mlp-raw ") < text.index(" cnn ")  # the session's order, not the alphabet's
    rows = json.loads(run_cli(["experiments", "--json"], capsys)[1])
    assert {r["experiment"] for r in rows} == set(names) and all(r["description"] for r in rows)


def test_predict_errors_have_their_own_column(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "150")
    run, _ = trained
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(good)
    bad.write_bytes(b"not an image")
    code, out, _ = run_cli(["predict", str(run), str(good), str(bad)], capsys)
    header = next(line for line in out.splitlines() if "image" in line)
    cells = [c.strip() for c in header.replace("┃", "│").split("│")]
    bad_row = next(line for line in out.splitlines() if "bad.png" in line).split("│")
    assert code == 2 and cells[-2] == "error" and bad_row[-2].strip() and bad_row[cells.index("bird")].strip() == ""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupt_names_the_run_folder_to_resume(sig, bigger_npz, tmp_path):
    import signal
    import time
    runs = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "cifar4", "train", "--data", str(bigger_npz), "-e", "cnn",
                             "--epochs", "40", "--batch-size", "16", "--runs-dir", str(runs), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(runs.glob("*/state/last.json")):
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    run = next(runs.iterdir())
    assert proc.returncode == 130 and f"cifar4 train --resume {run}'" in err and "Traceback" not in err, err
