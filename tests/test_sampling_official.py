"""`clip_indices` against the official sampling rules, over a grid of video lengths F and segment counts T.

Every `official_*` function below restates one rule of one official repository's dataset code, read
from the source (not from dali_pipes/sampling.py), in 0-based frames (the TSM family adds 1 because its
JPEG frames are numbered from 1):

- TSM: mit-han-lab/temporal-shift-module ops/dataset.py, TSNDataSet._sample_indices /
  _get_val_indices / _get_test_indices (dense_sample, twice_sample, new_length).
- TAM: liu-zhy/temporal-adaptive-module ops/dataset.py (dense window t_stride * T, val start
  pos // 2, test_sample "dense-N" / "uniform-N").
- CT-Net: Andy1621/CT-Net ops/dataset_origin.py (the TSNDataSet ops/__init__.py exports): val start
  (pos - 1) // 2; its --dense-sample test takes 4 uniform clips; twice.
- TDN / MSN: MCG-NJU/TDN and Anonymous502-ar/MSN-Motion-Sensitive-Network-for-Action-Recognition
  ops/dataset.py (one sampler, new_length 5); their Kinetics test runs `_sample_indices` once per
  --clip_index 0..9 (test_models_three_crops.py) and pkl_to_results.py averages the softmax.
- MMAction2: open-mmlab/mmaction2 mmaction/datasets/transforms/loading.py, SampleFrames (clip_len 1
  for the 2D models, clip_len x frame_interval for 3D) and DenseSampleFrames (val and test use its
  test mode).

Random rules take `draws`, numpy's legacy `randint(low, high=None, size=None)` drawing from the
sample's generator, so one seed gives the official and our clip the same draws: a random mode is
compared frame for frame, not only its range. Where the official code returns all zeros or fails
(`None`) for a too-short video, the test checks our documented rule instead (docs/DATA.md).
"""

from __future__ import annotations

import numpy as np
import pytest

from dali_pipes.sampling import TEMPORAL, SamplingOptions, clip_indices, sample_rng

F_GRID = list(range(1, 80)) + list(range(80, 601, 13)) + [599, 600]
T_GRID = (1, 2, 4, 8, 16)
T_NOT_DIVIDING_64 = (3, 5, 6, 12)
SEED, EPOCH = 7, 3


class Draws:
    """numpy's legacy randint signature over the generator clip_indices uses for this sample."""

    def __init__(self, sample_id: int) -> None:
        self.rng = sample_rng(SEED, EPOCH, sample_id, TEMPORAL)

    def randint(self, low: int, high: int | None = None, size: int | None = None):
        lo, hi = (0, low) if high is None else (low, high)
        return self.rng.integers(lo, hi, size=size)


def ours(F: int, split: str, **kw) -> list[list[int]]:
    return clip_indices(F, split, SamplingOptions(**kw), seed=SEED, epoch=EPOCH, sample_id=F).tolist()


def snippets(offsets: list[int], L: int, F: int) -> list[int]:
    """TSM-family `get`: from each offset read L frames, advancing while the frame is not the last."""
    out = []
    for o in offsets:
        p = o
        for _ in range(L):
            out.append(p)
            if p < F - 1:
                p += 1
    return out


def trunc_linspace(a: float, b: float, n: int) -> list[int]:
    """np.linspace(a, b, n, dtype=int) as numpy 1.x computed it (astype: truncation toward zero)."""
    return [int(v) for v in np.linspace(a, b, num=n)]


# ---- uniform (TSN segments) ---------------------------------------------------------------------


def official_tsm_train(F: int, T: int, L: int, draws: Draws) -> list[int] | None:
    """TSM / TAM / CT-Net `_sample_indices` (not dense); None where randint would raise."""
    average = (F - L + 1) // T
    if average > 0:
        return [i * average + int(r) for i, r in enumerate(draws.randint(average, size=T))]
    if F > T:
        if F - L + 1 <= 0:
            return None
        return sorted(int(r) for r in draws.randint(F - L + 1, size=T))
    return [0] * T


def official_tdn_train(F: int, T: int, L: int, draws: Draws) -> list[int] | None:
    """TDN / MSN `_sample_indices` (I3D_sample is False): the literal 5 is theirs."""
    n = F - L + 1
    average = ((F - 5 + 1) if n < T else n) // T
    if average > 0:
        return [i * average + int(r) for i, r in enumerate(draws.randint(average, size=T))]
    if F > T:
        high = n if n >= T else F - 5 + 1
        if high <= 0:
            return None
        return sorted(int(r) for r in draws.randint(high, size=T))
    return [0] * T


def official_guarded_centres(F: int, T: int, L: int) -> list[int]:
    """`_get_val_indices` of every TSM-family repo (and the 1-clip test of CT-Net, TDN/MSN)."""
    if F > T + L - 1:
        tick = (F - L + 1) / float(T)
        return [int(tick / 2.0 + tick * x) for x in range(T)]
    return [0] * T


def official_tsm_test(F: int, T: int, L: int, twice: bool = False) -> list[list[int]]:
    """TSM `_get_test_indices` (no guard); twice_sample appends the segment starts (CT-Net's too)."""
    tick = (F - L + 1) / float(T)
    clips = [[int(tick / 2.0 + tick * x) for x in range(T)]]
    if twice:
        clips.append([int(tick * x) for x in range(T)])
    return clips


def official_tam_uniform(F: int, T: int, L: int, n: int) -> list[list[int]]:
    """TAM test_sample "uniform-N": N = 1 the centres, else starts linspace(0, tick - 1, N), mod F."""
    tick = (F - L + 1) / float(T)
    if n == 1:
        return [[int(tick / 2.0 + tick * x) for x in range(T)]]
    return [[int(s + tick * x) % F for x in range(T)] for s in trunc_linspace(0, tick - 1, n)]


def official_ctnet_four_clips(F: int, T: int, L: int) -> list[list[int]]:
    """CT-Net test with --dense-sample: 4 uniform clips, starts linspace(0, tick - 1, 4), no mod."""
    tick = (F - L + 1) / float(T)
    return [[int(x * tick + s) for x in range(T)] for s in trunc_linspace(0, tick - 1, 4)]


def official_mmaction_train(F: int, T: int, draws: Draws) -> list[int]:
    """SampleFrames(clip_len=1, num_clips=T) train (keep_tail_frames off)."""
    average = F // T
    if average > 0:
        return [i * average + int(r) for i, r in enumerate(draws.randint(average, size=T))]
    if F > max(T, 1):
        return sorted(int(r) for r in draws.randint(F, size=T))
    if average == 0:
        return [int(v) for v in np.around(np.arange(T) * (F / T))]
    return [0] * T


def official_mmaction_test(F: int, T: int, twice: bool = False) -> list[list[int]]:
    """SampleFrames(clip_len=1, num_clips=T, test_mode=True): offsets a*i + a/2 (+ a*i), mod F, int."""
    a = F / float(T)
    base = np.arange(T) * a
    clips = [base + a / 2.0] + ([base] if twice else [])
    return [np.mod(c, F).astype(np.int32).tolist() for c in clips]


def spread(F: int, T: int, L: int) -> list[int]:
    """Our documented short-video rule for uniform train: floor(i * F' / T), F' = max(F - L + 1, 1)."""
    usable = max(F - L + 1, 1)
    return [i * usable // T for i in range(T)]


def centres_always(F: int, T: int, L: int) -> list[int]:
    """Our documented val rule: the centre formula for every F (F' = max(F - L + 1, 1))."""
    tick = max(F - L + 1, 1) / float(T)
    return [int(tick / 2.0 + tick * x) for x in range(T)]


@pytest.mark.parametrize("L", [1, 5])
def test_uniform_train_tsm_family(L):
    for T in T_GRID:
        for F in F_GRID:
            got = ours(F, "train", num_segments=T, snippet_len=L)
            official = official_tsm_train(F, T, L, Draws(F))
            if official is not None and (F - L + 1 >= T or F > T):
                assert got == [snippets(official, L, F)], (F, T)
            else:  # official: zeros (F <= T) or randint raising (F' <= 0)
                assert got == [snippets(spread(F, T, L), L, F)], (F, T)


def test_uniform_train_tdn_msn():
    for T in T_GRID:
        for F in F_GRID:
            got = ours(F, "train", num_segments=T, snippet_len=5)
            official = official_tdn_train(F, T, 5, Draws(F))
            if official is not None and (F - 4 >= T or F > T):
                assert got == [snippets(official, 5, F)], (F, T)
            else:
                assert got == [snippets(spread(F, T, 5), 5, F)], (F, T)


def test_uniform_train_mmaction2():
    for T in T_GRID:
        for F in F_GRID:
            got = ours(F, "train", num_segments=T)
            if F >= T:
                assert got == [official_mmaction_train(F, T, Draws(F))], (F, T)
            else:  # MMAction2 rounds i * F / T half to even; we floor (both spread the short video)
                assert got == [spread(F, T, 1)], (F, T)


@pytest.mark.parametrize("L", [1, 5])
def test_uniform_val_centres(L):
    for T in T_GRID:
        for F in F_GRID:
            got = ours(F, "val", num_segments=T, snippet_len=L)
            if F > T + L - 1:  # the official guard (so F = T + L - 1 is already the short case)
                assert got == [snippets(official_guarded_centres(F, T, L), L, F)], (F, T)
            else:
                assert got == [snippets(centres_always(F, T, L), L, F)], (F, T)


@pytest.mark.parametrize("L", [1, 5])
def test_one_clip_test_is_the_centres(L):
    """TSM's test and TAM's uniform-1 have no guard; CT-Net's and TDN/MSN's (sth-sth) have the val guard."""
    for T in T_GRID:
        for F in F_GRID:
            if F - L + 1 < 1:
                continue  # the official tick would be <= 0 (negative frames)
            want = [snippets(c, L, F) for c in official_tsm_test(F, T, L)]
            assert ours(F, "test", num_segments=T, snippet_len=L, test_mode="centres") == want, (F, T)
            assert [snippets(c, L, F) for c in official_tam_uniform(F, T, L, 1)] == want
            got = ours(F, "test", num_segments=T, snippet_len=L, test_mode="uniform", test_clips=1)
            assert got == want, (F, T)
            if F > T + L - 1:
                assert [snippets(official_guarded_centres(F, T, L), L, F)] == want
            if L == 1:
                assert official_mmaction_test(F, T) == want, (F, T)


def test_one_clip_uniform_by_hand():
    # F = 20, T = 8: tick 2.5, centres int(1.25 + 2.5 i); the starts int(2.5 i) would be [0, 2, 5, 7, ...]
    got = ours(20, "test", num_segments=8, test_mode="uniform", test_clips=1)
    assert got == [[1, 3, 6, 8, 11, 13, 16, 18]]


@pytest.mark.parametrize("L", [1, 5])
def test_twice(L):
    for T in T_GRID:
        for F in F_GRID:
            if F - L + 1 < 1:
                continue
            want = [snippets(c, L, F) for c in official_tsm_test(F, T, L, twice=True)]
            got = ours(F, "test", num_segments=T, snippet_len=L, test_mode="twice", test_clips=2)
            assert got == want, (F, T)
            if L == 1:
                assert official_mmaction_test(F, T, twice=True) == want, (F, T)


@pytest.mark.parametrize("n", [2, 3, 4, 10])
def test_uniform_n(n):
    for T in T_GRID:
        for F in F_GRID:
            got = ours(F, "test", num_segments=T, test_mode="uniform", test_clips=n)
            assert got == official_tam_uniform(F, T, 1, n), (F, T)
            if n == 4:
                assert got == official_ctnet_four_clips(F, T, 1), (F, T)


def test_snippets_on_videos_of_4_frames_or_fewer_clamp_where_the_official_starts_go_negative():
    """docs/DATA.md, difference 2: with 5-frame snippets and F <= 4 (F' = F - 4 <= 0) the official tick
    (F - 4) / T is <= 0. TSM/TAM/CT-Net `twice` and the 1-clip test then start at -1 or -2 for F <= 2,
    CT-Net's 4 uniform clips at -1..-4 for every F <= 4, and TAM's uniform-N wraps its negative starts mod F
    onto later frames. Ours clamps F' to 1: every clip starts at frame 0 (frames 0..F-1, the last
    repeated), a clip the official code cannot produce there."""
    L = 5
    for T in T_GRID:
        for F in (1, 2, 3, 4):
            clamped = snippets([0] * T, L, F)
            for mode, n in (("centres", 1), ("twice", 2), ("uniform", 4)):
                got = ours(F, "test", num_segments=T, snippet_len=L, test_mode=mode, test_clips=n)
                assert got == [clamped] * n, (F, T, mode)
            official_twice = official_tsm_test(F, T, L, twice=True)
            assert (min(min(c) for c in official_twice) < 0) == (F <= 2), (F, T)
            if F > 2:  # the truncation toward zero keeps F = 3, 4 at 0: there the official equals ours
                assert [snippets(c, L, F) for c in official_twice] == [clamped] * 2
            assert min(min(c) for c in official_ctnet_four_clips(F, T, L)) < 0, (F, T)
    # TAM's uniform-4 wraps mod F: other frames than ours (here F = 4, T = 1: the last clip starts at 3)
    assert official_tam_uniform(4, 1, L, 4) == [[0], [0], [0], [3]]
    # single frames (L = 1) never take a negative start: there `twice` equals ours for every F (test_twice)
    assert all(min(c) >= 0 for F in (1, 2, 3, 4) for T in T_GRID for c in official_tsm_test(F, T, 1, True))


def test_ctnet_k400_tests_dense_10_not_ctnets_4_uniform_clips():
    """docs/DATA.md, difference 1: configs/ctnet_k400.yaml tests with 10 dense clips (TSM's dense-10),
    while CT-Net's own test_acc.py with --dense-sample takes 4 uniform clips; the override the YAML and
    DATA.md give (--eval.temporal_mode=uniform --eval.temporal_clips=4) reproduces CT-Net's clips."""
    from dali_pipes.loader import sampling_options
    from engine.config import load_config

    recipe = load_config("configs/ctnet_k400.yaml")
    as_ctnet = ["--eval.temporal_mode=uniform", "--eval.temporal_clips=4"]
    ctnet = load_config("configs/ctnet_k400.yaml", as_ctnet)
    ours_recipe = sampling_options(recipe.data, recipe.eval)
    ours_ctnet = sampling_options(ctnet.data, ctnet.eval)
    assert (ours_recipe.test_mode, ours_recipe.test_clips, recipe.eval.spatial_crops) == ("dense", 10, 3)
    T = recipe.data.num_segments
    for F in (64, 120, 300):
        four = clip_indices(F, "test", ours_ctnet, seed=SEED, epoch=EPOCH, sample_id=F).tolist()
        assert four == official_ctnet_four_clips(F, T, 1), F
        dense = clip_indices(F, "test", ours_recipe, seed=SEED, epoch=EPOCH, sample_id=F).tolist()
        assert len(dense) == 10 and dense[:4] != four, F


@pytest.mark.parametrize("L", [5, 1])
def test_uniform_random_is_n_training_draws(L):
    """MSN/TDN Kinetics test: `_sample_indices` once per clip index; here N draws from the sample's seed."""
    n = 10
    for T in T_GRID:
        for F in F_GRID:
            got = ours(F, "test", num_segments=T, snippet_len=L, test_mode="uniform_random", test_clips=n)
            draws, rule = Draws(F), official_tdn_train if L == 5 else official_tsm_train
            for clip in got:
                official = rule(F, T, L, draws)
                if official is not None and (F - L + 1 >= T or F > T):
                    assert clip == snippets(official, L, F), (F, T)
                else:
                    assert clip == snippets(spread(F, T, L), L, F), (F, T)
    one = ours(300, "test", num_segments=8, snippet_len=5, test_mode="uniform_random", test_clips=n)
    assert len({tuple(c) for c in one}) == n  # ten different draws, not one clip ten times
    opts = SamplingOptions(snippet_len=5, test_mode="uniform_random", test_clips=n)
    assert clip_indices(300, "test", opts, SEED, EPOCH, 300).tolist() == one  # the seed fixes the draws
    assert clip_indices(300, "test", opts, SEED + 1, EPOCH, 300).tolist() != one


# ---- dense (I3D window) -------------------------------------------------------------------------


def official_dense_train(F: int, T: int, draws: Draws, tam: bool = False) -> list[int]:
    """TSM / CT-Net / MSN (window 64) or TAM (window t_stride * T) `_sample_indices` with dense_sample;
    MMAction2 DenseSampleFrames train (sample_range 64, interval 64 // num_clips) is TSM's rule."""
    stride = 64 // T
    pos = max(1, 1 + F - (stride * T if tam else 64))
    start = 0 if pos == 1 else int(draws.randint(0, pos - 1))
    return [(i * stride + start) % F for i in range(T)]


def official_dense_val(F: int, T: int, repo: str) -> list[int]:
    """TAM: start pos // 2 (its window); CT-Net: 0 if pos == 1 else (pos - 1) // 2 (window 64)."""
    stride = 64 // T
    if repo == "tam":
        pos = max(1, 1 + F - stride * T)
        start = pos // 2
    else:
        pos = max(1, 1 + F - 64)
        start = 0 if pos == 1 else (pos - 1) // 2
    return [(i * stride + start) % F for i in range(T)]


def official_dense_test(F: int, T: int, n: int, tam: bool = False) -> list[list[int]]:
    """TSM dense-10 / MMAction2 DenseSampleFrames test mode (n start positions) / TAM "dense-N"."""
    stride = 64 // T
    pos = max(1, 1 + F - (stride * T if tam else 64))
    starts = [pos // 2] if (tam and n == 1) else np.linspace(0, pos - 1, num=n, dtype=int).tolist()
    return [[(i * stride + s) % F for i in range(T)] for s in starts]


def test_dense_train_window_and_tam_span():
    for T in T_GRID + T_NOT_DIVIDING_64:
        for F in F_GRID:
            got = ours(F, "train", mode="dense", num_segments=T)
            assert got == [official_dense_train(F, T, Draws(F))], (F, T)
            got = ours(F, "train", mode="dense", num_segments=T, dense_span="strides")
            assert got == [official_dense_train(F, T, Draws(F), tam=True)], (F, T)


def test_dense_val_rules():
    for T in T_GRID + T_NOT_DIVIDING_64:
        for F in F_GRID:
            tam = ours(F, "val", mode="dense", num_segments=T, dense_span="strides", val_sampling="centre")
            assert tam == [official_dense_val(F, T, "tam")], (F, T)
            ctnet = ours(F, "val", mode="dense", num_segments=T, val_sampling="ctnet")
            assert ctnet == [official_dense_val(F, T, "ctnet")], (F, T)
            tsm = ours(F, "val", mode="dense", num_segments=T, val_sampling="random")  # TSM val = train rule
            assert tsm == [official_dense_train(F, T, Draws(F))], (F, T)


def test_dense_test_clips():
    for T in T_GRID + T_NOT_DIVIDING_64:
        for F in F_GRID:
            for n in (10, 4):
                got = ours(F, "test", mode="dense", num_segments=T, test_mode="dense", test_clips=n)
                assert got == official_dense_test(F, T, n), (F, T, n)  # TSM (n = 10), MMAction2
            for n in (1, 10):
                kw = dict(mode="dense", num_segments=T, dense_span="strides", test_mode="dense")
                got = ours(F, "test", test_clips=n, **kw)
                assert got == official_dense_test(F, T, n, tam=True), (F, T, n)


def test_dense_rules_differ_where_documented():
    """The named options are not aliases: CT-Net's start is one lower for even pos; TAM's pos is larger
    when T does not divide 64."""
    # F = 100, T = 8: pos = 37 (odd): both start at 18. F = 101: pos = 38: TAM 19, CT-Net 18.
    assert ours(100, "val", mode="dense", val_sampling="ctnet")[0][0] == 18
    assert ours(101, "val", mode="dense", val_sampling="centre")[0][0] == 19
    assert ours(101, "val", mode="dense", val_sampling="ctnet")[0][0] == 18
    # T = 6: stride 10, TAM window 60: F = 100 -> pos 41 (start 20), not 37 (start 18)
    assert ours(100, "val", mode="dense", num_segments=6, dense_span="strides")[0][0] == 20
    assert ours(100, "val", mode="dense", num_segments=6)[0][0] == 18


# ---- 3D clips (MMAction2 SampleFrames, CSN) -----------------------------------------------------


def official_mmaction_clip3d_train(F: int, L: int, k: int, draws: Draws) -> list[int]:
    """SampleFrames(clip_len=L, frame_interval=k, num_clips=1) train, out_of_bound 'loop'."""
    ori = L * k
    average = (F - ori + 1) // 1
    if average > 0:
        offset = int(draws.randint(average, size=1)[0])
    elif F > max(1, ori):
        offset = int(np.sort(draws.randint(F - ori + 1, size=1))[0])
    else:  # average == 0: around(0 * ratio) = 0; negative: zeros
        offset = 0
    return [(offset + i * k) % F for i in range(L)]


def official_mmaction_clip3d_test(F: int, L: int, k: int, n: int) -> list[list[int]]:
    """SampleFrames test mode: max_offset = max(F - ((L - 1) k + 1), 0); N > 1: round(j * (m / (N-1)))."""
    max_offset = max(F - ((L - 1) * k + 1), 0)
    if n > 1:
        offsets = np.round(np.arange(n) * (max_offset / float(n - 1))).astype(int).tolist()
    else:
        offsets = [max_offset // 2]
    return [[(o + i * k) % F for i in range(L)] for o in offsets]


@pytest.mark.parametrize("L,k", [(32, 2), (8, 8), (4, 1), (16, 4)])
def test_clip3d(L, k):
    for F in F_GRID:
        kw = dict(mode="clip3d", clip_len=L, frame_interval=k)
        assert ours(F, "train", **kw) == [official_mmaction_clip3d_train(F, L, k, Draws(F))], F
        assert ours(F, "val", **kw) == official_mmaction_clip3d_test(F, L, k, 1), F
        for n in (1, 3, 10):
            got = ours(F, "test", test_mode="clip3d", test_clips=n, **kw)
            assert got == official_mmaction_clip3d_test(F, L, k, n), (F, n)
