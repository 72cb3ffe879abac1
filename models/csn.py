"""Channel-Separated Networks (Tran et al., ICCV 2019): ir-CSN and ip-CSN, ResNet-50/101/152, 3D.

Input (N, C, T, H, W) ("NCTHW"; the recipes feed 32 frames at interval 2, 224 px) -> logits (N, classes).
The network is MMAction2's `ResNet3dCSN` as its CSN configs build it (with_pool2=False,
zero_init_residual=False, BN eps 1e-3) plus its `I3DHead` (global average pool, dropout 0.5, fc with
N(0, 0.01) weights and zero bias):

    stem    Conv3d(3, 64, (3,7,7), stride (1,2,2)) + BN + ReLU, MaxPool3d((1,3,3), stride (1,2,2))
    block   1x1x1 conv+BN+ReLU -> [ip: 1x1x1 conv+BN] -> depthwise 3x3x3 conv+BN+ReLU -> 1x1x1 conv+BN
            -> + shortcut -> ReLU; the first block of layers 2-4 strides (2,2,2) in the depthwise conv and
            in its 1x1x1 shortcut conv (layer1's first block has a stride-1 shortcut conv: 64 -> 256).

Module names follow MMAction2's state dict (`conv1.conv`, `layer1.0.conv2.0.bn`, `downsample.conv`,
...) under `backbone.`, and the classifier is `fc` (MMAction2: `cls_head.fc_cls`), so converting one of
its IG65M/Sports1M checkpoints is a prefix rename.

`freeze_bn=True` is the "bnfrozen" of the published fine-tuning recipes: every BN of the backbone stays in
eval mode (running statistics frozen) and its affine parameters have requires_grad=False.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from engine.config import ModelConfig

CSN_STAGES: dict[int, tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
DEBUG_STAGES = (1, 1, 1, 1)
DEBUG_BASE_WIDTH = 8
BN_EPS = 1e-3


class ConvBN3d(nn.Module):
    """Conv3d (no bias) -> BatchNorm3d -> optional ReLU (MMAction2's ConvModule, same key names)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
        groups: int = 1,
        relu: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv3d(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm3d(out_channels, eps=BN_EPS)
        self.activate = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class CSNBottleneck(nn.Module):
    """The channel-separated bottleneck; `mode` "ir" (interaction-reduced) or "ip" (-preserved)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, mode: str) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = ConvBN3d(in_channels, width, 1)
        separated: list[nn.Module] = [ConvBN3d(width, width, 1, relu=False)] if mode == "ip" else []
        separated.append(ConvBN3d(width, width, 3, stride=stride, padding=1, groups=width))
        self.conv2 = nn.Sequential(*separated)
        self.conv3 = ConvBN3d(width, out_channels, 1, relu=False)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = ConvBN3d(in_channels, out_channels, 1, stride=stride, relu=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


class ResNet3dCSN(nn.Module):
    """The CSN trunk: clips (N, C, T, H, W) -> layer4 feature map (N, 32*base_width, T/8, H/32, W/32)."""

    def __init__(
        self, stage_blocks: Sequence[int], mode: str, base_width: int = 64, in_channels: int = 3
    ) -> None:
        super().__init__()
        if mode not in ("ir", "ip"):
            raise ValueError(f"CSN bottleneck mode must be 'ir' or 'ip', got {mode!r}")
        self.conv1 = ConvBN3d(in_channels, base_width, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3))
        self.maxpool = nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        channels = base_width
        for stage, num_blocks in enumerate(stage_blocks, start=1):
            width = base_width * 2 ** (stage - 1)
            blocks = []
            for index in range(num_blocks):
                stride = 2 if stage > 1 and index == 0 else 1
                blocks.append(CSNBottleneck(channels, width, stride, mode))
                channels = width * CSNBottleneck.expansion
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.num_features = channels
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class CSN(nn.Module):
    """ir-/ip-CSN classifier: clips (N, C, T, H, W) -> logits (N, num_classes)."""

    layout = "NCTHW"
    snippet_len = 1

    def __init__(
        self,
        mode: str,
        num_classes: int,
        depth: int = 152,
        dropout: float = 0.5,
        freeze_bn: bool = False,
        debug: bool = False,
    ) -> None:
        super().__init__()
        if debug:
            self.backbone = ResNet3dCSN(DEBUG_STAGES, mode, DEBUG_BASE_WIDTH)
        elif depth in CSN_STAGES:
            self.backbone = ResNet3dCSN(CSN_STAGES[depth], mode)
        else:
            raise ValueError(f"model.depth: CSN is defined for depths {sorted(CSN_STAGES)}, got {depth}")
        self.freeze_bn = freeze_bn
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.backbone.num_features, num_classes)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)
        if freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm3d):
                    m.requires_grad_(False)

    def train(self, mode: bool = True) -> CSN:
        """As nn.Module.train, but frozen BN layers stay in eval mode (fixed running statistics)."""
        super().train(mode)
        if self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm3d):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"CSN expects clips (N, C, T, H, W), got shape {tuple(x.shape)}")
        x = torch.flatten(self.avgpool(self.backbone(x)), 1)
        return self.fc(self.dropout(x))


def ir_csn(depth: int = 152, num_classes: int = 400, **kwargs) -> CSN:
    """Interaction-reduced CSN: the 3x3x3 conv of each bottleneck is depthwise."""
    return CSN("ir", num_classes, depth, **kwargs)


def ip_csn(depth: int = 152, num_classes: int = 400, **kwargs) -> CSN:
    """Interaction-preserved CSN: a 1x1x1 conv + BN, then the depthwise 3x3x3 conv."""
    return CSN("ip", num_classes, depth, **kwargs)


def _build(mode: str, cfg: ModelConfig) -> CSN:
    if cfg.partial_bn:
        raise ValueError("model.partial_bn: TSN's partial BN is for 2D models (CSN recipes: model.freeze_bn)")
    return CSN(mode, cfg.num_classes, cfg.depth, cfg.dropout, cfg.freeze_bn, cfg.debug)


def build_ir_csn(cfg: ModelConfig) -> CSN:
    """ir-CSN from a `model:` section (depth 50/101/152, dropout, freeze_bn, debug)."""
    return _build("ir", cfg)


def build_ip_csn(cfg: ModelConfig) -> CSN:
    """ip-CSN from a `model:` section (depth 50/101/152, dropout, freeze_bn, debug)."""
    return _build("ip", cfg)
