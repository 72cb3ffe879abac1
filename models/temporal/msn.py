"""MSN, the Motion Sensitive Network (official code: Anonymous502-ar/MSN-Motion-Sensitive-Network-for-
Action-Recognition, ops/msn_net.py and ops/base_module.py), built on TDN's frame (models/temporal/tdn.py).

Input (N, T*5, C, H, W), segment-major: segment t is frames [5t, 5t+5) (TSN frame, snippet_len = 5).
What MSN changes in TDN's frame:
  - difference stem = a pyramid of frame differences, per 5-frame snippet f1..f5 (`FrameDifferencePyramid`):
      short: the 4 adjacent differences -> max-pool 3x3/2 -> conv 7x7/2 (12 -> 64) + BN + ReLU
      mid:   conv 7x7/2 (3 -> 16, bias) on f1, f3, f5 -> [f5 - f3, f3 - f1] -> max-pool -> conv 5x5 (32 -> 64)
             + BN + ReLU
      long:  conv 5x5 (16 -> 64, bias) on those f1, f5 maps -> f5 - f1 -> max-pool
    summed, at the stem's resolution (1/4). Fusions: 0.5/0.5 after the stem at T = 8 (else 0.75/0.25) and
    0.75/0.25 after layer1 (second layer1 on the pyramid output).
  - block module (layers 2-4, after conv1-bn1-relu), `MotionModule` then TDN's learnable shift: reduce
    to C/4 (1x1 + BN); a 3x3x3 conv + BN over each clip's frames, averaged over time (one map per clip);
    for t < T-1 the difference between frame t+1 transformed three ways (3x3 deformable conv, 5x5
    deformable conv, 3x3/1 max-pool + 1x1 conv + BN) and frame t, summed, absolute value; the last frame
    takes the temporal map instead. Spatial mean -> 1x1 conv to C + BN -> sigmoid s -> x + (s - 0.5) x.

Official quirks, kept (docs/MODELS.md):
  1. The motion module's temporal grouping is fixed at 8 frames (`Module_1(planes)` never receives
     num_segments): it regroups the N*T frames into windows of 8. For T = 16 each clip is two windows;
     T not a multiple of 8 is refused here (the official code would silently mix clips).
  2. The deformable kernels (weight and bias of both deformable convs) are never optimised: the official
     optimiser groups skip the DCN module (only its `conv_offset` trains). Here they have
     requires_grad=False and keep PyTorch's default init, as there.
  3. The offset convs are not zero-initialised: DCN zeroes them, then the official ResNet init loop
     (every nn.Conv2d: normal, std sqrt(2 / (k*k*out))) overwrites the weights; their biases stay zero.
  4. The pyramid runs segment by segment (the official loop over T), so its BatchNorms see batches of N
     snippets, one segment position at a time, during training.
  5. Unused registered tensors (TDN's conv1_5 and the second ResNet's conv1) are kept, frozen, for the
     parameter count (31,480,836 at 400 classes).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from engine.config import ModelConfig
from models.deform import DeformConv2dPack
from models.resnet import AFTER_CONV1, BlockSite
from models.temporal.tdn import (
    SNIPPET_LEN,
    DifferenceResNet,
    TemporalShiftConv,
    stem_fusion_weights,
    trunk_spec,
)
from models.video import VideoClassifier

MOTION_WINDOW = 8  # official Module_1 default, never overridden
LAYER1_FUSION = (0.75, 0.25)


def _official_conv_init(m: nn.Conv2d) -> None:
    """The official FBResNet loop: normal(0, sqrt(2 / (kh*kw*out))) = kaiming normal, fan_out, relu."""
    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class MotionModule(nn.Module):
    """MSN's motion module (official `Module_1`) on (N*T, C, H, W) frames; see the module docstring."""

    def __init__(self, channels: int, window: int = MOTION_WINDOW) -> None:
        super().__init__()
        c = max(channels // 4, 1)
        self.window = window
        self.conv_down = nn.Conv2d(channels, c, 1)
        self.bn1 = nn.BatchNorm2d(c)
        self.time_conv = nn.Conv3d(c, c, 3, padding=1)
        self.bn_t = nn.BatchNorm3d(c)
        self.motion_offset = DeformConv2dPack(c, c, 3, padding=1)
        self.motion_offset_7 = DeformConv2dPack(c, c, 5, padding=2)  # 5x5 despite the name (official)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.conv1 = nn.Conv2d(c, c, 1)
        self.bn3 = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, channels, 1)
        self.bn2 = nn.BatchNorm2d(channels)
        for m in self.modules():
            if type(m) is nn.Conv2d:  # quirk 3: includes the offset convs; not the deformable kernels
                _official_conv_init(m)
        for dcn in (self.motion_offset, self.motion_offset_7):  # quirk 2: kernels never trained
            dcn.weight.requires_grad_(False)
            dcn.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nt, channels, h, w = x.shape
        t = self.window
        out = self.bn1(self.conv_down(x))
        c = out.shape[1]
        clips = out.view(nt // t, t, c, h, w)
        summary = self.bn_t(self.time_conv(clips.transpose(1, 2))).mean(dim=2)  # (n, c, h, w)
        following = clips[:, 1:].reshape(-1, c, h, w)  # frames 1..t-1, each compared with its predecessor
        moved = (
            self.motion_offset(following)
            + self.motion_offset_7(following)
            + self.bn3(self.conv1(self.pool(following)))
        ).view(nt // t, t - 1, c, h, w)
        motion = (moved - 3 * clips[:, :-1]).abs()  # |sum over the 3 branches of (branch(t+1) - x_t)|
        pooled = torch.cat((motion.mean(dim=(3, 4)), summary.mean(dim=(2, 3))[:, None]), dim=1)
        gate = torch.sigmoid(self.bn2(self.conv(pooled.reshape(nt, c, 1, 1))))
        return x + (gate - 0.5) * x


class MSNTemporal(nn.Module):
    """What MSN adds to a block of layers 2-4, after conv1-bn1-relu: `motion` then `shift`."""

    position = AFTER_CONV1

    def __init__(self, channels: int, num_segments: int) -> None:
        super().__init__()
        self.motion = MotionModule(channels)
        self.shift = TemporalShiftConv(channels, num_segments)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shift(self.motion(x))


class FrameDifferencePyramid(nn.Module):
    """MSN's difference stem: 5-frame snippets (N*T, 15, H, W) -> (N*T, width, H/4, W/4).

    Runs one segment position at a time (quirk 4), so it needs T.
    """

    def __init__(self, width: int, num_segments: int) -> None:
        super().__init__()
        mid = width // 4
        self.num_segments = num_segments
        self.conv_1 = nn.Conv2d(3, mid, 7, stride=2, padding=3)
        self.conv_2 = nn.Conv2d(mid, width, 5, padding=2)
        self.conv_diff_1 = nn.Sequential(
            nn.Conv2d(4 * 3, width, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)
        )
        self.conv_diff_2 = nn.Sequential(
            nn.Conv2d(2 * mid, width, 5, padding=2, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)
        )
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.pretrained_new = True  # no ImageNet counterpart; PyTorch default init (as official)

    def snippet(self, x: torch.Tensor) -> torch.Tensor:
        """One segment position: (N, 15, H, W) -> (N, width, H/4, W/4)."""
        short = self.conv_diff_1(self.pool(x[:, 3:] - x[:, :-3]))  # f2-f1, f3-f2, f4-f3, f5-f4
        n = x.shape[0]
        f1, f3, f5 = self.conv_1(torch.cat((x[:, 0:3], x[:, 6:9], x[:, 12:15]))).split(n)
        mid = self.conv_diff_2(self.pool(torch.cat((f5 - f3, f3 - f1), dim=1)))
        g1, g5 = self.conv_2(torch.cat((f1, f5))).split(n)
        return short + mid + self.pool(g5 - g1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.num_segments
        clips = x.view(x.shape[0] // t, t, *x.shape[1:])
        out = torch.stack([self.snippet(clips[:, i]) for i in range(t)], dim=1)
        return out.flatten(0, 1)


def _msn_site(site: BlockSite, num_segments: int) -> nn.Module | None:
    return MSNTemporal(site.width, num_segments) if site.stage >= 2 else None


def msn_backbone(depth: int, num_segments: int, debug: bool = False) -> DifferenceResNet:
    """MSN's trunk for ResNet-`depth` (the official code builds R50 and R101)."""
    if num_segments % MOTION_WINDOW:
        raise ValueError(
            f"model.num_segments: MSN's motion module works on windows of {MOTION_WINDOW} frames (official "
            f"code), so T must be a multiple of {MOTION_WINDOW}; got {num_segments}"
        )
    block, layers, width = trunk_spec(depth, debug)
    return DifferenceResNet(
        block,
        layers,
        width,
        functools.partial(_msn_site, num_segments=num_segments),
        FrameDifferencePyramid(width, num_segments),
        stem_fusion=stem_fusion_weights(num_segments),
        layer1_fusion=LAYER1_FUSION,
        unused_conv1_5=True,
    )


def build_msn(cfg: ModelConfig) -> VideoClassifier:
    """MSN in the TSN frame: 5-frame snippets, dropout, fc (N(0, 0.001)), average consensus."""
    return VideoClassifier.from_config(cfg, msn_backbone(cfg.depth, cfg.num_segments, cfg.debug), SNIPPET_LEN)
