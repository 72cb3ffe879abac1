"""TAM: temporal adaptive module (Liu et al., ICCV 2021; the official TANet "TAM" in every bottleneck).

Placed after conv1-bn1-relu, before the 3x3 conv, in every block. With θ the spatial mean of the input
as (N, C, T):
- global branch (weights shared over channels): Linear(T, 2T) -> BN1d -> ReLU -> Linear(2T, K) ->
  softmax, one temporal kernel of size K per (clip, channel);
- local branch: Conv1d(C, C/4, K, pad K//2) -> BN1d -> ReLU -> Conv1d(C/4, C, 1) -> sigmoid, an
  importance map scaling x per (channel, frame);
- output: the scaled x convolved over time with its (clip, channel) kernel (zero padded, stride 1).
No biases anywhere and PyTorch's default init (the official code adds none).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from models.resnet import AFTER_CONV1, BlockSite, TemporalFactory


class TAM(nn.Module):
    """Temporal adaptive module on (N*T, C, H, W) -> (N*T, C, H, W); kernel_size odd."""

    position = AFTER_CONV1

    def __init__(self, channels: int, num_segments: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"TAM kernel_size must be odd, got {kernel_size}")
        self.num_segments = num_segments
        self.kernel_size = kernel_size
        t = num_segments
        self.G = nn.Sequential(
            nn.Linear(t, 2 * t, bias=False),
            nn.BatchNorm1d(2 * t),
            nn.ReLU(inplace=True),
            nn.Linear(2 * t, kernel_size, bias=False),
            nn.Softmax(dim=-1),
        )
        self.L = nn.Sequential(
            nn.Conv1d(channels, channels // 4, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm1d(channels // 4),
            nn.ReLU(inplace=True),
            nn.Conv1d(channels // 4, channels, 1, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nt, c, h, w = x.shape
        t = self.num_segments
        n = nt // t
        theta = x.mean(dim=(2, 3)).view(n, t, c).transpose(1, 2)  # (N, C, T)
        kernel = self.G(theta.reshape(n * c, t)).view(n, 1, c, self.kernel_size)  # per (clip, channel)
        importance = self.L(theta).transpose(1, 2).reshape(n, t, c, 1, 1)
        v = x.view(n, t, c, h, w) * importance
        # out[t] = sum_k kernel[k] * v[t + k - K//2] (cross-correlation, zeros outside the clip), written
        # as shifted multiply-adds: keeps x's memory format (channels-last) and needs no grouped conv
        # over a (1, N*C, T, H*W) view as the official code.
        half = self.kernel_size // 2
        taps = kernel.to(v.dtype).unsqueeze(-1).unsqueeze(-1)  # (N, 1, C, K, 1, 1); softmax is fp32 in AMP
        out = v * taps[:, :, :, half]
        for k in range(self.kernel_size):
            d = k - half  # frame offset this tap reads
            if 0 < abs(d) < t:
                src = v[:, max(d, 0) : t + min(d, 0)]
                out[:, max(-d, 0) : t + min(-d, 0)] += src * taps[:, :, :, k]
        return out.view(nt, c, h, w)

    def extra_macs(self, x: torch.Tensor, out: torch.Tensor) -> int:
        """MACs outside conv/linear layers (models.summary): the adaptive temporal conv."""
        return out.numel() * self.kernel_size

    def extra_repr(self) -> str:
        return f"num_segments={self.num_segments}, kernel_size={self.kernel_size}"


def _tam_site(site: BlockSite, num_segments: int) -> TAM:
    return TAM(site.width, num_segments)


def tam_factory(num_segments: int) -> TemporalFactory:
    """Temporal factory for `ResNet(temporal=...)`: a TAM in every block."""
    return functools.partial(_tam_site, num_segments=num_segments)
