"""Sampler cases computed by hand from the rules in docs/DATA.md "Frame sampling" (0-based indices)."""

from __future__ import annotations

import numpy as np
import pytest

from dali_pipes.augment import eval_crops, flip_and_label, multiscale_crop, tsn_positions
from dali_pipes.listfile import ListFileError, read_flip_pairs, read_list
from dali_pipes.sampling import SamplingOptions, clip_indices, uniform_train
from dali_pipes.source import PAD, epoch_order


def idx(F, split, **kw):
    seed = kw.pop("seed", 0)
    return clip_indices(F, split, SamplingOptions(**kw), seed=seed, epoch=kw.pop("epoch", 0), sample_id=3)


def test_uniform_val_centres():
    # tick = 80/8 = 10 -> int(5 + 10 i)
    assert idx(80, "val", num_segments=8).tolist() == [[5, 15, 25, 35, 45, 55, 65, 75]]
    # tick = 30/8 = 3.75 -> int(1.875 + 3.75 i)
    assert idx(30, "val", num_segments=8).tolist() == [[1, 5, 9, 13, 16, 20, 24, 28]]


def test_uniform_short_video_spreads():
    # F < T: centres formula int(0.3125 + 0.625 i) and train spread floor(i*F/T)
    assert idx(5, "val", num_segments=8).tolist() == [[0, 0, 1, 2, 2, 3, 4, 4]]
    assert idx(5, "train", num_segments=8).tolist() == [[0, 0, 1, 1, 2, 3, 3, 4]]
    assert idx(1, "train", num_segments=4).tolist() == [[0, 0, 0, 0]]


def test_uniform_train_one_frame_per_segment():
    for seed in range(20):
        got = idx(83, "train", num_segments=8, seed=seed)[0]
        d = 83 // 8  # 10
        assert all(i * d <= f < (i + 1) * d for i, f in enumerate(got))
    # F == T: d = 1, offsets all zero
    assert idx(8, "train", num_segments=8).tolist() == [list(range(8))]


def test_uniform_train_sorted_random_branch():
    # new_length 5, F = 10, T = 8: usable 6 // 8 = 0 and F > T -> sorted draws from [0, 6)
    got = uniform_train(10, 8, np.random.default_rng(1), new_length=5)
    assert (np.diff(got) >= 0).all() and got.min() >= 0 and got.max() < 6


def test_twice_and_uniform_n():
    # F = 40, T = 4: tick 10; centres 5,15,25,35; starts 0,10,20,30
    got = idx(40, "test", num_segments=4, test_mode="twice")
    assert got.tolist() == [[5, 15, 25, 35], [0, 10, 20, 30]]
    # uniform-4: starts linspace(0, 9, 4) as int = 0, 3, 6, 9
    got = idx(40, "test", num_segments=4, test_mode="uniform", test_clips=4)
    assert got[:, 0].tolist() == [0, 3, 6, 9] and got[3].tolist() == [9, 19, 29, 39]


def test_dense():
    # F = 100, T = 8: stride 8, pos = 37; val centre start 18
    assert idx(100, "val", mode="dense").tolist() == [[18 + 8 * i for i in range(8)]]
    # dense-10: starts linspace(0, 36, 10) as int
    got = idx(100, "test", mode="dense", test_mode="dense", test_clips=10)
    assert got[:, 0].tolist() == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36]
    # dense-1: the val clip (centre start), not linspace's frame 0
    one = idx(100, "test", mode="dense", test_mode="dense", test_clips=1)
    assert one.tolist() == [[18 + 8 * i for i in range(8)]]
    # short video loops: F = 20, pos = 1, start 0 -> (8 i) mod 20
    assert idx(20, "train", mode="dense").tolist() == [[0, 8, 16, 4, 12, 0, 8, 16]]
    for seed in range(20):
        start = idx(100, "train", mode="dense", seed=seed)[0, 0]
        assert 0 <= start <= 35  # randint(0, pos - 1) exclusive
    assert idx(100, "val", mode="dense", val_sampling="random", seed=5).shape == (1, 8)


def test_clip3d():
    # L = 4, k = 2, F = 20, N = 3: span 7, m = 13, starts 0, round(6.5) = 6, 13
    got = idx(20, "test", mode="clip3d", clip_len=4, frame_interval=2, test_mode="clip3d", test_clips=3)
    assert got.tolist() == [[0, 2, 4, 6], [6, 8, 10, 12], [13, 15, 17, 19]]
    assert idx(20, "val", mode="clip3d", clip_len=4, frame_interval=2).tolist() == [[6, 8, 10, 12]]
    # F < span: start 0, frames loop mod F
    assert idx(5, "train", mode="clip3d", clip_len=4, frame_interval=2).tolist() == [[0, 2, 4, 1]]
    for seed in range(10):
        s = idx(20, "train", mode="clip3d", clip_len=4, frame_interval=2, seed=seed)[0, 0]
        assert 0 <= s <= 12


def test_snippets():
    # F = 44, L = 5: starts from centres of F' = 40, T = 4: 5, 15, 25, 35 -> 5 consecutive each
    got = idx(44, "val", num_segments=4, snippet_len=5)
    assert got.tolist() == [[5, 6, 7, 8, 9, 15, 16, 17, 18, 19, 25, 26, 27, 28, 29, 35, 36, 37, 38, 39]]
    # short video: clamped at the last frame
    got = idx(3, "val", num_segments=2, snippet_len=5)
    assert got.max() == 2 and got.shape == (1, 10)


def test_reproducible_per_seed_epoch_sample():
    a = clip_indices(300, "train", SamplingOptions(), seed=1, epoch=2, sample_id=7)
    b = clip_indices(300, "train", SamplingOptions(), seed=1, epoch=2, sample_id=7)
    c = clip_indices(300, "train", SamplingOptions(), seed=1, epoch=3, sample_id=7)
    assert (a == b).all() and not (a == c).all()


def test_multiscale_crop_rules():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        x, y, w, h = multiscale_crop(340, 256, 224, rng)
        sizes = [256, 224, 192, 168]  # 256*.875 = 224 snapped; int(256*.66) = 168
        assert w in sizes and h in sizes and abs(sizes.index(w) - sizes.index(h)) <= 1
        assert (x, y) in tsn_positions(340, 256, w, h) and x + w <= 340 and y + h <= 256
        seen.add((x, y, w, h))
    assert len(seen) > 40
    assert len(set(tsn_positions(340, 256, 168, 168))) == 13
    # crop_scales [1.0]: the whole short side, only the position along the long side varies
    boxes = {multiscale_crop(340, 256, 224, rng, scales=(1.0,)) for _ in range(50)}
    assert {b[2:] for b in boxes} == {(256, 256)} and {b[0] for b in boxes} == {0, 21, 42, 63, 84}


def test_eval_crops_and_flip():
    # 64x48, scale 48, crop 48: one centre square, three along the long side
    assert eval_crops(64, 48, 48, 48, 1) == [(8.0, 0.0, 48, 48)]
    assert [c[0] for c in eval_crops(64, 48, 48, 48, 3)] == [0.0, 8.0, 16.0]
    assert [c[1] for c in eval_crops(48, 64, 48, 48, 3)] == [0.0, 8.0, 16.0]  # portrait: vertical
    rng = np.random.default_rng(0)
    out = [flip_and_label("pairs", {1: 2, 2: 1}, 1, rng) for _ in range(50)]
    assert {(m, lab) for m, lab in out} == {(0, 1), (1, 2)}
    assert all(flip_and_label("off", {}, 1, rng) == (0, 1) for _ in range(5))


def test_epoch_order_shards():
    for uneven in ("pad", "drop"):
        lens = [len(epoch_order(11, "train", 0, 0, r, 2, 2, uneven)) for r in range(2)]
        assert lens[0] == lens[1] and lens[0] % 2 == 0
    pad = np.concatenate([epoch_order(11, "train", 0, 0, r, 2, 2, "pad") for r in range(2)])
    assert set(pad.tolist()) == set(range(11))
    ev = [epoch_order(7, "val", 0, 0, r, 2, 3, "pad") for r in range(2)]
    real = [i for o in ev for i in o.tolist() if i != PAD]
    assert sorted(real) == list(range(7))
    e0, e1 = (epoch_order(11, "train", 0, e, 0, 1, 1, "pad") for e in (0, 1))
    assert sorted(e0) == sorted(e1) and not (e0 == e1).all()  # reshuffled per epoch


def test_list_errors(tmp_path):
    good = tmp_path / "l.txt"
    good.write_text("a dir/with space.webm 40 3\n\nb.webm 12 0\n")
    entries = read_list(good)
    assert [e.path for e in entries] == [str(tmp_path / "a dir/with space.webm"), str(tmp_path / "b.webm")]
    assert entries[1].line == 3 and entries[1].where.endswith("l.txt:3")
    for text, why in [("a.webm 40\n", "expected"), ("a.webm x 1\n", "integers"), ("a.webm 0 1\n", ">= 1")]:
        bad = tmp_path / "bad.txt"
        bad.write_text("ok.webm 3 1\n" + text)
        with pytest.raises(ListFileError, match=f"bad.txt:2: .*{why}"):
            read_list(bad)
    pairs = tmp_path / "p.txt"
    pairs.write_text("1 2\n5 6\n")
    assert read_flip_pairs(pairs) == {1: 2, 2: 1, 5: 6, 6: 5}
    pairs.write_text("1 2\n1 3\n")
    with pytest.raises(ListFileError, match="p.txt:2"):
        read_flip_pairs(pairs)
