"""engine.optim, engine.channels_last and engine.checkpoint: parameter groups, LR schedules,
channels-last, EMA, checkpoint files."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from engine.channels_last import model_channels_last
from engine.checkpoint import (
    CheckpointError,
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from engine.config import load_config
from engine.optim import ModelEMA, build_optimizer, lr_factor, param_groups, scaled_lr
from models import build_model


def _model(name: str = "tsm", *extra: str) -> nn.Module:
    cfg = load_config(None, [f"model.name={name}", "model.debug=true", "model.num_classes=5", *extra])
    return build_model(cfg.model)


def _optim(*extra: str):
    return load_config(None, list(extra)).optim


def test_tsn_groups_bias_2x_no_decay_bn_no_decay_fc_5x_10x():
    model = _model("tam")  # TAM adds Conv1d, BatchNorm1d and bias-free Linear layers
    opt = build_optimizer(model, _optim("optim.fc_lr_mult=true", "optim.weight_decay=0.001"), lr=0.1)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            g = by_param[id(p)]
            if name == "fc":
                want = (0.5, 0.001) if pname == "weight" else (1.0, 0.0)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                want = (0.1, 0.0)
            elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                want = (0.1, 0.001) if pname == "weight" else (0.2, 0.0)
            else:
                want = (0.1, 0.001)
            assert (g["lr"], g["weight_decay"]) == pytest.approx(want), f"{name}.{pname} in {g['name']}"


def test_groups_skip_frozen_parameters_and_flat_is_one_group():
    model = _model("ctnet", "model.ctnet_freeze=true")
    groups = param_groups(model, _optim())
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert 0 < n_trainable < len(list(model.parameters()))
    assert sum(len(g["params"]) for g in groups) == n_trainable
    assert all(p.requires_grad for g in groups for p in g["params"])
    flat = param_groups(model, _optim("optim.param_groups=flat"))
    assert len(flat) == 1 and len(flat[0]["params"]) == n_trainable and flat[0]["lr_mult"] == 1.0


def test_lr_warmup_step_and_cosine():
    spe, epochs = 10, 10
    step = _optim("optim.schedule=step", "optim.lr_steps=[4, 8]", "optim.warmup_epochs=1")
    f = [lr_factor(s, spe, epochs, step) for s in range(spe * epochs)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[10] == 1.0  # per-step linear warm-up
    assert f[39] == 1.0 and f[40] == pytest.approx(0.1) and f[80] == pytest.approx(0.01)
    mm = _optim("optim.warmup_epochs=2", "optim.warmup_start=0.1")  # mmaction2: from 0.1 x lr
    assert lr_factor(0, spe, epochs, mm) == pytest.approx(0.1 + 0.9 / 20)
    cos = _optim("optim.schedule=cosine", "optim.warmup_epochs=2")
    g = [lr_factor(s, spe, epochs, cos) for s in range(spe * epochs)]
    assert g[19] == 1.0 and g[20] == 1.0 and g[60] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(g[20:], g[21:], strict=False)) and g[-1] == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 79 / 80))
    )
    assert scaled_lr(_optim("optim.lr=0.02", "optim.ref_batch=128"), 64) == pytest.approx(0.01)
    assert scaled_lr(_optim("optim.lr=0.02"), 64) == 0.02


def test_channels_last_handles_conv3d_inside_a_2d_model():
    model = model_channels_last(_model("ctnet"))
    for p in model.parameters():
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last)
        if p.dim() == 5:
            assert p.is_contiguous(memory_format=torch.channels_last_3d)


def test_ema_tracks_the_average():
    model = nn.Linear(2, 1)
    ema = ModelEMA(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, start + 1.0)


def test_checkpoint_atomic_roundtrip_latest_prune_and_errors(tmp_path):
    for epoch, step in [(1, 10), (2, 20), (10, 100)]:
        save_checkpoint(tmp_path / checkpoint_name(epoch, step), {"model": {"w": torch.ones(1) * step}})
    assert latest_checkpoint(tmp_path).name == checkpoint_name(10, 100)
    assert load_checkpoint(tmp_path)["model"]["w"].item() == 100  # a directory means its newest
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in sorted(tmp_path.glob("ckpt_*"))] == [
        checkpoint_name(2, 20),
        checkpoint_name(10, 100),
    ]
    (tmp_path / "cut.pt").write_bytes((tmp_path / checkpoint_name(2, 20)).read_bytes()[:50])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="'model' key"):
        load_checkpoint(tmp_path / "other.pt")
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(1)}})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(path, {"model": {}, "bad": Unpicklable()})
    assert load_checkpoint(path)["model"]["w"].item() == 0
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_rng_state_roundtrip_through_a_weights_only_file(tmp_path):
    save_checkpoint(tmp_path / "r.pt", {"model": {}, "rng": rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
