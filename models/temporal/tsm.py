"""TSM: temporal shift on the residual branch (Lin et al., ICCV 2019; "blockres" placement).

Of the C channels of a block's input, the first C/shift_div take the value of the NEXT frame, the
next C/shift_div the value of the PREVIOUS frame, the rest stay; zeros enter at the clip ends. No
parameters. `tsm_factory` puts it before conv1 of every block, or of every other block (index 0, 2,
...) when layer3 has >= 23 blocks (ResNet-101/152), which is the official rule.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from models.resnet import BEFORE_CONV1, BlockSite, TemporalFactory


def temporal_shift(x: torch.Tensor, num_segments: int, shift_div: int = 8) -> torch.Tensor:
    """Shift 2*C/shift_div channels of (N*T, C, H, W) by one frame, back and forth, zero-padded."""
    nt, c, h, w = x.shape
    fold = c // shift_div
    v = x.view(nt // num_segments, num_segments, c, h, w)
    out = torch.zeros_like(v)  # keeps channels-last strides
    out[:, :-1, :fold] = v[:, 1:, :fold]  # frame t gets frame t+1
    out[:, 1:, fold : 2 * fold] = v[:, :-1, fold : 2 * fold]  # frame t gets frame t-1
    out[:, :, 2 * fold :] = v[:, :, 2 * fold :]
    return out.view(nt, c, h, w)


class TemporalShift(nn.Module):
    """Parameter-free shift; runs on the block input, residual branch only (identity unshifted)."""

    position = BEFORE_CONV1

    def __init__(self, num_segments: int, shift_div: int = 8) -> None:
        super().__init__()
        self.num_segments = num_segments
        self.shift_div = shift_div

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return temporal_shift(x, self.num_segments, self.shift_div)

    def extra_repr(self) -> str:
        return f"num_segments={self.num_segments}, shift_div={self.shift_div}"


def _tsm_site(site: BlockSite, num_segments: int, shift_div: int) -> TemporalShift | None:
    every = 2 if site.stage_blocks[2] >= 23 else 1
    return TemporalShift(num_segments, shift_div) if site.index % every == 0 else None


def tsm_factory(num_segments: int, shift_div: int = 8) -> TemporalFactory:
    """Temporal factory for `ResNet(temporal=...)`: a shift in every block (every other for R101/152)."""
    return functools.partial(_tsm_site, num_segments=num_segments, shift_div=shift_div)
