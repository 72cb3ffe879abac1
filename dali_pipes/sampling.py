"""Which frames make a clip: pure functions of (num_frames, split, options, seed, epoch, sample id).

The semantics and names are documented in docs/DATA.md "Frame sampling" (TSM/TAM/CT-Net/TDN `ops/dataset.py`,
MMAction2 `SampleFrames`/`DenseSampleFrames`). Indices are 0-based. Every random draw comes from a
generator seeded with (seed, epoch, sample id, purpose), so a resumed or re-sharded run draws the
same clips. No DALI here: everything is numpy and unit-testable by hand.

Deliberate differences from the official code, all for videos too short for the clip (F' = F - L + 1
usable start frames with L-frame snippets; docs/DATA.md lists them and tests/test_sampling_official.py
checks everything else against the official formulas):
- uniform train with F' < T and F <= T spreads the starts as floor(i * F' / T) instead of repeating
  frame 0 (TSM, TDN/MSN, CT-Net, TAM: zeros); where the official code would call randint with F' <= 0
  (and fail) it spreads too;
- uniform val, and the 1-clip test of CT-Net and TDN/MSN, use the centre formula for every F where the
  official code returns zeros for F <= T + L - 1 (its guard is F > T + L - 1);
- uniform-N starts are linspace(0, tick - 1, N) truncated toward zero, as under numpy 1.x, which the
  official code ran on (numpy >= 2 floors, which would give a start of -1 when tick < 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Purposes mixed into the seed so that the frame draw and the crop/flip draw are independent.
TEMPORAL, SPATIAL, REPLACE = 0, 1, 2


def sample_rng(seed: int, epoch: int, sample_id: int, purpose: int) -> np.random.Generator:
    """The generator for one random choice of one sample in one epoch (order-independent)."""
    return np.random.default_rng([seed, epoch, sample_id, purpose])


@dataclass(frozen=True)
class SamplingOptions:
    """Everything the sampler needs; built from DataConfig (+ EvalConfig for test)."""

    mode: str = "uniform"  # uniform | dense | clip3d (data.sampling)
    num_segments: int = 8  # T
    snippet_len: int = 1  # consecutive frames per segment (MSN/TDN: 5)
    dense_window: int = 64
    dense_span: str = "window"  # dense start range: window (TSM, CT-Net, MMAction2) | strides (TAM)
    clip_len: int = 32
    frame_interval: int = 2
    val_sampling: str = "centre"  # dense val start: centre (TAM) | ctnet (CT-Net) | random (TSM)
    # centres | twice | uniform | uniform_random | dense | clip3d (eval.temporal_mode)
    test_mode: str = "centres"
    test_clips: int = 1  # eval.temporal_clips

    @property
    def frames_per_clip(self) -> int:
        """Frames one clip delivers: T * snippet_len, or clip_len for clip3d."""
        if self.uses_clip3d:
            return self.clip_len
        return self.num_segments * self.snippet_len

    @property
    def uses_clip3d(self) -> bool:
        return self.mode == "clip3d"

    def clips(self, split: str) -> int:
        """Temporal clips per video: 1 for train/val, test_clips (2 for 'twice') in test."""
        if split != "test":
            return 1
        return 2 if self.test_mode == "twice" else self.test_clips


# ---- uniform (TSN segments) ---------------------------------------------------------------------


def uniform_train(num_frames: int, num_segments: int, rng: np.random.Generator, new_length: int = 1):
    """Random offset inside each of T equal segments (TSM `_sample_indices`)."""
    usable = num_frames - new_length + 1
    d = usable // num_segments
    i = np.arange(num_segments)
    if d > 0:
        return i * d + rng.integers(0, d, size=num_segments)
    if num_frames > num_segments and usable > 0:
        return np.sort(rng.integers(0, usable, size=num_segments))
    return (i * max(usable, 1)) // num_segments  # F < T: spread instead of TSM's all-zeros


def uniform_centres(num_frames: int, num_segments: int) -> np.ndarray:
    """Segment centres: int(tick/2 + tick*i) with tick = F/T (val, 1-clip test)."""
    tick = num_frames / num_segments
    return np.array([int(tick / 2.0 + tick * i) for i in range(num_segments)])


def uniform_starts(num_frames: int, num_segments: int) -> np.ndarray:
    """Segment starts int(tick*i): the second clip of the twice-sample test."""
    tick = num_frames / num_segments
    return np.array([int(tick * i) for i in range(num_segments)])


def uniform_n(num_frames: int, num_segments: int, num_clips: int) -> np.ndarray:
    """TAM uniform-N / CT-Net N-clip test: starts linspace(0, tick-1, N) as ints, frame mod F.

    N = 1 gives the segment centres, as TAM's uniform-1 (linspace would give the starts). The starts
    are truncated toward zero (numpy 1.x's linspace(dtype=int)), so tick < 1 gives start 0, not -1.
    """
    if num_clips == 1:
        return uniform_centres(num_frames, num_segments)[None]
    tick = num_frames / num_segments
    starts = [int(s) for s in np.linspace(0, tick - 1, num=num_clips)]
    return np.array([[int(s + tick * i) % num_frames for i in range(num_segments)] for s in starts])


def uniform_random_n(
    num_frames: int, num_segments: int, num_clips: int, rng: np.random.Generator, new_length: int = 1
) -> np.ndarray:
    """N independent training draws (MSN/TDN Kinetics test: `_sample_indices` run N times, fused)."""
    return np.stack([uniform_train(num_frames, num_segments, rng, new_length) for _ in range(num_clips)])


# ---- dense (I3D window) -------------------------------------------------------------------------


def _dense_geometry(num_frames: int, num_segments: int, window: int, span: str) -> tuple[int, int]:
    """(stride, pos): stride = window // T; starts lie in [0, pos - 1].

    span "window": pos = max(1, 1 + F - window) (TSM, CT-Net, MMAction2, TDN/MSN); "strides": the
    window is trimmed to stride * T frames, pos = max(1, 1 + F - stride * T) (TAM). The two differ
    only when T does not divide the window (T = 3, 5, 6, 12 for 64).
    """
    stride = max(window // num_segments, 1)
    reach = window if span == "window" else stride * num_segments
    return stride, max(1, 1 + num_frames - reach)


def dense_clip(
    num_frames: int, num_segments: int, window: int, start: int, span: str = "window"
) -> np.ndarray:
    stride, _ = _dense_geometry(num_frames, num_segments, window, span)
    return (start + np.arange(num_segments) * stride) % num_frames


def dense_train(
    num_frames: int, num_segments: int, window: int, rng: np.random.Generator, span: str = "window"
) -> np.ndarray:
    """Random window start in [0, pos-2] (numpy randint(0, pos-1), as TSM), frames loop mod F."""
    _, pos = _dense_geometry(num_frames, num_segments, window, span)
    start = 0 if pos <= 2 else int(rng.integers(0, pos - 1))
    return dense_clip(num_frames, num_segments, window, start, span)


def dense_centre(
    num_frames: int, num_segments: int, window: int, span: str = "window", rule: str = "centre"
) -> np.ndarray:
    """Deterministic val clip: the window starts at pos // 2 (TAM, rule "centre") or (pos - 1) // 2
    (CT-Net, rule "ctnet"); the two differ by one frame when pos is even."""
    _, pos = _dense_geometry(num_frames, num_segments, window, span)
    start = (pos - 1) // 2 if rule == "ctnet" else pos // 2
    return dense_clip(num_frames, num_segments, window, start, span)


def dense_n(
    num_frames: int, num_segments: int, window: int, num_clips: int, span: str = "window"
) -> np.ndarray:
    """dense-N test (dense-10 for Kinetics): starts linspace(0, pos-1, N) as ints.

    N = 1 takes the centre start pos // 2 (TAM's dense-1) rather than linspace's frame 0.
    """
    _, pos = _dense_geometry(num_frames, num_segments, window, span)
    starts = [pos // 2] if num_clips == 1 else np.linspace(0, pos - 1, num=num_clips, dtype=int)
    return np.stack([dense_clip(num_frames, num_segments, window, int(s), span) for s in starts])


# ---- 3D clips (CSN) -----------------------------------------------------------------------------


def clip3d_train(num_frames: int, clip_len: int, interval: int, rng: np.random.Generator) -> np.ndarray:
    """One clip of clip_len frames every `interval`, random start over the valid range, mod F."""
    valid = num_frames - clip_len * interval + 1
    start = int(rng.integers(0, valid)) if valid > 0 else 0
    return (start + np.arange(clip_len) * interval) % num_frames


def clip3d_test(num_frames: int, clip_len: int, interval: int, num_clips: int) -> np.ndarray:
    """N evenly spread clips: span (L-1)k+1, m = max(F-span, 0), start round(j*m/(N-1)) (m//2 for N=1)."""
    span = (clip_len - 1) * interval + 1
    m = max(num_frames - span, 0)
    gap = m / (num_clips - 1) if num_clips > 1 else 0.0  # j * gap, rounded half to even, as MMAction2
    starts = [m // 2] if num_clips == 1 else [round(j * gap) for j in range(num_clips)]
    return np.stack([(s + np.arange(clip_len) * interval) % num_frames for s in starts])


# ---- the one entry point ------------------------------------------------------------------------


def expand_snippets(starts: np.ndarray, snippet_len: int, num_frames: int) -> np.ndarray:
    """Each start p becomes p..p+L-1, clamped at the last frame (MSN/TDN snippets)."""
    if snippet_len == 1:
        return starts
    frames = starts[..., :, None] + np.arange(snippet_len)
    return np.minimum(frames, num_frames - 1).reshape(*starts.shape[:-1], -1)


def clip_indices(
    num_frames: int, split: str, opts: SamplingOptions, seed: int = 0, epoch: int = 0, sample_id: int = 0
) -> np.ndarray:
    """Frame indices, shape (clips, frames_per_clip), int64, all in [0, num_frames).

    split: train | val | test. Snippet modes (snippet_len > 1) sample segment starts on
    F - (snippet_len - 1) frames and expand each start to snippet_len consecutive frames.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    T, L = opts.num_segments, opts.snippet_len
    rng = sample_rng(seed, epoch, sample_id, TEMPORAL)
    if opts.mode == "clip3d" or (split == "test" and opts.test_mode == "clip3d"):
        L3, k = opts.clip_len, opts.frame_interval
        if split == "train":
            out = clip3d_train(num_frames, L3, k, rng)[None]
        else:
            out = clip3d_test(num_frames, L3, k, opts.clips(split))
        return out.astype(np.int64)
    usable = max(num_frames - L + 1, 1)
    window, span = opts.dense_window, opts.dense_span
    if split == "train":
        if opts.mode == "dense":
            starts = dense_train(usable, T, window, rng, span)[None]
        else:
            starts = uniform_train(num_frames, T, rng, new_length=L)[None]
    elif split == "val":
        if opts.mode == "dense":
            if opts.val_sampling == "random":
                starts = dense_train(usable, T, window, rng, span)[None]
            else:
                starts = dense_centre(usable, T, window, span, rule=opts.val_sampling)[None]
        else:
            starts = uniform_centres(usable, T)[None]
    else:
        mode, n = opts.test_mode, opts.clips("test")
        if mode == "centres":
            if n != 1:
                raise ValueError("eval.temporal_mode 'centres' gives 1 clip; set eval.temporal_clips: 1")
            starts = uniform_centres(usable, T)[None]
        elif mode == "twice":
            starts = np.stack([uniform_centres(usable, T), uniform_starts(usable, T)])
        elif mode == "uniform":
            starts = uniform_n(usable, T, n)
        elif mode == "uniform_random":
            starts = uniform_random_n(num_frames, T, n, rng, new_length=L)
        elif mode == "dense":
            starts = dense_n(usable, T, window, n, span)
        else:
            raise ValueError(f"unknown eval.temporal_mode {mode!r}")
    return expand_snippets(np.asarray(starts), L, num_frames).astype(np.int64)
