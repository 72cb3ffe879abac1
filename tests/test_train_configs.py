"""configs/*.yaml: every recipe loads strictly and follows the dataset rules (flip, classes, sampling)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_loads_and_follows_the_dataset_rules(path):
    cfg = load_config(path)
    cfg.eval.resolved(cfg.data.sampling)  # test views are consistent with the sampling
    name = path.stem
    if name.endswith("sthv1"):
        assert cfg.data.flip == "off" and cfg.data.sampling == "uniform" and cfg.model.num_classes == 174
    if name.endswith("sthv2"):
        assert cfg.data.flip == "pairs" and cfg.data.sampling == "uniform" and cfg.model.num_classes == 174
        pairs = Path(cfg.data.flip_pairs).read_text().split("\n")
        assert pairs[:3] == ["86 87", "93 94", "166 167"]
    if name.endswith("k400"):
        assert cfg.data.flip == "on" and cfg.model.num_classes == 400
        official = {"ircsn": "clip3d", "msn": "uniform"}  # MSN/TDN train Kinetics on uniform snippets
        assert cfg.data.sampling == official.get(name.split("_")[0], "dense")
    if name != "demo":
        assert cfg.data.device == "gpu" and cfg.optim.ref_batch > 0 and cfg.model.pretrained
        assert cfg.model.num_segments == cfg.data.num_segments == 8 or cfg.data.sampling == "clip3d"


def test_kinetics_recipes_follow_the_official_sampling():
    """The named sampling options each official recipe uses (docs/DATA.md)."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    msn = load_config(configs / "msn_k400.yaml")
    assert (msn.data.sampling, msn.data.snippet_len) == ("uniform", 5)
    views = msn.eval.resolved(msn.data.sampling)
    assert (views.temporal_mode, views.temporal_clips, views.spatial_crops) == ("uniform_random", 10, 3)
    assert views.fuse == "softmax" and views.full_res
    tam = load_config(configs / "tam_k400.yaml")
    assert (tam.data.dense_span, tam.data.val_sampling) == ("strides", "centre")
    assert load_config(configs / "ctnet_k400.yaml").data.val_sampling == "ctnet"


def test_one_clip_uniform_views_are_the_centres():
    """`evaluate.py configs/tam_sthv2.yaml --views 3x1` (uniform, one clip): TAM's uniform-1 centres."""
    from dali_pipes.loader import sampling_options
    from dali_pipes.sampling import clip_indices

    path = Path(__file__).resolve().parents[1] / "configs" / "tam_sthv2.yaml"
    cfg = load_config(path, ["--eval.temporal_clips=1"])
    assert cfg.eval.temporal_mode == "uniform"
    opts = sampling_options(cfg.data, cfg.eval)
    # F = 20, T = 8: tick 2.5, centres int(1.25 + 2.5 i), not the starts [0, 2, 5, 7, ...]
    assert clip_indices(20, "test", opts).tolist() == [[1, 3, 6, 8, 11, 13, 16, 18]]
