"""One 2D ResNet (depths 18/34/50/101/152) for every frame-based video model in this package.

State-dict keys are exactly torchvision's (`conv1`, `bn1`, `layer1.0.conv1`, ..., `layer4.2.bn3`,
`layer2.0.downsample.0`), so an ImageNet checkpoint in torchvision format loads without renaming.
The classifier is not part of the backbone: `ResNet.forward` returns pooled features (`num_features`
wide) and the video model owns its `fc`. Downsampling sits on the 3x3 conv (torchvision's "v1.5"), as in
every official TSM/TAM/CT-Net model, which build on torchvision's network.

The temporal hook (the one place where papers differ)
------------------------------------------------------
Every residual block reads `conv1-bn1-relu -> conv2-bn2(-relu) -> [conv3-bn3] -> + identity -> relu`.
`ResNet(..., temporal=factory)` calls `factory(site)` once per block, with a `BlockSite` that says where
the block is and how wide it is. The factory returns `None` (plain block) or an `nn.Module` that the
block stores as `block.temporal` and runs on the residual branch at the position named by the module's
`position` attribute:

- `BEFORE_CONV1` ("before_conv1"): on the block input, residual branch only (the identity and the
  downsample see the unchanged input). TSM's residual shift.
- `AFTER_CONV1` ("after_conv1"): after conv1-bn1-relu, before the 3x3 conv. TAM.
- `REPLACES_CONV2` ("replaces_conv2", bottlenecks only): the module takes the place of conv2-bn2-relu,
  which the block then does not build. CT-Net's channel-tensorised interaction, which keeps the
  block's ImageNet conv1/bn1/conv3/bn3.

A temporal module receives and returns a (N*T, C, H, W) tensor with frames of one clip adjacent
(clip-major), and knows T itself (the factory binds it). Its parameters are new: `load_pretrained`
accepts that they are missing from an ImageNet checkpoint, and a block records the ImageNet keys it
drops (`block.pretrained_ignore`, e.g. `("conv2.", "bn2.")` for CT-Net) so those are not reported as
unexpected. The backbone's own weight init (kaiming fan_out, BN 1/0, as torchvision) never touches a
temporal module: each one initialises itself the way its paper does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

BEFORE_CONV1 = "before_conv1"
AFTER_CONV1 = "after_conv1"
REPLACES_CONV2 = "replaces_conv2"
POSITIONS = (BEFORE_CONV1, AFTER_CONV1, REPLACES_CONV2)


@dataclass(frozen=True)
class BlockSite:
    """Where a residual block sits, handed to the temporal factory (all a paper's rule needs)."""

    stage: int  # 1..4 (torchvision's layer1..layer4)
    index: int  # block index inside the stage (0 = the first, possibly strided, block)
    stage_blocks: tuple[int, ...]  # blocks per stage of the whole network, e.g. (3, 4, 6, 3)
    in_channels: int  # block input channels
    width: int  # channels of conv1's output and of the 3x3 conv
    out_channels: int  # block output channels
    stride: int  # spatial stride of the block (on the 3x3 conv)


TemporalFactory = Callable[[BlockSite], "nn.Module | None"]


def _position(temporal: nn.Module | None) -> str:
    if temporal is None:
        return ""
    position = getattr(temporal, "position", None)
    if position not in POSITIONS:
        raise ValueError(f"{type(temporal).__name__}.position must be one of {POSITIONS} (got {position!r})")
    return position


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). Temporal positions: before_conv1 and after_conv1."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        temporal: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.position = _position(temporal)
        if self.position == REPLACES_CONV2:
            raise ValueError(f"{type(temporal).__name__} replaces conv2, which needs a Bottleneck block")
        self.conv1 = conv3x3(in_channels, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample
        if temporal is not None:
            self.temporal = temporal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.temporal(x) if self.position == BEFORE_CONV1 else x
        out = self.relu(self.bn1(self.conv1(out)))
        if self.position == AFTER_CONV1:
            out = self.temporal(out)
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here) -> 1x1 (ResNet-50/101/152). All three temporal positions."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        temporal: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.position = _position(temporal)
        if self.position == REPLACES_CONV2 and stride != 1:
            raise ValueError(f"{type(temporal).__name__} replaces conv2 and cannot stride (stride={stride})")
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        if self.position != REPLACES_CONV2:
            self.conv2 = conv3x3(width, width, stride)
            self.bn2 = nn.BatchNorm2d(width)
        else:
            self.pretrained_ignore = ("conv2.", "bn2.")  # ImageNet keys this block drops on purpose
        self.conv3 = conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        if temporal is not None:
            self.temporal = temporal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.temporal(x) if self.position == BEFORE_CONV1 else x
        out = self.relu(self.bn1(self.conv1(out)))
        if self.position == AFTER_CONV1:
            out = self.temporal(out)
        if self.position == REPLACES_CONV2:
            out = self.temporal(out)
        else:
            out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]

RESNET_SPECS: dict[int, tuple[Block, tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}

# The tiny flavour for tests and the CPU demo: bottlenecks, two blocks a stage (so every stage has an
# odd-index block for CT-Net), base width 16 (the narrowest CT-Net's channel factorisation accepts).
DEBUG_SPEC: tuple[Block, tuple[int, int, int, int]] = (Bottleneck, (2, 2, 2, 2))
DEBUG_BASE_WIDTH = 16


class ResNet(nn.Module):
    """torchvision-layout ResNet trunk without the classifier: images (B, C, H, W) -> features (B, F).

    `block`, `layers`: block type and blocks per stage. `base_width`: channels of the stem and of
    layer1's 3x3 conv (64 for the real networks). `in_channels`: input channels (3 for RGB).
    `temporal`: the factory described in this module's docstring (None = plain 2D ResNet).
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        base_width: int = 64,
        in_channels: int = 3,
        temporal: TemporalFactory | None = None,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must give 4 stage lengths, got {list(layers)}")
        self.stage_blocks = tuple(int(n) for n in layers)
        self.conv1 = nn.Conv2d(in_channels, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = base_width
        for stage, num_blocks in enumerate(self.stage_blocks, start=1):
            width = base_width * 2 ** (stage - 1)
            stride = 1 if stage == 1 else 2
            blocks = []
            for index in range(num_blocks):
                block_stride = stride if index == 0 else 1
                out_channels = width * block.expansion
                downsample = None
                if index == 0 and (block_stride != 1 or channels != out_channels):
                    downsample = nn.Sequential(
                        conv1x1(channels, out_channels, block_stride), nn.BatchNorm2d(out_channels)
                    )
                site = BlockSite(stage, index, self.stage_blocks, channels, width, out_channels, block_stride)
                module = temporal(site) if temporal is not None else None
                blocks.append(block(channels, width, block_stride, downsample, module))
                channels = out_channels
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = channels
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's init for the ResNet's own layers; temporal modules keep their own init."""
        skip = {id(m) for blk in self.blocks() if hasattr(blk, "temporal") for m in blk.temporal.modules()}
        for m in self.modules():
            if id(m) in skip:
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def blocks(self) -> list[nn.Module]:
        """All residual blocks, layer1.0 first."""
        return [b for stage in (self.layer1, self.layer2, self.layer3, self.layer4) for b in stage]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1-bn1-relu-maxpool (exposed for models that fuse extra inputs after the stem)."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> layer4 feature map (B, F, H/32, W/32)."""
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> globally pooled features (B, num_features)."""
        return torch.flatten(self.avgpool(self.forward_features(x)), 1)


def resnet(
    depth: int = 50, temporal: TemporalFactory | None = None, debug: bool = False, in_channels: int = 3
) -> ResNet:
    """The backbone for `depth` (18/34/50/101/152), or the tiny debug flavour when `debug`."""
    if debug:
        block, layers = DEBUG_SPEC
        return ResNet(block, layers, DEBUG_BASE_WIDTH, in_channels, temporal)
    if depth not in RESNET_SPECS:
        raise ValueError(f"model.depth: {depth} is not one of {sorted(RESNET_SPECS)}")
    block, layers = RESNET_SPECS[depth]
    return ResNet(block, layers, 64, in_channels, temporal)
