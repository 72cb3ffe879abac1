"""MSN and TDN (models/temporal/msn.py, tdn.py): official parameter counts and MACs, the official quirks,
and the debug flavours' behaviour (5-frame snippets, T = 8)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from models import MODELS, build_model, load_pretrained
from models.deform import DeformConv2dPack
from models.resnet import resnet
from models.summary import count_macs
from models.temporal.msn import FrameDifferencePyramid, MotionModule
from models.temporal.tdn import TemporalShiftConv
from models.temporal.tsm import temporal_shift

T = 8  # MSN's motion module groups frames by 8 (official), so the debug flavour keeps T = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def debug_model(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, debug=True, num_classes=5, num_segments=T, **kw))


def snippets(n: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    """(N, T*5, C, H, W): segment t holds frames 5t..5t+4."""
    return torch.randn(n, T * 5, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _meta(name: str, classes: int) -> nn.Module:
    with torch.device("meta"):
        return build_model(ModelConfig(name=name, num_classes=classes))


@pytest.mark.parametrize(
    "name, classes, params",
    [("msn", 400, 31_480_836), ("msn", 174, 31_017_762), ("tdn", 400, 24_883_120), ("tdn", 174, 24_420_046)],
)
def test_full_size_parameter_counts(name, classes, params):
    assert sum(p.numel() for p in _meta(name, classes).parameters()) == params


@pytest.mark.parametrize("name, gmacs", [("msn", 58.0), ("tdn", 35.64)])
def test_full_size_gmacs(name, gmacs):
    """Deformable convs count as convs of their kernel size (DeformConv2d is an nn.Conv2d)."""
    model = _meta(name, 400)
    with torch.device("meta"):
        clip = torch.empty(1, 8 * 5, 3, 224, 224)
    assert count_macs(model, clip) / 1e9 == pytest.approx(gmacs, rel=0.02)


@pytest.mark.parametrize("name", ["msn", "tdn"])
def test_shape_and_every_trainable_parameter_gets_a_gradient(name):
    model = debug_model(name).train()
    assert name in MODELS and model.layout == "NTCHW" and model.snippet_len == 5
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 5
    out = model(snippets(size=40))
    assert out.shape == (2, 5)
    out.logsumexp(dim=1).sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    silent = [n for n, p in trainable if p.grad is None or not p.grad.any()]
    assert not silent, f"no gradient reaches {silent}"


@pytest.mark.parametrize("name", ["msn", "tdn"])
def test_temporal_sensitivity(name):
    """Reversing the segment order, or the frames inside each snippet, changes the scores."""
    model = debug_model(name).eval()
    x = snippets()
    parts = x.view(2, T, 5, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        segments_reversed = model(parts.flip(1).reshape_as(x))
        frames_reversed = model(parts.flip(2).reshape_as(x))
    assert not torch.allclose(out, segments_reversed, rtol=1e-3, atol=1e-6)
    assert not torch.allclose(out, frames_reversed, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", ["msn", "tdn"])
def test_autocast_finite_and_channels_last_matches(name):
    model = debug_model(name).eval()
    x = snippets()
    with torch.no_grad():
        ref = model(x)
        for t in [*model.parameters(), *model.buffers()]:  # as channels_last.model_channels_last
            if t.dim() in (4, 5):
                t.data = t.data.contiguous(
                    memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d
                )
        folded_cl = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)  # NTHWC storage
        torch.testing.assert_close(model(folded_cl), ref, rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.train()(folded_cl)
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_msn_official_quirks():
    model = debug_model("msn")
    motion = model.backbone.layer2[0].temporal.motion
    for dcn in (motion.motion_offset, motion.motion_offset_7):
        assert isinstance(dcn, DeformConv2dPack)
        assert not dcn.weight.requires_grad and not dcn.bias.requires_grad  # kernels left out of training
        assert dcn.conv_offset.weight.requires_grad and dcn.conv_offset.weight.abs().sum() > 0  # not zero
        assert torch.count_nonzero(dcn.conv_offset.bias) == 0
    assert motion.motion_offset.kernel_size == (3, 3) and motion.motion_offset_7.kernel_size == (5, 5)
    assert all(not p.requires_grad for p in model.backbone.unused.parameters())
    trunk = model.backbone
    trunk_convs = [trunk.conv1, trunk.layer3[0].conv2, trunk.layer3[0].downsample[0]]
    trunk_convs.append(trunk.diff_layer1[0].conv1)
    assert all(c.bias is not None for c in trunk_convs)  # fbresnet: every conv has a bias
    assert not hasattr(model.backbone.layer1[0], "temporal") and hasattr(model.backbone.layer4[1], "temporal")
    assert model.backbone.stem_fusion == (0.5, 0.5) and model.backbone.layer1_fusion == (0.75, 0.25)
    with pytest.raises(ValueError, match="model.num_segments"):
        build_model(ModelConfig(name="msn", debug=True, num_classes=5, num_segments=4))


def test_tdn_fusion_weights_follow_the_official_t8_rule():
    model = build_model(ModelConfig(name="tdn", debug=True, num_classes=5, num_segments=4))
    assert model.backbone.stem_fusion == model.backbone.layer1_fusion == (0.75, 0.25)
    out = model(torch.randn(1, 4 * 5, 3, 32, 32))  # TDN has no fixed window: any T works
    assert out.shape == (1, 5)


def test_learnable_shift_starts_as_tsm():
    shift = TemporalShiftConv(16, num_segments=4)
    x = torch.randn(8, 16, 5, 5)
    torch.testing.assert_close(shift(x), temporal_shift(x, 4, 8))
    assert shift.weight.requires_grad


def _randomise_bn(module: nn.Module) -> None:
    gen = torch.Generator().manual_seed(5)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for t in (m.weight, m.bias, m.running_mean):
                t.data = torch.randn(t.shape, generator=gen) * 0.5
            m.running_var.data = torch.rand(m.running_var.shape, generator=gen) + 0.5


def motion_reference(mod: MotionModule, x: torch.Tensor) -> torch.Tensor:
    """The official Module_1 forward written frame by frame, window of 8 frames at a time."""
    red = mod.bn1(mod.conv_down(x))
    result = []
    for start in range(0, x.shape[0], 8):
        frames = red[start : start + 8]
        summary = mod.bn_t(mod.time_conv(frames.transpose(0, 1)[None])).mean(dim=2)  # (1, c, h, w)
        per_frame = []
        for t in range(7):
            later, now = frames[t + 1 : t + 2], frames[t : t + 1]
            pooled = mod.bn3(mod.conv1(mod.pool(later)))
            branches = (mod.motion_offset(later), mod.motion_offset_7(later), pooled)
            per_frame.append(sum(b - now for b in branches).abs())
        gate_in = F.adaptive_avg_pool2d(torch.cat(per_frame + [summary]), 1)
        s = torch.sigmoid(mod.bn2(mod.conv(gate_in)))
        xs = x[start : start + 8]
        result.append((s - 0.5) * xs + xs)
    return torch.cat(result)


def test_motion_module_matches_framewise_reference_over_two_windows():
    torch.manual_seed(0)
    mod = MotionModule(16).eval()
    _randomise_bn(mod)
    x = torch.randn(16, 16, 6, 6)  # one clip of T = 16 = two official windows of 8
    with torch.no_grad():
        torch.testing.assert_close(mod(x), motion_reference(mod, x), rtol=1e-4, atol=1e-5)


def test_difference_pyramid_sees_only_motion_and_runs_per_segment():
    torch.manual_seed(0)
    pyramid = FrameDifferencePyramid(16, num_segments=T)
    still = torch.randn(2 * T, 1, 3, 32, 32).expand(-1, 5, -1, -1, -1).reshape(2 * T, 15, 32, 32)
    with torch.no_grad():
        assert pyramid.eval()(still).abs().max() == 0  # identical frames: no difference features
        moving = torch.randn(2 * T, 15, 32, 32)
        out = pyramid(moving)
    assert out.shape == (2 * T, 16, 8, 8) and out.abs().max() > 0
    pyramid.train()(moving)
    assert pyramid.conv_diff_1[1].num_batches_tracked.item() == T  # BN sees one segment position at a time


@pytest.mark.parametrize("name", ["msn", "tdn"])
def test_imagenet_checkpoint_fills_the_reused_tensors(name, tmp_path, caplog):
    torch.manual_seed(1)
    imagenet = resnet(debug=True).state_dict()  # torchvision layout, no conv biases
    path = tmp_path / "imagenet.pth"
    torch.save(imagenet, path)
    model = debug_model(name)
    with caplog.at_level(logging.INFO):
        report = load_pretrained(model, path)
    assert report.target == "backbone"
    sd = model.backbone.state_dict()
    for key, value in imagenet.items():
        torch.testing.assert_close(sd[key], value)
        if key.startswith("layer1."):
            torch.testing.assert_close(sd["diff_layer1." + key[len("layer1.") :]], value)  # second layer1
    assert all(not sd[k].any() for k in ("conv1.bias", "layer2.0.conv2.bias", "layer2.0.downsample.0.bias"))
    tiled = imagenet["conv1.weight"].mean(dim=1, keepdim=True).expand(-1, 12, -1, -1)
    conv1_5 = "unused.conv1_5.0.weight" if name == "msn" else "difference_stem.conv.0.weight"
    torch.testing.assert_close(sd[conv1_5], tiled)
    torch.testing.assert_close(sd["unused.conv1_temp.weight"], imagenet["conv1.weight"])
    fresh = (".temporal.", "difference_stem.", "unused.conv1_5.1.")  # no ImageNet counterpart (BN of conv1_5)
    assert report.new and all(any(p in f".{k}" for p in fresh) for k in report.new)


@pytest.mark.parametrize("name", ["msn", "tdn"])
def test_basic_block_depth_is_a_clear_error(name):
    with pytest.raises(ValueError, match="model.depth"), torch.device("meta"):
        build_model(ModelConfig(name=name, depth=18))
