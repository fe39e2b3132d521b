"""The registry holds the session's architectures exactly, with Keras-style summaries."""

from __future__ import annotations

import pytest
import torch

from cifar4 import models
from cifar4.errors import ModelError

SESSION_PARAMS = {"mlp-20": 61_544, "mlp-deep": 4_492_420, "cnn": 28_612}


@pytest.mark.parametrize("name", sorted(SESSION_PARAMS))
def test_parameter_counts_equal_the_sessions(name):
    s = models.summary(models.build(name), name)
    assert s.total == s.trainable == SESSION_PARAMS[name] and s.non_trainable == 0
    assert f"Total params: {SESSION_PARAMS[name]:,}" in s.text()


def test_cnn_summary_rows_read_like_keras():
    rows = models.summary(models.build("cnn")).rows
    assert rows[1] == ("conv2d (Conv2D)", "(None, 30, 30, 32)", 896)
    assert rows[2] == ("max_pooling2d (MaxPooling2D)", "(None, 15, 15, 32)", 0)
    assert rows[-1] == ("dense (Dense)", "(None, 4)", 9220)


def test_cnn_pools_before_its_relu_with_the_same_values_and_gradients():
    """ReLU after the pool (4x fewer values) is the session's conv -> ReLU -> pool."""
    torch.manual_seed(0)
    net = models.build("cnn").double()
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)

    def reference(x):
        for name in ("conv2d", "conv2d_1"):
            conv = getattr(net, name)
            x = torch.nn.functional.max_pool2d(torch.relu(torch.nn.functional.conv2d(x, conv.weight, conv.bias)), 2)
        return net.dense(x.flatten(1))

    got, want = net(x), reference(x)
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got.square().sum(), list(net.parameters()))
    g_want = torch.autograd.grad(reference(x).square().sum(), list(net.parameters()))
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
def test_cpu_training_pool_scatters_the_librarys_gradient_exactly(dtype, relu):
    """MaxPooling2D's training path on a CPU (its backward a max_unpool2d scatter, the ReLU
    fused) gives the library's values and gradients bit for bit, ties and clipped zeros
    included, on even and odd maps, and keeps channels_last."""
    from cifar4.models.layers import MaxPooling2D, _PoolScatterGrad

    torch.manual_seed(0)
    for shape in ((4, 8, 30, 30), (4, 16, 13, 13)):
        x = ((torch.randn(*shape) * 2).round() / 2).to(dtype).contiguous(memory_format=torch.channels_last)
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        got = _PoolScatterGrad.apply(a, 2, relu)  # the layer takes it where no compiled kernel is loaded
        want = torch.nn.functional.max_pool2d(b, 2)
        want = torch.relu(want) if relu else want
        g = torch.randn_like(want)
        (ga,), (gb,) = torch.autograd.grad(got, a, g), torch.autograd.grad(want, b, g)
        assert torch.equal(got, want) and torch.equal(ga, gb)
        assert ga.is_contiguous(memory_format=torch.channels_last)  # else the next backward op copies
    with torch.no_grad():  # inference (and ONNX export) takes the library's pooling
        assert MaxPooling2D()(x).grad_fn is None


def test_mlp20_param_breakdown():
    rows = models.summary(models.build("mlp-20")).rows
    assert [r[2] for r in rows] == [0, 0, 3072 * 20 + 20, 21 * 4]


def test_regularization_options_change_the_architecture():
    s = models.summary(models.build("mlp-deep", dropout=[0.1, 0, 0, 0, 0], batchnorm=True))
    kinds = [r[0].split(" ")[1] for r in s.rows]
    assert kinds.count("(Dropout)") == 1 and kinds.count("(BatchNormalization)") == 5
    assert s.non_trainable == 2 * (1024 + 768 + 512 + 256 + 128)  # moving mean and variance


def test_forward_shapes():
    for name in models.names():
        if models.spec(name).from_runs:  # an ensemble: tests/test_ensemble.py
            continue
        out = models.build(name)(torch.zeros(2, 3, 32, 32))
        assert out.shape == (2, 4)


def test_unknown_model_and_option_are_errors():
    with pytest.raises(ModelError, match="unknown; expected one of"):
        models.build("resnet9000")
    with pytest.raises(ModelError, match="no option hidden"):
        models.build("cnn", hidden=[3])
    with pytest.raises(ModelError, match="3 values for 5 hidden layers"):
        models.build("mlp-deep", dropout=[0.1, 0.1, 0.1])


def test_fast_net_whitening_decorrelates_patches():
    torch.manual_seed(0)
    base = torch.randn(64, 3, 32, 32)
    x = base + 0.8 * base.roll(1, dims=3)  # correlated neighbours
    m = models.build("fast")
    m.init_from_data(x)
    out = torch.nn.functional.conv2d(x, m.whiten.weight[:12])  # one sign of each eigenvector
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = torch.cov(flat.T)
    assert torch.allclose(cov, torch.diag(torch.diagonal(cov)), atol=0.05)
    assert not m.whiten.weight.requires_grad
    assert all(not mod.weight.requires_grad for mod in m.modules()
               if isinstance(mod, torch.nn.BatchNorm2d))


def test_fast_net_widths_option():
    small = models.build("fast", widths=[16, 32, 64])
    assert small(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(ModelError):
        models.build("fast", widths=[16, 32])


def test_cnn_training_skips_the_rows_and_columns_its_pools_drop():
    """The session CNN's second pool drops the 13th row and column of its 13x13 map, and with
    them everything that only the images' last two rows and columns reach: training computes
    the first convolution on 30x30 (the same values and gradients as the whole image, which
    the test above checks against the library's layers); inference and the summary see 32x32."""
    from cifar4.models.seed import cnn, read_side

    assert (read_side(32, 1), read_side(32, 2), read_side(32, 3)) == (32, 30, 30)
    torch.manual_seed(0)
    net = models.build("cnn").double()
    seen: list[tuple[int, ...]] = []
    net.conv2d_1.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[-2:])))
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    edited = x.clone()
    edited[:, :, 30:, :] = 5.0
    edited[:, :, :, 30:] = -5.0
    train_out = net(x)
    assert seen[-1] == (12, 12)  # 13x13 without the row and column the pool drops
    torch.testing.assert_close(net(edited), train_out, rtol=0, atol=0)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), train_out.detach())
        torch.testing.assert_close(net(edited), net(x))  # the whole image: those pixels reach nothing
    assert seen[-1] == (13, 13)
    # batch norm's statistics would change without those rows: no crop there; nor with one block
    bn = cnn(batchnorm=True)
    assert [m.reads for m in bn.modules() if hasattr(m, "reads")] == [None, None]
    assert [m.reads for m in cnn(filters=(8,)).modules() if hasattr(m, "reads")] == [None]
