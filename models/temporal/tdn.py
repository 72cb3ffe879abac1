"""TDN (Wang et al., CVPR 2021) and the frame MSN builds on: 5-frame snippets, a difference stem, a
second layer1, and a temporal module in every block of layers 2-4. Official code: MCG-NJU/TDN
(ops/tdn_net.py, ops/base_module.py); MSN (models/temporal/msn.py) reuses everything here but the
stem and the block module.

Input: the TSN frame (models/video.py, `snippet_len=5`) folds (N, T*5, C, H, W) into snippets
(N*T, 5*C, H, W): segment-major, the 5 consecutive frames of a segment stacked along channels
(frame f of the snippet = channels [3f, 3f+3)), exactly the official `input.view(-1, 15, H, W)`.

`DifferenceResNet` is the shared ResNet (models/resnet.py) plus, around it:
  - the RGB stem runs on the middle frame of each snippet (channels 6:9);
  - a `difference_stem` turns the snippet's frame differences into a stem-like feature map, fused after
    the stem as  a * rgb + b * diff  (nearest-resized to the stem's size; a, b = 0.5, 0.5 at T = 8,
    else 0.75, 0.25: the official `num_segments is 8` test);
  - `diff_layer1`, a second layer1 (same blocks, own weights, ImageNet layer1 when pretrained) on the
    difference features, fused after layer1 as  c * x + d * diff_layer1(diff);
  - the per-block temporal modules go through the ResNet's temporal hook (after conv1-bn1-relu);
  - every conv of the trunk carries a bias: the official trunk is Cadene's "fbresnet" whose convs all
    have biases. From an ImageNet torchvision checkpoint (no biases) they start at zero, which leaves the
    trunk computing exactly the torchvision network.
  - `unused`: tensors the official network registers but never runs (kept so parameter counts and
    checkpoints match; requires_grad=False, never touched by forward).

TDN specifics: difference stem = 2x2 avg-pool of the 4 adjacent differences -> conv 7x7/2 (12 -> 64,
no bias) + BN + ReLU -> max-pool 3x3/2 (half the stem's resolution; nearest-upsampled at both fusions);
c, d = a, b; block module = TDN's long-term difference module (`mSEModule`) then a learnable temporal
shift.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from models.resnet import (
    AFTER_CONV1,
    DEBUG_BASE_WIDTH,
    DEBUG_SPEC,
    RESNET_SPECS,
    Block,
    BlockSite,
    Bottleneck,
    ResNet,
    TemporalFactory,
)
from models.video import VideoClassifier

SNIPPET_LEN = 5  # frames per segment


def stem_fusion_weights(num_segments: int) -> tuple[float, float]:
    """(rgb, difference) weights after the stem: the official code picks 0.5/0.5 only at T = 8."""
    return (0.5, 0.5) if num_segments == 8 else (0.75, 0.25)


class TemporalShiftConv(nn.Conv1d):
    """Learnable depthwise temporal conv (kernel 3, zero-padded, no bias) on (N*T, C, H, W) frames,
    initialised as TSM's shift: the first C/8 channels read frame t+1, the next C/8 frame t-1, the rest
    frame t. A `nn.Conv1d` (weight (C, 1, 3)) so that MAC counters see it; the forward is three
    per-channel scaled copies, which keeps channels-last layouts and avoids a (N*H*W, C, T) transpose.
    """

    def __init__(self, channels: int, num_segments: int, shift_div: int = 8) -> None:
        super().__init__(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.num_segments = num_segments
        fold = channels // shift_div
        with torch.no_grad():
            self.weight.zero_()
            self.weight[:fold, 0, 2] = 1  # out[t] = x[t+1]
            self.weight[fold : 2 * fold, 0, 0] = 1  # out[t] = x[t-1]
            self.weight[2 * fold :, 0, 1] = 1  # out[t] = x[t]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        nt, c, h, w = x.shape
        v = x.view(nt // self.num_segments, self.num_segments, c, h, w)
        k = self.weight.to(x.dtype).view(c, 3).t().reshape(3, 1, 1, c, 1, 1)  # k[j]: tap j per channel
        prev = F.pad(v[:, :-1], (0, 0, 0, 0, 0, 0, 1, 0))  # frame t sees x[t-1]
        nxt = F.pad(v[:, 1:], (0, 0, 0, 0, 0, 0, 0, 1))  # frame t sees x[t+1]
        return (k[0] * prev + k[1] * v + k[2] * nxt).view(nt, c, h, w)


def add_trunk_conv_biases(trunk: ResNet) -> None:
    """Give every bias-less Conv2d of the ResNet trunk (not of its temporal modules) a zero bias."""
    for name, m in trunk.named_modules():
        if isinstance(m, nn.Conv2d) and m.bias is None and ".temporal" not in f".{name}":
            w = m.weight
            m.bias = nn.Parameter(torch.zeros(m.out_channels, device=w.device, dtype=w.dtype))


def _reinit_(module: nn.Module) -> None:
    """torchvision's ResNet init (kaiming fan_out, zero bias, BN 1/0) on a copied stage."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class UnusedOfficialTensors(nn.Module):
    """What the official TDN/MSN networks register but never run, kept frozen for exact parameter counts
    and checkpoint compatibility: `conv1_temp` (the second ResNet's stem conv, 3 -> 64, 7x7, bias) and,
    for MSN, `conv1_5` (TDN's difference stem conv + BN, unused by MSN). Never called by forward."""

    def __init__(self, base_width: int, with_conv1_5: bool) -> None:
        super().__init__()
        self.conv1_temp = nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=True)
        if with_conv1_5:
            self.conv1_5 = nn.Sequential(
                nn.Conv2d(4 * 3, base_width, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(base_width)
            )
        self.requires_grad_(False)
        self.pretrained_new = True  # conv weights are derived from ImageNet's conv1; the BN is new


class DifferenceResNet(ResNet):
    """ResNet trunk fed with 5-frame snippets (B, 15, H, W) -> pooled features (B, num_features).

    difference_stem: (B, 15, H, W) -> (B, base_width, h, w) difference features.
    stem_fusion / layer1_fusion: (x weight, difference weight) after the stem and after layer1.
    unused_conv1_5: also register MSN's unused copy of TDN's difference conv.
    """

    def __init__(
        self,
        block: Block,
        layers: tuple[int, ...],
        base_width: int,
        temporal: TemporalFactory,
        difference_stem: nn.Module,
        stem_fusion: tuple[float, float],
        layer1_fusion: tuple[float, float],
        unused_conv1_5: bool,
    ) -> None:
        super().__init__(block, layers, base_width, 3, temporal)
        add_trunk_conv_biases(self)
        self.difference_stem = difference_stem
        self.diff_layer1 = copy.deepcopy(self.layer1)
        _reinit_(self.diff_layer1)
        self.unused = UnusedOfficialTensors(base_width, unused_conv1_5)
        self.stem_fusion = stem_fusion
        self.layer1_fusion = layer1_fusion

    def imagenet_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Complete a torchvision ImageNet state dict for this trunk the way the official code does:
        zero conv biases, layer1 copied into diff_layer1, conv1 into unused.conv1_temp, and conv1's
        channel mean tiled over 12 channels for a `conv1_5` (TDN's difference conv, MSN's unused one)."""
        state = dict(state)
        own = self.state_dict()
        for key, value in list(state.items()):
            if key.startswith("layer1."):
                state.setdefault("diff_layer1." + key[len("layer1.") :], value)
        conv1 = state.get("conv1.weight")
        if conv1 is not None:
            state.setdefault("unused.conv1_temp.weight", conv1)
            tiled = conv1.mean(dim=1, keepdim=True).expand(-1, 4 * 3, -1, -1).contiguous()
            for key in ("unused.conv1_5.0.weight", "difference_stem.conv.0.weight"):
                if key in own:
                    state.setdefault(key, tiled)
        for key, value in own.items():  # biases the torchvision trunk lacks: zero (same function)
            if key.endswith(".bias") and key not in state and key[: -len(".bias")] + ".weight" in state:
                state[key] = torch.zeros_like(value, device="cpu")
        return state

    def fuse(self, x: torch.Tensor, diff: torch.Tensor, weights: tuple[float, float]) -> torch.Tensor:
        if diff.shape[-2:] != x.shape[-2:]:
            diff = F.interpolate(diff, size=x.shape[-2:])  # nearest, as the official F.interpolate
        return weights[0] * x + weights[1] * diff

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Snippets (B, 15, H, W) -> layer4 feature map."""
        if x.shape[1] != SNIPPET_LEN * 3:
            raise ValueError(
                f"{type(self).__name__} expects 5-frame RGB snippets (B, 15, H, W), got {tuple(x.shape)}"
            )
        diff = self.difference_stem(x)
        out = self.fuse(self.stem(x[:, 6:9]), diff, self.stem_fusion)  # RGB of the middle frame
        out = self.fuse(self.layer1(out), self.diff_layer1(diff), self.layer1_fusion)
        return self.layer4(self.layer3(self.layer2(out)))


# --------------------------------------------------------------------------------------------------
# TDN's modules
# --------------------------------------------------------------------------------------------------


class ShortTermDifference(nn.Module):
    """TDN's stem-level difference module: the 4 adjacent differences of a snippet, 2x2 avg-pooled,
    through a 7x7/2 conv (12 -> width) + BN + ReLU and a 3x3/2 max-pool (1/8 of the input size)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(4 * 3, width, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)
        )
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.pretrained_new = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        diffs = x[:, 3:] - x[:, :-3]  # frame f+1 - frame f, for f = 0..3 (12 channels)
        return self.pool(self.conv(F.avg_pool2d(diffs, 2)))


class LongTermDifference(nn.Module):
    """TDN's block-level module (official `mSEModule`): excitation from differences between frame t's
    features and a depthwise-conv transform of its neighbour, forward and backward in time, each over
    three scales; output x + x * (mean of the two gates - 0.5). No conv biases (as official)."""

    def __init__(self, channels: int, num_segments: int, reduction: int = 16) -> None:
        super().__init__()
        c = channels // reduction
        self.num_segments = num_segments
        self.conv1 = nn.Conv2d(channels, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.conv3 = nn.Conv2d(c, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.conv3_smallscale2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn3_smallscale2 = nn.BatchNorm2d(c)
        self.conv3_smallscale4 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn3_smallscale4 = nn.BatchNorm2d(c)
        for m in self.modules():  # the official FBResNet init loop (normal, std sqrt(2 / (k*k*out)))
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _gate(self, diff: torch.Tensor) -> torch.Tensor:
        # 2x2 average pool (official); a 1-pixel side (tiny inputs only) is left as is instead of failing
        kernel = (min(2, diff.shape[-2]), min(2, diff.shape[-1]))
        half = self.bn3_smallscale2(self.conv3_smallscale2(F.avg_pool2d(diff, kernel)))
        half = F.interpolate(half, size=diff.shape[-2:])
        full = self.bn3_smallscale4(self.conv3_smallscale4(diff))
        return torch.sigmoid(self.bn3(self.conv3((diff + half + full) / 3.0))) - 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.num_segments
        feat = self.bn1(self.conv1(x))
        moved = self.conv2(feat)
        nt, c, h, w = feat.shape
        feat, moved = feat.view(nt // t, t, c, h, w), moved.view(nt // t, t, c, h, w)
        forward = F.pad(moved[:, 1:] - feat[:, :-1], (0, 0, 0, 0, 0, 0, 0, 1)).view(nt, c, h, w)
        backward = F.pad(moved[:, :-1] - feat[:, 1:], (0, 0, 0, 0, 0, 0, 1, 0)).view(nt, c, h, w)
        gate = 0.5 * self._gate(forward) + 0.5 * self._gate(backward)
        return x + x * gate


class TDNTemporal(nn.Module):
    """What TDN adds to a block of layers 2-4, after conv1-bn1-relu: `mse` then `shift`."""

    position = AFTER_CONV1

    def __init__(self, channels: int, num_segments: int) -> None:
        super().__init__()
        self.mse = LongTermDifference(channels, num_segments)
        self.shift = TemporalShiftConv(channels, num_segments)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shift(self.mse(x))


def _tdn_site(site: BlockSite, num_segments: int) -> nn.Module | None:
    return TDNTemporal(site.width, num_segments) if site.stage >= 2 else None


def trunk_spec(depth: int, debug: bool) -> tuple[Block, tuple[int, int, int, int], int]:
    """(block, stage lengths, base width) for a TDN/MSN trunk: bottleneck ResNets only."""
    if debug:
        return (*DEBUG_SPEC, DEBUG_BASE_WIDTH)
    if depth not in RESNET_SPECS or RESNET_SPECS[depth][0] is not Bottleneck:
        raise ValueError(f"model.depth: TDN/MSN need a bottleneck ResNet (50, 101 or 152), got {depth}")
    return (*RESNET_SPECS[depth], 64)


def tdn_backbone(depth: int, num_segments: int, debug: bool = False) -> DifferenceResNet:
    """TDN's trunk for ResNet-`depth` (the official code builds R50 and R101)."""
    block, layers, width = trunk_spec(depth, debug)
    fusion = stem_fusion_weights(num_segments)
    trunk = DifferenceResNet(
        block,
        layers,
        width,
        functools.partial(_tdn_site, num_segments=num_segments),
        ShortTermDifference(width),
        stem_fusion=fusion,
        layer1_fusion=fusion,
        unused_conv1_5=False,
    )
    with torch.no_grad():  # official: conv1_5 starts as the channel mean of a ResNet's conv1, tiled
        conv1 = trunk.conv1.weight
        trunk.difference_stem.conv[0].weight.copy_(conv1.mean(dim=1, keepdim=True).expand(-1, 12, -1, -1))
    return trunk


def build_tdn(cfg: ModelConfig) -> VideoClassifier:
    """TDN in the TSN frame: 5-frame snippets, dropout, fc (N(0, 0.001)), average consensus."""
    return VideoClassifier.from_config(cfg, tdn_backbone(cfg.depth, cfg.num_segments, cfg.debug), SNIPPET_LEN)
