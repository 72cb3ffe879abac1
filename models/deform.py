"""Deformable convolution (DCN v1, optional v2 mask) in plain PyTorch: no compiled extension needed.

Semantics are torchvision's `deform_conv2d` (and the mmdetection DCN kernel MSN ships): for output
location (ho, wo), kernel tap (i, j) of offset group g samples the input at

    y = ho * stride_h - pad_h + i * dil_h + offset[:, g*2*K + 2*(i*kw + j)]     (K = kh * kw)
    x = wo * stride_w - pad_w + j * dil_w + offset[:, g*2*K + 2*(i*kw + j) + 1]

with bilinear interpolation; corners outside the image read zero. Offset group g covers input channels
[g*C/G, (g+1)*C/G). With all offsets zero the result equals `F.conv2d` (up to float rounding).

How: one `grid_sample` call gathers all K taps for every output location (the "columns"), one batched
matmul applies the kernel. grid_sample keeps only its input and grid for backward, far less memory than
four gathered corner tensors. Coordinates and sampling are float32 at least (bf16 coordinates would be
off by up to a quarter pixel at 56 px); the matmul runs in the input's / autocast's dtype.

`DeformConv2d` subclasses `nn.Conv2d` on purpose: it owns the same `weight`/`bias` and the same
default init, and MAC counters that hook `nn.Conv2d` count it as a conv of its kernel size (the
convention of the MSN GMACs figure).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair


def _sampling_grid(
    offset: torch.Tensor,
    in_hw: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """Offsets (B, G*2*K, Ho, Wo) -> grid_sample grid (B*G, K*Ho, Wo, 2) in align_corners=False units."""
    b, _, ho, wo = offset.shape
    kh, kw = kernel
    k = kh * kw
    h, w = in_hw
    dtype = torch.promote_types(offset.dtype, torch.float32)  # never coarser than float32
    off = offset.to(dtype).reshape(b, -1, k, 2, ho, wo)  # (B, G, K, [dy, dx], Ho, Wo)
    dev = offset.device
    tap_y = (torch.arange(kh, device=dev, dtype=dtype) * dilation[0]).repeat_interleave(kw)
    tap_x = (torch.arange(kw, device=dev, dtype=dtype) * dilation[1]).repeat(kh)
    base_y = torch.arange(ho, device=dev, dtype=dtype) * stride[0] - padding[0]
    base_x = torch.arange(wo, device=dev, dtype=dtype) * stride[1] - padding[1]
    y = off[:, :, :, 0] + (tap_y[:, None, None] + base_y[None, :, None])  # (B, G, K, Ho, Wo)
    x = off[:, :, :, 1] + (tap_x[:, None, None] + base_x[None, None, :])
    # pixel p -> normalised (2p + 1) / size - 1 (align_corners=False maps it back to p for any size)
    grid = torch.stack(((2 * x + 1) / w - 1, (2 * y + 1) / h - 1), dim=-1)
    return grid.reshape(-1, k * ho, wo, 2)


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """torchvision.ops.deform_conv2d, same arguments and shapes.

    input (B, C_in, H, W); offset (B, 2*G*kh*kw, Ho, Wo) with G offset groups; weight
    (C_out, C_in/groups, kh, kw) (groups = C_in / weight.shape[1]); mask (B, G*kh*kw, Ho, Wo) or None.
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    b, c_in, h, w = input.shape
    c_out, c_per_group, kh, kw = weight.shape
    k = kh * kw
    if c_in % c_per_group:
        raise ValueError(f"input has {c_in} channels, not a multiple of weight.shape[1]={c_per_group}")
    groups = c_in // c_per_group
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if offset.shape[0] != b or offset.shape[2:] != (ho, wo) or offset.shape[1] % (2 * k):
        raise ValueError(
            f"offset shape {tuple(offset.shape)} does not fit input {tuple(input.shape)} and a "
            f"{kh}x{kw} kernel: expected (B={b}, 2*G*{k}, {ho}, {wo})"
        )
    offset_groups = offset.shape[1] // (2 * k)
    if c_in % offset_groups:
        raise ValueError(f"{c_in} input channels cannot be split into {offset_groups} offset groups")
    grid = _sampling_grid(offset, (h, w), (kh, kw), stride, padding, dilation)
    src = input.to(grid.dtype).reshape(b * offset_groups, c_in // offset_groups, h, w)
    cols = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    cols = cols.view(b, offset_groups, c_in // offset_groups, k, ho * wo)
    if mask is not None:
        cols = cols * mask.to(cols.dtype).view(b, offset_groups, 1, k, ho * wo)
    cols = cols.to(input.dtype).reshape(b, groups, c_per_group * k, ho * wo)
    out = torch.matmul(weight.reshape(groups, c_out // groups, c_per_group * k), cols)
    out = out.reshape(b, c_out, ho, wo)
    if bias is not None:
        out = out + bias.to(out.dtype).view(1, -1, 1, 1)
    return out


class DeformConv2d(nn.Conv2d):
    """A conv whose taps move by a per-location offset: `forward(x, offset, mask=None)`.

    Same constructor, parameters and default init as `nn.Conv2d` (zeros padding only).
    """

    def forward(  # type: ignore[override]
        self, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return deform_conv2d(
            input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask
        )


class DeformConv2dPack(DeformConv2d):
    """A deformable conv that predicts its own offsets with `conv_offset` (same kernel/stride/padding).

    `conv_offset` starts at zero (the layer then begins as a plain conv), as in DCN; a model that wants
    otherwise re-initialises it. `offset_groups` offsets are predicted per location.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        offset_groups: int = 1,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        kh, kw = self.kernel_size
        self.conv_offset = nn.Conv2d(
            in_channels,
            2 * offset_groups * kh * kw,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=True,
        )
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(input, self.conv_offset(input))
