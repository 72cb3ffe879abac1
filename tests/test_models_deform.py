"""The plain-PyTorch deformable convolution (models/deform.py) against independent references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.deform import DeformConv2d, DeformConv2dPack, deform_conv2d

pytestmark = pytest.mark.usefixtures("one_thread")


CASES = [  # (stride, padding, dilation, groups, offset_groups, kernel)
    (1, 1, 1, 1, 1, 3),
    (2, 1, 1, 2, 1, 3),
    (1, 2, 2, 1, 2, 3),
    (2, 0, 1, 4, 4, 3),
    (1, 2, 1, 1, 1, 5),
    (1, 0, 1, 2, 2, 1),
]


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _problem(case, seed=0, dtype=torch.float32, scale=1.5):
    s, p, d, g, og, k = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 9, 7, generator=gen, dtype=dtype)
    w = torch.randn(6 if g != 4 else 8, 8 // g, k, k, generator=gen, dtype=dtype)
    b = torch.randn(w.shape[0], generator=gen, dtype=dtype)
    ho, wo = _out_size(9, k, s, p, d), _out_size(7, k, s, p, d)
    off = torch.randn(2, 2 * og * k * k, ho, wo, generator=gen, dtype=dtype) * scale
    return x, w, b, off


def tap_by_tap_reference(x, offset, weight, bias, stride, padding, dilation, mask=None):
    """One grid_sample per (offset group, kernel tap) with align_corners=True pixel mapping, then a
    plain sum over taps and channels: no columns, no shared code with models/deform.py."""
    b, cin, h, w = x.shape
    cout, cpg, kh, kw = weight.shape
    groups = cin // cpg
    og = offset.shape[1] // (2 * kh * kw)
    ho, wo = offset.shape[2:]
    out = torch.zeros(b, cout, ho, wo, dtype=x.dtype)
    ys = torch.arange(ho, dtype=x.dtype) * stride - padding
    xs = torch.arange(wo, dtype=x.dtype) * stride - padding
    for g in range(og):
        chans = slice(g * cin // og, (g + 1) * cin // og)
        for i in range(kh):
            for j in range(kw):
                tap = i * kw + j
                dy = offset[:, g * 2 * kh * kw + 2 * tap]
                dx = offset[:, g * 2 * kh * kw + 2 * tap + 1]
                py = ys[:, None] + i * dilation + dy
                px = xs[None, :] + j * dilation + dx
                grid = torch.stack((2 * px / (w - 1) - 1, 2 * py / (h - 1) - 1), dim=-1)
                sampled = F.grid_sample(x[:, chans], grid, align_corners=True, padding_mode="zeros")
                if mask is not None:
                    sampled = sampled * mask[:, g * kh * kw + tap][:, None]
                for c_local in range(sampled.shape[1]):
                    c = g * cin // og + c_local
                    grp = c // cpg
                    outs = slice(grp * cout // groups, (grp + 1) * cout // groups)
                    tap_weight = weight[outs, c % cpg, i, j][None, :, None, None]
                    out[:, outs] += tap_weight * sampled[:, c_local, None]
    return out + bias[None, :, None, None]


@pytest.mark.parametrize("case", CASES)
def test_zero_offset_equals_plain_conv(case):
    s, p, d, g, og, k = case
    x, w, b, off = _problem(case)
    out = deform_conv2d(x, torch.zeros_like(off), w, b, s, p, d)
    torch.testing.assert_close(out, F.conv2d(x, w, b, s, p, d, g), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_fractional_offsets_match_grid_sample_reference(case):
    s, p, d, g, og, k = case
    x, w, b, off = _problem(case, dtype=torch.float64, scale=2.5)  # many taps land outside the image
    out = deform_conv2d(x, off, w, b, s, p, d)
    torch.testing.assert_close(out, tap_by_tap_reference(x, off, w, b, s, p, d), atol=1e-4, rtol=1e-4)


def test_mask_matches_reference():
    case = (1, 1, 1, 2, 2, 3)
    x, w, b, off = _problem(case, dtype=torch.float64)
    mask = torch.rand(2, 2 * 9, *off.shape[2:], dtype=torch.float64)
    out = deform_conv2d(x, off, w, b, 1, 1, 1, mask=mask)
    ref = tap_by_tap_reference(x, off, w, b, 1, 1, 1, mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_bilinear_weights_by_hand():
    """1x1 kernel, weight 1: the output is the input sampled at (y + dy, x + dx), zero outside."""
    img = torch.arange(12.0).view(1, 1, 3, 4)
    off = torch.zeros(1, 2, 3, 4)
    off[0, 0, 1, 1], off[0, 1, 1, 1] = 0.25, 0.5  # sample (1.25, 1.5)
    off[0, 0, 0, 1] = -0.5  # sample (-0.5, 1): half of pixel (0, 1), the other half outside
    off[0, 0, 2, 3] = 5.0  # far outside: zero
    out = deform_conv2d(img, off, torch.ones(1, 1, 1, 1))
    expected = 0.75 * (0.5 * 5 + 0.5 * 6) + 0.25 * (0.5 * 9 + 0.5 * 10)
    assert out[0, 0, 1, 1].item() == pytest.approx(expected, abs=1e-5)
    assert out[0, 0, 0, 1].item() == pytest.approx(0.5 * 1.0, abs=1e-6)
    assert out[0, 0, 2, 3].item() == 0.0
    assert out[0, 0, 2, 2].item() == pytest.approx(10.0, abs=1e-5)  # untouched location: identity


def test_integer_offset_is_a_shift():
    """Every tap moved one row down = a plain conv whose zero padding moved from the top to the bottom."""
    x, w, b, off = _problem(CASES[0])
    off = torch.zeros_like(off)
    off[:, 0::2] = 1.0
    ref = F.conv2d(F.pad(x, (1, 1, 0, 2)), w, b)
    torch.testing.assert_close(deform_conv2d(x, off, w, b, 1, 1), ref, atol=2e-5, rtol=1e-5)


def test_gradcheck():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, generator=gen, requires_grad=True)
    # keep samples away from integer coordinates, where bilinear interpolation has kinks
    off = (0.3 + 0.4 * torch.rand(1, 18, 4, 4, dtype=torch.float64, generator=gen)).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: deform_conv2d(*a, stride=1, padding=1), (x, off, w, b))


def test_pack_starts_as_plain_conv_and_learns_offsets():
    torch.manual_seed(0)
    layer = DeformConv2dPack(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 8, 8)
    ref = F.conv2d(x, layer.weight, layer.bias, padding=1)
    out = layer(x)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    out.square().sum().backward()
    assert layer.conv_offset.weight.grad is not None and layer.conv_offset.weight.grad.abs().sum() > 0
    assert isinstance(layer, torch.nn.Conv2d)  # MAC counters hooking nn.Conv2d count it


def test_autocast_bf16_close_and_finite():
    layer = DeformConv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 10, 10)
    off = torch.randn(2, 18, 10, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, off)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), layer(x, off), atol=0.1, rtol=0.05)


def test_bad_offset_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="offset shape"):
        deform_conv2d(torch.randn(1, 4, 8, 8), torch.zeros(1, 17, 8, 8), torch.randn(4, 4, 3, 3), padding=1)
