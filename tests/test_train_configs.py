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
        assert cfg.data.sampling == ("clip3d" if name.startswith("ircsn") else "dense")
    if name != "demo":
        assert cfg.data.device == "gpu" and cfg.optim.ref_batch > 0 and cfg.model.pretrained
        assert cfg.model.num_segments == cfg.data.num_segments == 8 or cfg.data.sampling == "clip3d"
