"""Video models: `build_model(cfg.model)`, the `MODELS` dict of builders, and `load_pretrained`.

Every 2D model is `VideoClassifier(ResNet(temporal=<factory>))` (models/video.py, models/resnet.py):
TSN has no temporal module, TSM/TAM/CT-Net differ only in the factory (models/temporal/). See
docs/MODELS.md for layouts, the temporal hook and the checkpoint rules.

The names live in models/zoo.py and load on first use (`from models import build_model` works as
before): importing the package itself loads no torch, so `python -m models.convert --help` is instant.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    zoo = importlib.import_module("models.zoo")
    try:
        return getattr(zoo, name)
    except AttributeError:
        raise AttributeError(f"module 'models' has no attribute {name!r}") from None
