"""CT-Net: channel tensorisation (Li et al., ICLR 2021), the official "num_total = 7" layout.

Every odd-index bottleneck (layer1.1, layer2.1, layer2.3, layer3.1, layer3.3, layer3.5, layer4.1 in a
ResNet-50) keeps its ImageNet conv1-bn1-relu and conv3-bn3, and its conv2-bn2-relu is replaced by
`CTInteraction` on the block's P = width channels, viewed as a (x, y) grid with
x = 2^floor(log2(P)/2), y = P/x ((8, 8), (8, 16), (16, 16), (16, 32) in a ResNet-50):

  stage 1 (groups = x, channels in (x, y) order):
    s = SpatialAttention(1x3x3 conv-BN-ReLU(v)),  t = TemporalAttention(3x1x1 conv-BN-ReLU(v))
    v = ChannelAttention(s + t)
  fusion: 1x1x1 conv-BN-ReLU (all channels)
  stage 2: the same with groups = y on channels regrouped to (y, x) order; channel order restored after.

Each attention pools (spatial: over T; temporal and channel: over H, W), applies a grouped conv to P/4
channels + BN + ReLU, a grouped conv back to P and a sigmoid, and scales its input. New convs get
kaiming normal (fan_out) init and BN (1, 0), as the official block.

Implementation note: the official code runs Conv3d/BatchNorm3d on (N, C, T, H, W). Every one of its
kernels is separable (1x3x3, 3x1x1 or 1x1x1), so here each is the equal Conv2d: 1x3x3 is a 3x3 conv on
the frames (N*T, C, H, W) the backbone already holds, 3x1x1 is a (3, 1) conv on (N, C, T, H*W) (a pure
view of channels-last frames) and BatchNorm3d statistics equal BatchNorm2d's over those views. Same
parameters, same MACs, same outputs; the whole model stays 4D, so `model.to(memory_format=
torch.channels_last)` works, and official checkpoints convert by squeezing the unit kernel dimension.

The official training freezes every parameter outside the CT blocks and the new fc (about 6.4M of
21.4M trainable for a ResNet-50): `freeze_outside_ct_blocks`, switched on by `model.ctnet_freeze`.
Frozen BN layers keep updating their running statistics, as in the official code.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from models.resnet import REPLACES_CONV2, BlockSite, TemporalFactory

SPATIAL = (3, 3)  # 1x3x3 on frames (N*T, C, H, W)
TEMPORAL = (3, 1)  # 3x1x1 on (N, C, T, H*W)
POINT = (1, 1)  # 1x1x1


def channel_grid(planes: int) -> tuple[int, int]:
    """(x, y) with x = 2^floor(log2(P)/2) and x*y = P (CT-Net's factorisation of P channels)."""
    x = 2 ** math.floor(math.log2(planes) / 2)
    if planes % x or planes // x < x:
        raise ValueError(f"CT-Net needs a power-of-two channel count, got {planes}")
    return x, planes // x


def conv(cin: int, cout: int, kernel: tuple[int, int], groups: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, padding=(kernel[0] // 2, kernel[1] // 2), groups=groups, bias=False)


def conv_bn_relu(cin: int, cout: int, kernel: tuple[int, int], groups: int) -> nn.Sequential:
    return nn.Sequential(conv(cin, cout, kernel, groups), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def frames_to_time(x: torch.Tensor, t: int) -> torch.Tensor:
    """(N*T, C, H, W) -> (N, C, T, H*W); a view for contiguous and channels-last frames alike."""
    nt, c, h, w = x.shape
    return x.reshape(nt // t, t, c, h * w).transpose(1, 2)


def time_to_frames(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, C, T, H*W) -> (N*T, C, H, W)."""
    n, c, t, _ = x.shape
    return x.transpose(1, 2).reshape(n * t, c, h, w)


def regroup(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Reorder channels of (N*T, a*b, H, W) from (a, b) to (b, a), keeping x's memory format."""
    nt, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = x.permute(0, 2, 3, 1).reshape(nt, h, w, a, b).transpose(3, 4).reshape(nt, h, w, c)
        return y.permute(0, 3, 1, 2)
    return x.reshape(nt, a, b, h, w).transpose(1, 2).reshape(nt, c, h, w)


class GroupGate(nn.Module):
    """sigmoid(grouped conv back to P(grouped conv to P/4 - BN - ReLU(pooled input)))."""

    def __init__(self, planes: int, groups: int, kernel: tuple[int, int]) -> None:
        super().__init__()
        self.fc1 = conv_bn_relu(planes, planes // 4, kernel, groups)
        self.fc2 = conv(planes // 4, planes, kernel, groups)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(self.fc1(pooled)))


class TensorizedStage(nn.Module):
    """Spatial (1x3x3) and temporal (3x1x1) grouped convs, each gated, summed, then channel-gated."""

    def __init__(self, planes: int, groups: int, num_segments: int) -> None:
        super().__init__()
        self.num_segments = num_segments
        self.spatial = conv_bn_relu(planes, planes, SPATIAL, groups)
        self.temporal = conv_bn_relu(planes, planes, TEMPORAL, groups)
        self.spatial_attention = GroupGate(planes, groups, SPATIAL)  # on the mean over T
        self.temporal_attention = GroupGate(planes, groups, TEMPORAL)  # on the mean over H, W
        self.channel_attention = GroupGate(planes, groups, POINT)  # on the mean over H, W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nt, c, h, w = x.shape
        t = self.num_segments
        s = self.spatial(x).view(nt // t, t, c, h, w)
        s = s * self.spatial_attention(s.mean(dim=1)).unsqueeze(1)
        z = self.temporal(frames_to_time(x, t))  # (N, C, T, H*W)
        z = z * self.temporal_attention(z.mean(dim=3, keepdim=True))
        u = frames_to_time(s.reshape(nt, c, h, w), t) + z
        u = u * self.channel_attention(u.mean(dim=3, keepdim=True))
        return time_to_frames(u, h, w)


class CTInteraction(nn.Module):
    """Replaces a bottleneck's conv2-bn2-relu: (N*T, P, H, W) -> (N*T, P, H, W)."""

    position = REPLACES_CONV2

    def __init__(self, planes: int, num_segments: int) -> None:
        super().__init__()
        self.num_segments = num_segments
        self.gx, self.gy = channel_grid(planes)
        self.stage1 = TensorizedStage(planes, self.gx, num_segments)
        self.fusion = conv_bn_relu(planes, planes, POINT, groups=1)
        self.stage2 = TensorizedStage(planes, self.gy, num_segments)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.stage2(regroup(self.fusion(self.stage1(x)), self.gx, self.gy))  # stage 2 in (y, x) order
        return regroup(v, self.gy, self.gx)  # back to (x, y)

    def extra_repr(self) -> str:
        return f"num_segments={self.num_segments}, grid=({self.gx}, {self.gy})"


def _ct_site(site: BlockSite, num_segments: int) -> CTInteraction | None:
    return CTInteraction(site.width, num_segments) if site.index % 2 == 1 else None


def ctnet_factory(num_segments: int) -> TemporalFactory:
    """Temporal factory for `ResNet(temporal=...)`: a CT block at every odd block index."""
    return functools.partial(_ct_site, num_segments=num_segments)


def freeze_outside_ct_blocks(model: nn.Module) -> None:
    """requires_grad=False for every parameter but those of CT blocks (whole blocks) and `model.fc`."""
    keep = {id(p) for p in model.fc.parameters()}
    for block in model.backbone.blocks():
        if isinstance(getattr(block, "temporal", None), CTInteraction):
            keep.update(id(p) for p in block.parameters())
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
