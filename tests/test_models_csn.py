"""ir-CSN / ip-CSN (models/csn.py): official parameter counts and MACs, and the debug flavour's behaviour."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.config import ModelConfig
from models import MODELS, build_model
from models.summary import count_macs  # conv/linear MACs: out elements x in_channels/groups x kernel

pytestmark = pytest.mark.usefixtures("one_thread")


def _meta(name: str, **kw) -> nn.Module:
    with torch.device("meta"):
        return build_model(ModelConfig(name=name, **kw))


@pytest.mark.parametrize(
    "name, depth, params",
    [
        ("ir_csn", 50, 13_131_152),
        ("ip_csn", 50, 14_396_176),
        ("ir_csn", 152, 29_703_568),
        ("ip_csn", 152, 33_016_592),
    ],
)
def test_full_size_parameter_counts(name, depth, params):
    model = _meta(name, depth=depth, num_classes=400)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("name, depth, gmacs", [("ir_csn", 50, 42.31), ("ip_csn", 152, 83.29)])
def test_full_size_gmacs(name, depth, gmacs):
    model = _meta(name, depth=depth, num_classes=400).eval()
    with torch.device("meta"):
        clip = torch.empty(1, 3, 32, 224, 224)
    assert count_macs(model, clip) / 1e9 == pytest.approx(gmacs, rel=0.02)


def _debug(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, num_classes=7, debug=True, **kw))


@pytest.mark.parametrize("name", ["ir_csn", "ip_csn"])
def test_debug_forward_backward(name):
    model = _debug(name)
    assert model is not None and name in MODELS
    assert model.layout == "NCTHW" and model.snippet_len == 1 and isinstance(model.fc, nn.Linear)
    clip = torch.randn(2, 3, 8, 32, 40)
    out = model(clip)
    assert out.shape == (2, 7)
    out.logsumexp(dim=1).sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    silent = [n for n, p in trainable if p.grad is None or not p.grad.any()]
    assert not silent, f"no gradient reaches {silent}"


@pytest.mark.parametrize("name", ["ir_csn", "ip_csn"])
def test_debug_is_temporally_sensitive(name):
    model = _debug(name).eval()
    clip = torch.randn(1, 3, 8, 32, 32)
    reversed_clip = clip.flip(2)
    with torch.no_grad():
        assert not torch.allclose(model(clip), model(reversed_clip), atol=1e-6)


def test_autocast_bf16_finite_and_channels_last():
    model = _debug("ip_csn").eval().to(memory_format=torch.channels_last_3d)
    clip = torch.randn(2, 3, 8, 32, 32).to(memory_format=torch.channels_last_3d)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(clip)
    assert torch.isfinite(out).all()
    with torch.no_grad():
        torch.testing.assert_close(out.float(), model(clip), atol=0.05, rtol=0.1)


def test_freeze_bn():
    model = _debug("ir_csn", freeze_bn=True).train()
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm3d)]
    assert bns and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    before = bns[0].running_mean.clone()
    model(torch.randn(2, 3, 4, 32, 32))
    torch.testing.assert_close(bns[0].running_mean, before)  # statistics stay frozen
    assert model.fc.weight.requires_grad and model.dropout.training


def test_init_and_head():
    model = _debug("ir_csn", dropout=0.5)
    assert model.dropout.p == 0.5
    assert torch.count_nonzero(model.fc.bias) == 0
    assert 0.005 < model.fc.weight.std().item() < 0.015  # N(0, 0.01)
    assert model.backbone.conv1.bn.eps == 1e-3


def test_wrong_input_rank_is_a_clear_error():
    with pytest.raises(ValueError, match="N, C, T, H, W"):
        _debug("ir_csn")(torch.randn(2, 8, 3, 32))


def test_unknown_depth_or_2d_option_is_a_clear_error():
    with pytest.raises(ValueError, match="model.depth"):
        _meta("ir_csn", depth=34)
    with pytest.raises(ValueError, match="model.partial_bn"):
        _meta("ip_csn", partial_bn=True)
