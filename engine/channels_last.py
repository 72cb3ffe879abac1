"""Channels-last memory format for a model and its input batches (2D NTCHW and 3D NCTHW alike)."""

from __future__ import annotations

import torch
from torch import nn


def to_channels_last(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Channels-last input: NCTHW gets channels_last_3d; an NTCHW clip is stored as N,T,H,W,C so that the
    model's fold to (N*T, C, H, W) is already a channels_last 4D tensor (a view, no copy)."""
    if layout == "NCTHW":
        return x.contiguous(memory_format=torch.channels_last_3d)
    if x.dim() == 5:
        return x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    return x


def model_channels_last(model: nn.Module) -> nn.Module:
    """Channels-last weights: 4D tensors get channels_last and 5D ones channels_last_3d (a 2D model may
    hold Conv3d layers, e.g. CT-Net, which `Module.to(memory_format=...)` refuses). Before the optimizer."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.dim() in (4, 5):
            fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
            t.data = t.data.contiguous(memory_format=fmt)
    return model

