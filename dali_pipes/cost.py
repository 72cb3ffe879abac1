"""Decode cost of a video for a sampler, from its packet index alone: frames decoded per frame kept.

The cost is set by the file (keyframe interval, B-frames, open GOPs), not by the loader, so it can be
priced before training. Both routes are priced with the code they decode with:
- PyAV route: `video_io.decode_plan`, the plan decode_frames follows (seek to the keyframe before each
  wanted frame, decode to it, skip frames nothing references), so the count equals the route's own
  `stats["decoded"]`;
- DALI video decoder with trimming (`data.trim: on`): `trim.decoded_frames`, as the profiler computes it.
A clip's cost is decoded frames / kept frames (kept = the clip's frame indices, repeats included). The
expected cost over the sampler's random draws is the mean over seeded draws (epochs 0, 1, ...: the
draws the loader makes for that sample), drawn until its standard error is under `REL_SE` of the mean.
"""

from __future__ import annotations

import math

import numpy as np

from .sampling import SamplingOptions, clip_indices
from .trim import TrimError, decoded_frames
from .video_io import VideoIndex, decode_plan

REL_SE = 0.005  # stop drawing when the standard error of the mean is this fraction of it
BATCH, MAX_DRAWS = 8, 256


def pyav_decoded(index: VideoIndex, indices: np.ndarray) -> int:
    """Frames the PyAV route decodes for `indices` (the sum of decode_plan's produced packets)."""
    return int(sum(int(produced.sum()) for _, _, produced in decode_plan(index, indices)))


def clip_costs(index: VideoIndex, indices: np.ndarray) -> tuple[float, float]:
    """(PyAV, trimmed DALI) decoded frames per kept frame for one clip; DALI is nan when the video
    cannot be trimmed (open GOP, codec, payloads not stored verbatim)."""
    kept = np.asarray(indices).size
    try:
        dali = decoded_frames(index, indices, trimmed=True) / kept
    except TrimError:
        dali = math.nan
    return pyav_decoded(index, indices) / kept, dali


def expected_costs(
    index: VideoIndex, num_frames: int, split: str, opts: SamplingOptions, seed: int, sample_id: int,
    draws: int = 0,
) -> tuple[float, float, int]:  # fmt: skip
    """(PyAV, DALI) expected cost per kept frame over the sampler's draws, and the draws used.

    draws > 0: exactly that many (epochs 0..draws-1); 0: adaptive (see REL_SE). A deterministic
    split (val, centre/uniform test views) gives the same clip every draw, so it stops at BATCH.
    """
    pyav, dali = [], []
    limit = draws or MAX_DRAWS
    while len(pyav) < limit:
        for epoch in range(len(pyav), min(limit, len(pyav) + (draws or BATCH))):
            idx = clip_indices(num_frames, split, opts, seed, epoch, sample_id).ravel()
            a, b = clip_costs(index, idx)
            pyav.append(a)
            dali.append(b)
        if not draws and _converged(pyav) and (math.isnan(dali[0]) or _converged(dali)):
            break
    return float(np.mean(pyav)), float(np.mean(dali)), len(pyav)


def _converged(values: list[float]) -> bool:
    mean = float(np.mean(values))
    se = float(np.std(values, ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else math.inf
    return se <= REL_SE * mean
