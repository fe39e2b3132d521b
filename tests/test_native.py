"""The compiled pooling kernel (models/native.py): the library's numbers bit for bit, used by the
session CNN's training on a CPU, and a run that cannot build it says why and trains anyway."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cifar4.models import native
from cifar4.models.layers import MaxPooling2D


@pytest.fixture(scope="module")
def kernels():
    if native._compiler() is None:
        pytest.skip("no C++ compiler on this machine: the compiled kernel cannot be built here")
    status = native.load()
    assert status.compiled, status.reason  # with a compiler, a failed build is a bug
    return native.ops()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
def test_the_compiled_pool_gives_the_librarys_values_and_gradients_exactly(kernels, dtype, relu):
    """Ties (values rounded to halves), clipped zeros, a NaN, odd maps (their last row and column
    get no gradient), float32 and bf16; the outputs and gradients stay channels_last."""
    torch.manual_seed(0)
    for shape in ((4, 8, 28, 28), (3, 16, 13, 13), (2, 5, 9, 11), (100, 64, 12, 12)):
        x = ((torch.randn(*shape) * 2).round() / 2).to(dtype)
        x[0, 0, 1, 1] = float("nan")
        x = x.contiguous(memory_format=torch.channels_last)
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        got = MaxPooling2D(activation="relu" if relu else None)(a)
        assert "_PoolByteIndices" in type(got.grad_fn).__name__
        want = F.max_pool2d(b, 2)
        want = torch.relu(want) if relu else want
        g = torch.randn_like(want)
        (ga,), (gb,) = torch.autograd.grad(got, a, g), torch.autograd.grad(want, b, g)
        assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0)) and torch.equal(ga, gb), shape
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert ga.is_contiguous(memory_format=torch.channels_last)  # else the next backward op copies


def test_the_kernel_checks_what_it_is_given(kernels):
    x = torch.rand(2, 3, 8, 8)  # NCHW, not channels_last
    with pytest.raises(RuntimeError, match="channels_last"):
        kernels.pool2x2_forward(x, False)
    out, idx = kernels.pool2x2_forward(x.contiguous(memory_format=torch.channels_last), False)
    assert idx.dtype == torch.uint8 and idx.shape == (2, 4, 4, 3)
    with pytest.raises(RuntimeError, match="do not match"):
        kernels.pool2x2_backward(out, idx, 10, 8)
    # the layer itself falls back to the scatter for what the kernel does not take (NCHW input)
    y = MaxPooling2D()(x.requires_grad_(True))
    assert "_PoolScatterGrad" in type(y.grad_fn).__name__


def test_the_session_cnn_trains_to_the_same_numbers_with_the_kernel(kernels):
    """A few training steps of the session CNN with the compiled kernel and with the library's
    pooling (the scatter) end with the same weights, bit for bit."""
    from cifar4 import models

    def train(use_kernel: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = models.build("cnn").to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        x = torch.rand(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 4, (64,))
        saved = native._LOADED[:]
        if not use_kernel:
            native._LOADED[:] = [native.Status(False, "test")]
        try:
            for _ in range(3):
                with torch.autocast("cpu", torch.bfloat16):
                    loss = F.cross_entropy(model(x).float(), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            native._LOADED[:] = saved
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(train(True), train(False), strict=True))


def _train(npz, tmp_path, **env) -> dict:
    p = subprocess.run([sys.executable, "-m", "cifar4", "train", "-e", "cnn", "--epochs", "1", "--data", str(npz),
                        "--runs-dir", str(tmp_path / "runs"), "--json", "-q"],
                       capture_output=True, text=True, env={**os.environ, **env})
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_without_a_compiler_the_run_trains_with_the_librarys_pooling_and_says_why(bigger_npz, tmp_path):
    m = _train(bigger_npz, tmp_path, CXX=str(tmp_path / "no-such-compiler"), CIFAR4_CACHE=str(tmp_path / "c1"))
    k = m["kernels"]["pool2x2"]
    assert k["compiled"] is False and "no C++ compiler" in k["reason"] and "no-such-compiler" in k["reason"]
    assert m["test_accuracy"] is not None


def test_a_failed_build_is_remembered_and_not_retried(bigger_npz, tmp_path):
    cache = tmp_path / "c2"
    first = _train(bigger_npz, tmp_path, CXX="false", CIFAR4_CACHE=str(cache))["kernels"]["pool2x2"]
    assert first["compiled"] is False and first["reason"].startswith("the library's, since building")
    assert list(cache.glob("kernels/pool2x2-*/failed.txt"))
    again = _train(bigger_npz, tmp_path, CXX="false", CIFAR4_CACHE=str(cache))["kernels"]["pool2x2"]
    assert "failed before" in again["reason"] and "to try again" in again["reason"]
    assert again["build_seconds"] == 0


def test_models_without_pools_and_opting_out_build_nothing(tmp_path, monkeypatch):
    from cifar4 import models
    assert native.prepare(models.build("mlp-20"), torch.device("cpu")) is None
    assert native.prepare(models.build("cnn"), torch.device("meta")) is None
    r = subprocess.run([sys.executable, "-c", "from cifar4.models import native; print(native.load().reason)"],
                       capture_output=True, text=True,
                       env={**os.environ, "CIFAR4_KERNELS": "library", "CIFAR4_CACHE": str(tmp_path)})
    assert r.returncode == 0 and "CIFAR4_KERNELS=library" in r.stdout
    assert not (tmp_path / "kernels").exists()
