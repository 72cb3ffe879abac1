"""Crop and flip parameters, computed per sample in Python and applied by the DALI graph.

Drawing them from (seed, epoch, sample id) instead of DALI's random operators gives every frame of a
clip the same crop and flip, makes resume exact, and keeps the GPU and CPU routes identical (the
graph only receives the numbers). A crop is returned as a relative region of interest
(y0, x0, y1, x1) in [0, 1], which `fn.resize(roi_relative=True)` crops and resizes in one step.
The PyAV route crops and resizes its training clips in the workers instead (`crop_resize`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

TSN_SCALES = (1.0, 0.875, 0.75, 0.66)


def tsn_positions(width: int, height: int, crop_w: int, crop_h: int) -> list[tuple[int, int]]:
    """The 13 fixed crop corners of TSN's multi-scale crop (corners, centre, edge midpoints, quarters)."""
    ws, hs = (width - crop_w) // 4, (height - crop_h) // 4
    grid = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0),
            (1, 1), (3, 1), (1, 3), (3, 3)]  # fmt: skip
    return [(i * ws, j * hs) for i, j in grid]


def multiscale_crop(
    width: int,
    height: int,
    input_size: int,
    rng: np.random.Generator,
    scales: tuple[float, ...] = TSN_SCALES,
    max_distort: int = 1,
) -> tuple[int, int, int, int]:
    """TSN multi-scale crop: (x0, y0, w, h) in pixels.

    Crop sides are `scales` of the short side (data.crop_scales), snapped to input_size when within
    3 px; width and height scale indices differ by at most `max_distort`; the corner is one of 13
    fixed positions. `scales=(1.0,)` keeps the whole short side (only the position varies).
    """
    base = min(width, height)
    sizes = [int(base * s) for s in scales]
    sizes = [input_size if abs(s - input_size) < 3 else s for s in sizes]
    pairs = [(i, j) for i in range(len(sizes)) for j in range(len(sizes)) if abs(i - j) <= max_distort]
    wi, hi = pairs[int(rng.integers(len(pairs)))]
    cw, ch = min(sizes[wi], width), min(sizes[hi], height)
    positions = tsn_positions(width, height, cw, ch)
    x0, y0 = positions[int(rng.integers(len(positions)))]
    return x0, y0, cw, ch


def random_resized_crop(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Inception-style crop (CSN training): random area and log-uniform aspect, 10 tries, else centre."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


def eval_crops(width: int, height: int, crop: int, scale_size: int, num_crops: int) -> list[tuple]:
    """Val/test crops in source pixels: short side -> scale_size, then `crop`-sided squares.

    1 crop: the centre; 3 crops: start, centre, end along the long side (left/centre/right, or
    top/middle/bottom for portrait video). Cropping before the resize is the same geometry as
    resize-then-crop and decodes/resizes fewer pixels.
    """
    short = min(width, height)
    side = min(crop * short / scale_size, short)
    cx, cy = (width - side) / 2, (height - side) / 2
    if num_crops == 1:
        return [(cx, cy, side, side)]
    if width >= height:
        return [(x, cy, side, side) for x in (0.0, cx, width - side)]
    return [(cx, y, side, side) for y in (0.0, cy, height - side)]


def to_roi(box: tuple, width: int, height: int) -> list[float]:
    """(x0, y0, w, h) pixels -> relative (y0, x0, y1, x1), the order of fn.resize's HW roi."""
    x0, y0, w, h = box
    return [y0 / height, x0 / width, (y0 + h) / height, (x0 + w) / width]


def flip_and_label(flip: str, pairs: dict[int, int], label: int, rng: np.random.Generator) -> tuple[int, int]:
    """Mirror with p=0.5 unless flip is 'off'; with 'pairs' a flipped clip takes its paired label."""
    if flip == "off":
        return 0, label
    mirror = int(rng.integers(0, 2))
    if mirror and flip == "pairs":
        label = pairs.get(label, label)
    return mirror, label


def crop_resize(frames: np.ndarray, roi: np.ndarray, size: int) -> np.ndarray:
    """Frames (n, H, W, 3) uint8 cropped to the relative `roi` (y0, x0, y1, x1) on whole pixels and
    resized to (n, size, size, 3) uint8: what the graph's fn.resize does, run by the PyAV route's workers.

    torch's antialiased bilinear filter on uint8 (channels-last) is DALI's linear filter with
    antialiasing, within 1 per pixel value inside the crop (tests/test_dali_loader.py), at a third of
    DALI's CPU time per frame; run in the worker, it also sends size x size frames to the main process
    instead of whole ones (docs/BENCHMARKS.md). At the crop's outer rows and columns DALI's filter reads
    the pixels just outside the crop; this one, like the official TSN/TSM code (crop, then resize), does
    not. Train crops only: they are whole pixels, where eval crops are fractional.
    """
    n, height, width = frames.shape[:3]
    y0, x0, y1, x1 = roi.tolist()
    top, left, bottom, right = round(y0 * height), round(x0 * width), round(y1 * height), round(x1 * width)
    crop = torch.from_numpy(frames).permute(0, 3, 1, 2)[:, :, top:bottom, left:right]  # channels-last
    if crop.shape[-2:] != (size, size):
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return np.ascontiguousarray(crop.permute(0, 2, 3, 1).numpy())
