"""models.convert against state dicts laid out the way each official code base saves them.

The official names are produced here from docs/CHECKPOINTS.md (what the official modules are called),
written independently of models.convert's rename rules, so a wrong rule fails these tests. Debug-size
models for the tensor round trips; full-size models on the meta device for key and shape coverage.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.config import ModelConfig
from models import build_model
from models.convert import (
    ConvertError,
    check_shift_placement,
    convert_file,
    convert_state_dict,
    target_model,
)

T = 8  # segments
NUM_CLASSES = 7

# --------------------------------------------------------------------------------------------------
# Official layouts (docs/CHECKPOINTS.md), one function per code base: our key -> the official key
# --------------------------------------------------------------------------------------------------

BLOCK_KEY = re.compile(r"^(layer\d+)\.(\d+)\.(.*)$")


def split_block(key: str) -> tuple[str, int, str] | None:
    m = BLOCK_KEY.match(key)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def tsn_wrapped(key: str, backbone_key) -> str:
    """The TSN wrapper of TSM/TAM/CT-Net/MSN/TDN, saved from nn.DataParallel: module.base_model / new_fc."""
    if key.startswith("fc."):
        return "module.new_fc." + key[3:]
    return "module.base_model." + backbone_key(key.removeprefix("backbone."))


def tsm_official(key: str, stage_blocks: tuple[int, ...], shift: bool = True) -> str:
    """TemporalShift(net=conv1) on conv1 of every block (every other one when layer3 has >= 23)."""

    def backbone(k: str) -> str:
        parts = split_block(k)
        if shift and parts:
            layer, index, rest = parts
            n_round = 2 if stage_blocks[2] >= 23 else 1
            if index % n_round == 0 and rest.startswith("conv1."):
                return f"{layer}.{index}.conv1.net.{rest[len('conv1.') :]}"
        return k

    return tsn_wrapped(key, backbone)


def tam_official(key: str) -> str:
    """TemporalBottleneck: the ResNet block as `.net`, the TAM beside it as `.tam`."""

    def backbone(k: str) -> str:
        parts = split_block(k)
        if not parts:
            return k
        layer, index, rest = parts
        if rest.startswith("temporal."):
            return f"{layer}.{index}.tam.{rest[len('temporal.') :]}"
        return f"{layer}.{index}.net.{rest}"

    return tsn_wrapped(key, backbone)


# Official ReshapeInteraction attribute for each of our CTInteraction submodules.
CT_OFFICIAL = {
    "stage1.spatial": "conv1_x",
    "stage1.temporal": "conv1_z",
    "stage1.spatial_attention": "sx_attention",
    "stage1.temporal_attention": "tx_attention",
    "stage1.channel_attention": "cx_attention",
    "fusion": "fusion",
    "stage2.spatial": "conv2_y",
    "stage2.temporal": "conv2_z",
    "stage2.spatial_attention": "sy_attention",
    "stage2.temporal_attention": "ty_attention",
    "stage2.channel_attention": "cy_attention",
}


# The official interaction is Conv3d throughout; each conv's kernel: 1x3x3 (spatial), 3x1x1 (temporal),
# 1x1x1 (fusion, channel attention). Our equal Conv2d weights gain the unit dimension back.
CT_KERNELS = {
    "conv1_x": "1x3x3",
    "conv2_y": "1x3x3",
    "sx_attention": "1x3x3",
    "sy_attention": "1x3x3",
    "conv1_z": "3x1x1",
    "conv2_z": "3x1x1",
    "tx_attention": "3x1x1",
    "ty_attention": "3x1x1",
    "fusion": "1x1x1",
    "cx_attention": "1x1x1",
    "cy_attention": "1x1x1",
}


def ctnet_official_tensor(official_key: str, value: torch.Tensor) -> torch.Tensor:
    parts = official_key.split(".")
    if "conv2" not in parts or value.ndim != 4:
        return value
    module = parts[parts.index("conv2") + 1]
    if module not in CT_KERNELS:
        return value
    return value.unsqueeze(-1) if CT_KERNELS[module] == "3x1x1" else value.unsqueeze(2)


def ctnet_official(key: str, ct_blocks: set[str]) -> str:
    """ReshapeBlock at the CT blocks: conv1/conv3 as [conv, bn] Sequentials, the interaction as conv2."""

    def backbone(k: str) -> str:
        parts = split_block(k)
        if not parts or f"{parts[0]}.{parts[1]}" not in ct_blocks:
            return k
        layer, index, rest = parts
        head, _, tail = rest.partition(".")
        simple = {"conv1": "conv1.0", "bn1": "conv1.1", "conv3": "conv3.0", "bn3": "conv3.1"}
        if head in simple:
            return f"{layer}.{index}.{simple[head]}.{tail}"
        assert head == "temporal", k
        for ours, theirs in CT_OFFICIAL.items():
            if tail.startswith(ours + "."):
                inner = tail[len(ours) + 1 :]
                if inner.startswith("fc2."):  # a one-conv Sequential in the official attention
                    inner = "fc2.0." + inner[len("fc2.") :]
                return f"{layer}.{index}.conv2.{theirs}.{inner}"
        raise AssertionError(f"unexpected CT key {k}")

    return tsn_wrapped(key, backbone)


def difference_net_official(key: str, msn: bool) -> str:
    """TDN_Net / MSN_Net: layerK_bak stages, resnext_layer1, conv1_5 / pyramid convs at the top level,
    block modules `mse` (TDN) or `motion_layer` (MSN) and `shift.conv` beside the ResNet layers."""

    def backbone(k: str) -> str:
        if k.startswith("diff_layer1."):
            return "resnext_layer1." + k[len("diff_layer1.") :]
        if k.startswith("unused."):
            return k[len("unused.") :]  # conv1_temp, conv1_5 (MSN): registered at the top level
        if k.startswith("difference_stem."):
            rest = k[len("difference_stem.") :]
            return rest if msn else "conv1_5." + rest[len("conv.") :]
        parts = split_block(k)
        if not parts:
            return k
        layer, index, rest = parts
        rest = rest.replace("temporal.shift.", "shift.conv.")
        rest = rest.replace("temporal.motion.", "motion_layer.").replace("temporal.mse.", "mse.")
        return f"{layer}_bak.{index}.{rest}"

    return tsn_wrapped(key, backbone)


def mmaction_2d_official(key: str, variant: str) -> str:
    """Recognizer2D: backbone.* with ConvModules (conv/bn), TSM's shift inside conv1's ConvModule,
    TANet's TABlock(block, tam); the head's Linear is cls_head.fc_cls."""
    if key.startswith("fc."):
        return "cls_head.fc_cls." + key[3:]
    k = key.removeprefix("backbone.")
    if k.startswith("conv1."):
        return "backbone.conv1.conv." + k[len("conv1.") :]
    if k.startswith("bn1."):
        return "backbone.conv1.bn." + k[len("bn1.") :]
    layer, index, rest = split_block(k)
    if variant == "tam" and rest.startswith("temporal."):
        return f"backbone.{layer}.{index}.tam.{rest[len('temporal.') :]}"
    head, _, tail = rest.partition(".")
    if head == "downsample":
        number, _, tail = tail.partition(".")
        module = {"0": "downsample.conv", "1": "downsample.bn"}[number]
    elif head.startswith("conv"):
        module = f"{head}.conv.net" if variant == "tsm" and head == "conv1" else f"{head}.conv"
    else:
        module = f"conv{head[-1]}.bn"
    block = "block." if variant == "tam" else ""
    return f"backbone.{layer}.{index}.{block}{module}.{tail}"


def mmaction_3d_official(key: str) -> str:
    """Recognizer3D with ResNet3dCSN + I3DHead: our CSN names are MMAction2's; the head moves."""
    return "cls_head.fc_cls." + key[3:] if key.startswith("fc.") else key


def torchvision_official(key: str) -> str:
    return key.removeprefix("backbone.")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def model_cfg(name: str, debug: bool = True, depth: int = 50, **kw) -> ModelConfig:
    return ModelConfig(name=name, depth=depth, num_classes=NUM_CLASSES, num_segments=T, debug=debug, **kw)


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every tensor (BN statistics included) so that a misplaced tensor changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(int(torch.randint(1, 1000, (), generator=g)))
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            else:
                t.add_(torch.randn(t.shape, generator=g) * 0.05)
    return model.eval()


def official_layout(source: str, model: str, ours: dict[str, torch.Tensor], stage_blocks=(2, 2, 2, 2)):
    """Our state dict renamed into `source`'s official layout for our `model`."""
    if source == "tsm":
        name = lambda k: tsm_official(k, stage_blocks, shift=model == "tsm")  # noqa: E731
    elif source == "tam":
        name = tam_official
    elif source == "ctnet":
        ct = {f"layer{s}.{i}" for s in range(1, 5) for i in range(stage_blocks[s - 1]) if i % 2 == 1}
        name = lambda k: ctnet_official(k, ct)  # noqa: E731
    elif source in ("msn", "tdn"):
        name = lambda k: difference_net_official(k, msn=source == "msn")  # noqa: E731
    elif source == "mmaction" and model in ("ir_csn", "ip_csn"):
        name = mmaction_3d_official
    elif source == "mmaction":
        name = lambda k: mmaction_2d_official(k, model)  # noqa: E731
    else:
        raise AssertionError(source)
    official = {name(k): v.clone() for k, v in ours.items()}
    if source == "ctnet":
        official = {k: ctnet_official_tensor(k, v) for k, v in official.items()}
    assert len(official) == len(ours), "two of our keys got the same official name"
    return official


def clip_input(model: nn.Module, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if model.layout == "NCTHW":
        return torch.randn(1, 3, 8, 32, 32, generator=g)
    return torch.randn(1, T * model.snippet_len, 3, 32, 32, generator=g)


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------

# (source, model, compare logits too): tensor equality proves every mapping; the forward comparison
# (the file loaded through model.pretrained gives the original's logits) runs once per code base to
# keep the CPU time down.
CASES = [
    ("tsm", "tsm", True),
    ("tsm", "tsn", False),
    ("tam", "tam", True),
    ("ctnet", "ctnet", True),
    ("tdn", "tdn", False),
    ("msn", "msn", True),
    ("mmaction", "tsm", False),
    ("mmaction", "tam", True),
    ("mmaction", "tsn", False),
    ("mmaction", "ir_csn", False),
    ("mmaction", "ip_csn", True),
]


@pytest.mark.parametrize("source,model,outputs", CASES, ids=[f"{s}-{m}" for s, m, _ in CASES])
def test_official_layout_round_trip(tmp_path: Path, source: str, model: str, outputs: bool) -> None:
    """Official file -> convert -> our model: every tensor equal, and the same logits as the original."""
    torch.manual_seed(0)
    original = randomised(build_model(model_cfg(model)))
    ours = original.state_dict()
    src = tmp_path / "official.pth.tar"
    torch.save({"epoch": 3, "state_dict": official_layout(source, model, ours)}, src)
    dst = tmp_path / "converted.pt"
    state = convert_file(src, dst, source, model, num_segments=T, debug=True)

    assert state["meta"]["num_classes"] == NUM_CLASSES  # read off the classifier
    assert state["meta"]["source"] == source and state["meta"]["model"] == model
    saved = torch.load(dst, weights_only=True)
    assert set(saved["model"]) == set(ours)
    for key, value in ours.items():
        assert torch.equal(saved["model"][key], value), key

    # the converted file through model.pretrained (train.py's path) gives the original's outputs
    loaded = build_model(model_cfg(model, pretrained=str(dst))).eval()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, ours[key]), key
    if outputs:
        x = clip_input(original)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), original(x), rtol=0, atol=0)


FULL = [
    ("tsm", "tsm", 50),
    ("tsm", "tsm", 101),  # shift on every other block
    ("tsm", "tsn", 50),
    ("tam", "tam", 50),
    ("ctnet", "ctnet", 50),
    ("tdn", "tdn", 50),
    ("msn", "msn", 50),
    ("mmaction", "tsm", 50),
    ("mmaction", "tam", 50),
    ("mmaction", "ir_csn", 152),
    ("mmaction", "ip_csn", 50),
]


# Shapes of a few official tensors (docs/CHECKPOINTS.md, R50 unless named, T = 8, 400 classes): our
# full-size networks must reproduce them for the official files to load.
OFFICIAL_SHAPES = {
    ("tsm", "tsm"): {
        "module.base_model.layer1.0.conv1.net.weight": (64, 64, 1, 1),
        "module.new_fc.weight": (400, 2048),
    },
    ("tam", "tam"): {
        "module.base_model.layer1.0.tam.G.0.weight": (16, 8),
        "module.base_model.layer1.0.tam.G.3.weight": (3, 16),
        "module.base_model.layer2.1.tam.L.0.weight": (32, 128, 3),
        "module.base_model.layer2.1.tam.L.3.weight": (128, 32, 1),
    },
    ("ctnet", "ctnet"): {
        "module.base_model.layer1.1.conv1.0.weight": (64, 256, 1, 1),
        "module.base_model.layer1.1.conv2.conv1_x.0.weight": (64, 8, 1, 3, 3),
        "module.base_model.layer2.1.conv2.conv2_z.0.weight": (128, 8, 3, 1, 1),
        "module.base_model.layer4.1.conv2.cy_attention.fc2.0.weight": (512, 4, 1, 1, 1),
    },
    ("tdn", "tdn"): {
        "module.base_model.conv1_5.0.weight": (64, 12, 7, 7),
        "module.base_model.layer2_bak.0.mse.conv1.weight": (8, 128, 1, 1),
        "module.base_model.layer2_bak.0.shift.conv.weight": (128, 1, 3),
        "module.base_model.conv1_temp.bias": (64,),
    },
    ("msn", "msn"): {
        "module.base_model.conv_2.weight": (64, 16, 5, 5),
        "module.base_model.conv_diff_2.0.weight": (64, 32, 5, 5),
        "module.base_model.layer3_bak.0.motion_layer.motion_offset.conv_offset.weight": (18, 64, 3, 3),
        "module.base_model.layer3_bak.0.motion_layer.motion_offset_7.weight": (64, 64, 5, 5),
        "module.base_model.layer3_bak.0.motion_layer.time_conv.bias": (64,),
        "module.base_model.conv1_5.1.running_var": (64,),
    },
    ("mmaction", "ir_csn"): {
        "backbone.conv1.conv.weight": (64, 3, 3, 7, 7),
        "backbone.layer3.35.conv2.0.conv.weight": (256, 1, 3, 3, 3),
        "cls_head.fc_cls.weight": (400, 2048),
    },
    ("mmaction", "ip_csn"): {
        "backbone.layer1.0.conv2.0.conv.weight": (64, 64, 1, 1, 1),
        "backbone.layer1.0.conv2.1.conv.weight": (64, 1, 3, 3, 3),
    },
}


@pytest.mark.parametrize("source,model,depth", FULL, ids=[f"{s}-{m}-r{d}" for s, m, d in FULL])
def test_full_size_key_coverage(source: str, model: str, depth: int) -> None:
    """Full-size networks (meta device: names and shapes only): every key maps, every shape fits."""
    net = target_model(ModelConfig(name=model, depth=depth, num_classes=400, num_segments=T))
    ours = net.state_dict()
    stage_blocks = tuple(len(getattr(net.backbone, f"layer{i}")) for i in range(1, 5))
    official = official_layout(source, model, ours, stage_blocks)
    if depth == 50 or model == "ir_csn":
        for key, shape in OFFICIAL_SHAPES.get((source, model), {}).items():
            assert tuple(official[key].shape) == shape, key
    if source == "tsm" and model == "tsm":
        shifted = [k for k in official if ".conv1.net." in k]
        assert len(shifted) == (sum(stage_blocks) if depth == 50 else sum((n + 1) // 2 for n in stage_blocks))
    check_shift_placement(official, net, source, model)  # raises if the shifted blocks differ
    converted, dropped = convert_state_dict(official, source, model, ours)
    assert set(converted) == set(ours) and not dropped
    assert all(converted[k].shape == ours[k].shape for k in ours)


def test_tsm_dropout_zero_layout(tmp_path: Path) -> None:
    """Trained with dropout 0, the official TSN keeps its classifier as base_model.fc (no new_fc)."""
    ours = randomised(build_model(model_cfg("tsm"))).state_dict()
    official = official_layout("tsm", "tsm", ours)
    official["module.base_model.fc.weight"] = official.pop("module.new_fc.weight")
    official["module.base_model.fc.bias"] = official.pop("module.new_fc.bias")
    src = tmp_path / "tsm.pth"
    torch.save({"state_dict": official}, src)
    state = convert_file(src, tmp_path / "out.pt", "tsm", "tsm", debug=True)
    assert torch.equal(state["model"]["fc.weight"], ours["fc.weight"])


def test_tam_checkpoint_for_other_segment_count_is_refused(tmp_path: Path) -> None:
    """TAM's global branch is Linear(T, 2T): a T=8 file does not fit a T=16 model, and the error names it."""
    ours = build_model(model_cfg("tam")).state_dict()
    src = tmp_path / "tam.pth.tar"
    torch.save({"state_dict": official_layout("tam", "tam", ours)}, src)
    pattern = r"module\.base_model\.layer1\.0\.tam\.G\.0\.weight \(16, 8\) -> .* \(32, 16\)"
    with pytest.raises(ConvertError, match=pattern):
        convert_file(src, tmp_path / "out.pt", "tam", "tam", num_segments=16, debug=True)
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("model", ["tsm", "ctnet", "tdn"])
def test_torchvision_imagenet_backbone(tmp_path: Path, model: str) -> None:
    """An ImageNet torchvision file becomes a trunk checkpoint that model.pretrained loads: the trunk
    equals the file, temporal modules and fc keep their init, the 1000-way fc is dropped."""
    trunk = randomised(build_model(model_cfg("tsn"))).backbone.state_dict()
    imagenet = {torchvision_official("backbone." + k): v for k, v in trunk.items()}
    imagenet["fc.weight"] = torch.randn(1000, trunk["layer4.1.bn3.weight"].shape[0])
    imagenet["fc.bias"] = torch.zeros(1000)
    src = tmp_path / "resnet50-imagenet.pth"
    torch.save(imagenet, src)
    dst = tmp_path / "trunk.pt"
    state = convert_file(src, dst, "torchvision", model, debug=True)
    assert state["meta"]["backbone_only"] and "fc.weight" in state["meta"]["dropped"]
    if model == "ctnet":  # the CT blocks drop their 3x3 conv
        assert "layer1.1.conv2.weight" in state["meta"]["dropped"]

    net = build_model(model_cfg(model, pretrained=str(dst)))
    own = net.backbone.state_dict()
    for key, value in trunk.items():
        if key in own:
            assert torch.equal(own[key], value), key
