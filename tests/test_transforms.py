"""Preprocessing and augmentation work on whole batches and do what they say."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from cifar4.data.transforms import Augment, Normalization, affine, flip, one_hot, translate


def test_scaling_is_the_sessions_divide_by_255():
    x = torch.tensor([[[[164, 206, 84]]]], dtype=torch.uint8).expand(1, 32, 32, 3)
    out = Normalization().apply(x)
    assert out.shape == (1, 3, 32, 32)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([164, 206, 84]) / 255.0)
    raw = Normalization(scale=1.0).apply(x)
    assert raw[0, 0, 0, 0].item() == 164.0


def test_standardization_uses_training_statistics():
    X = np.random.default_rng(0).integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
    n = Normalization.from_config(True, True, X)
    out = n.apply(torch.from_numpy(X))
    assert torch.allclose(out.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(out.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-2)
    assert Normalization.from_dict(n.to_dict()) == n
    # the histogram path for uint8 gives what float64 moments give
    x64 = X.reshape(-1, 3).astype(np.float64) / 255
    assert np.allclose(n.mean, x64.mean(0), rtol=0, atol=1e-12)
    assert np.allclose(n.std, x64.std(0), rtol=0, atol=1e-12)
    floats = Normalization.from_config(True, True, X.astype(np.float32))
    assert np.allclose(floats.mean, n.mean, atol=1e-9) and np.allclose(floats.std, n.std, atol=1e-9)


def test_one_hot_is_to_categorical():
    assert one_hot(np.array([0, 1, 1, 3, 2])).tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0],
                                                         [0, 0, 0, 1], [0, 0, 1, 0]]


def test_flip_mirrors_about_half_and_nothing_else():
    x = torch.rand(400, 3, 8, 8)
    out = flip(x, torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and 150 < mirrored.sum() < 250


def test_translate_shifts_whole_images_within_the_pad():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    assert torch.equal(translate(x, 0), x)
    out = translate(x, 2, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    # The centre of a shifted image is the original centre moved by at most 2 pixels.
    centre = out[0, 0, 16, 16].item()
    found = (x[0, 0, 14:19, 14:19] == centre).any()
    assert found


def test_augment_is_seeded_and_keeps_shape():
    aug = Augment(flip=True, translate=2, rotation=15, shift=0.1)
    x = torch.rand(16, 3, 32, 32)
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    assert not Augment().active and aug.active


def test_affine_samples_the_grid_of_f_affine_grid():
    """The broadcast grid is F.affine_grid's for the same random angles and shifts."""
    x = torch.rand(6, 3, 32, 24)
    out = affine(x, 15.0, 0.1, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same draws, in the same order
    ang = (torch.rand(6, generator=g) * 2 - 1) * math.radians(15.0)
    tx = (torch.rand(6, generator=g) * 2 - 1) * 0.2
    ty = (torch.rand(6, generator=g) * 2 - 1) * 0.2
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    want = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False),
                         mode="bilinear", padding_mode="border", align_corners=False)
    assert out.shape == x.shape and not torch.equal(out, x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


def test_flip_folded_into_the_affine_grid_is_flip_after_affine():
    """The session's augmentation mirrors inside the sampling grid: the same draws and, at a
    power-of-two width, the same values as `flip` applied to the sampled batch; at other widths
    the mirrored pixel centres differ by rounding only."""
    for w, exact in ((32, True), (24, False)):
        x = torch.rand(64, 3, 32, w).contiguous(memory_format=torch.channels_last)
        folded = Augment(flip=True, rotation=15, shift=0.1)(x, torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(5)
        separate = flip(affine(x, 15.0, 0.1, g), g)
        assert not torch.equal(separate, affine(x, 15.0, 0.1, torch.Generator().manual_seed(5)))
        if exact:
            assert torch.equal(folded, separate)
        else:
            torch.testing.assert_close(folded, separate, atol=1e-5, rtol=0)
        assert folded.is_contiguous(memory_format=torch.channels_last)
    # without rotation or shift (or with a crop between them) the flip stays a pass of its own
    x = torch.rand(8, 3, 32, 32)
    assert torch.equal(Augment(flip=True)(x, torch.Generator().manual_seed(1)),
                       flip(x, torch.Generator().manual_seed(1)))
