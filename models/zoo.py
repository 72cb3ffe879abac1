"""Video models: `build_model(cfg.model)`, the `MODELS` dict of builders, and `load_pretrained`
(imported as `from models import ...`: models/__init__.py loads this module on first use).

Every 2D model is `VideoClassifier(ResNet(temporal=<factory>))` (models/video.py, models/resnet.py):
TSN has no temporal module, TSM/TAM/CT-Net differ only in the factory (models/temporal/). See
docs/MODELS.md for layouts, the temporal hook and the checkpoint rules.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.config import ModelConfig
from engine.safe_load import SafeLoadError, safe_load
from models.csn import build_ip_csn, build_ir_csn
from models.resnet import BasicBlock, Bottleneck, resnet
from models.temporal.ctnet import ctnet_factory, freeze_outside_ct_blocks
from models.temporal.msn import build_msn
from models.temporal.tam import tam_factory
from models.temporal.tdn import build_tdn
from models.temporal.tsm import tsm_factory
from models.video import VideoClassifier

log = logging.getLogger(__name__)


def build_tsn(cfg: ModelConfig) -> VideoClassifier:
    """TSN: a plain 2D ResNet over the T frames, logits averaged."""
    return VideoClassifier.from_config(cfg, resnet(cfg.depth, debug=cfg.debug))


def build_tsm(cfg: ModelConfig) -> VideoClassifier:
    """TSM: residual temporal shift (1/8 + 1/8 channels) before conv1 of every block."""
    return VideoClassifier.from_config(cfg, resnet(cfg.depth, tsm_factory(cfg.num_segments), cfg.debug))


def build_tam(cfg: ModelConfig) -> VideoClassifier:
    """TANet: a temporal adaptive module after conv1-bn1-relu of every bottleneck."""
    return VideoClassifier.from_config(cfg, resnet(cfg.depth, tam_factory(cfg.num_segments), cfg.debug))


def build_ctnet(cfg: ModelConfig) -> VideoClassifier:
    """CT-Net: CT blocks at every odd block index; `ctnet_freeze` trains only them and the fc."""
    model = VideoClassifier.from_config(cfg, resnet(cfg.depth, ctnet_factory(cfg.num_segments), cfg.debug))
    if cfg.ctnet_freeze:
        freeze_outside_ct_blocks(model)
    return model


MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "tsn": build_tsn,
    "tsm": build_tsm,
    "tam": build_tam,
    "ctnet": build_ctnet,
    # MSN/TDN (models/temporal/msn.py) and ir/ip-CSN (models/csn.py) are registered below.
}
# --- other models: add `MODELS["name"] = builder` lines here (imports at the top of this file) ---
MODELS["msn"] = build_msn  # models/temporal/msn.py: 5-frame snippets, motion modules (T multiple of 8)
MODELS["tdn"] = build_tdn  # models/temporal/tdn.py: 5-frame snippets, MSN's base
MODELS["ir_csn"] = build_ir_csn  # models/csn.py: 3D, input (N, C, T, H, W)
MODELS["ip_csn"] = build_ip_csn  # models/csn.py: 3D, input (N, C, T, H, W)


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build `cfg.name` with its options; loads `cfg.pretrained` (strictly) when set."""
    if cfg.name not in MODELS:
        raise ValueError(f"model.name: {cfg.name!r} is not one of {', '.join(MODELS)}")
    if cfg.ctnet_freeze and cfg.name != "ctnet":
        raise ValueError(f"model.ctnet_freeze: only applies to ctnet, not {cfg.name!r}")
    model = MODELS[cfg.name](cfg)
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    return model


# --------------------------------------------------------------------------------------------------
# Checkpoint loading
# --------------------------------------------------------------------------------------------------


class PretrainedMismatchError(ValueError):
    """A checkpoint does not fit the model; the message lists missing, unexpected and reshaped keys."""


@dataclass
class PretrainedReport:
    """What `load_pretrained` did: into which module, and which keys it tolerated."""

    target: str  # "model" (a whole-model checkpoint) or "backbone" (an ImageNet trunk)
    loaded: int
    new: list[str] = field(default_factory=list)  # model keys left at their init (new modules)
    ignored: list[str] = field(default_factory=list)  # checkpoint keys the model drops on purpose


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: a raw state dict, {"state_dict": ...} or {"model": ...}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint not found: {path}")
    try:  # the restricted reader: objects beside the tensors become inert stand-ins, nothing runs
        loaded = safe_load(path)
    except SafeLoadError as e:
        raise ValueError(str(e)) from None
    obj = loaded.obj
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{path}: expected a state dict of tensors (raw, under 'state_dict' or 'model')"
            + loaded.foreign_note()
        )
    if obj and all(k.startswith("module.") for k in obj):  # saved from a DDP-wrapped model
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _tolerated(module: nn.Module) -> tuple[list[str], list[str]]:
    """Key prefixes (within `module`) that may be missing (new modules) or unexpected (dropped ones).

    New: a residual block's `temporal` slot and any submodule whose class sets `pretrained_new = True`.
    Dropped: `prefix + p` for each `p` in a submodule's `pretrained_ignore` (e.g. CT-Net's conv2/bn2).
    """
    new, dropped = [], []
    for name, m in module.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, (BasicBlock, Bottleneck)) and hasattr(m, "temporal"):
            new.append(f"{prefix}temporal.")
        if getattr(m, "pretrained_new", False):
            new.append(prefix)
        dropped.extend(prefix + p for p in getattr(m, "pretrained_ignore", ()))
    return new, dropped


def _listing(title: str, keys: list[str], limit: int = 25) -> str:
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
    return f"\n  {title} ({len(keys)}): {shown}"


def _modules(keys: list[str], prefixes: list[str]) -> list[str]:
    """The modules (shortest matching prefix, without the dot) that `keys` belong to, sorted."""
    return sorted({min((p for p in prefixes if k.startswith(p)), key=len).rstrip(".") for k in keys})


def load_pretrained(model: nn.Module, path: str | Path) -> PretrainedReport:
    """Load weights strictly, into the whole model or (ImageNet trunks) into `model.backbone`.

    A checkpoint whose keys carry no `backbone.` prefix but fit a torchvision ResNet (`conv1.weight`,
    `layer1.0...`) is an ImageNet checkpoint: it goes into `model.backbone` and its 1000-way `fc` is
    skipped. Anything else (a models.convert output, a training checkpoint) must fit the whole model.
    Only keys of new modules (temporal slots, `pretrained_new` classes, the fc) may be missing and only keys
    the model drops on purpose (`pretrained_ignore`) may be extra; both are logged, and modules that a
    whole-model checkpoint leaves at their init are a WARNING naming them (except the fc when fine-tuning
    to another class count). Any other difference raises `PretrainedMismatchError` listing the keys,
    and nothing is loaded.
    """
    state = read_state_dict(path)
    backbone = getattr(model, "backbone", None)
    imagenet = (
        isinstance(backbone, nn.Module)
        and not any(k.startswith("backbone.") for k in state)
        and "conv1.weight" in state
    )
    target, target_name = (backbone, "backbone") if imagenet else (model, "model")
    if imagenet:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        # MSN/TDN (models/temporal/tdn.py) reuse ImageNet tensors in more places than a plain trunk (a
        # second layer1, zero biases for their biased convs): such a backbone derives those entries.
        if hasattr(backbone, "imagenet_state"):
            state = backbone.imagenet_state(state)
    own = target.state_dict()
    new_head = False  # fine-tuning on another label set (TSM's --tune_from): the head starts anew
    if not imagenet:
        head = [k for k in state if k.startswith("fc.") and k in own and state[k].shape != own[k].shape]
        if head:
            new_head = True
            log.info(
                "%s: fc has %d classes in the checkpoint, %d in the model: the fc keeps its init",
                path, state[head[0]].shape[0], own[head[0]].shape[0],
            )  # fmt: skip
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    new_prefixes, dropped_prefixes = _tolerated(target)
    if not imagenet:
        new_prefixes.append("fc.")  # e.g. a models.convert output of an ImageNet trunk: the head is new
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    new = [k for k in missing if k.startswith(tuple(new_prefixes))]
    ignored = [k for k in unexpected if k.startswith(tuple(dropped_prefixes))]
    # Checkpoints older than PyTorch 0.4.1 (torchvision's resnet50-19c8e357) lack BN step counters.
    new_set, ignored_set = set(new), set(ignored)
    missing = [k for k in missing if k not in new_set and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in unexpected if k not in ignored_set]
    reshaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or reshaped:
        msg = f"{path}: checkpoint does not fit {type(model).__name__} (loading into {target_name})"
        if missing:
            msg += _listing("missing keys", missing)
        if unexpected:
            msg += _listing("unexpected keys", unexpected)
        if reshaped:
            msg += _listing("shape mismatches (checkpoint vs model)", reshaped)
        raise PretrainedMismatchError(msg)
    target.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    report = PretrainedReport(target_name, sum(k in own for k in state), new, ignored)
    log.info("loaded %d tensors from %s into %s", report.loaded, path, target_name)
    if imagenet:  # an ImageNet trunk has no temporal modules: keeping their init is the point
        if new:
            log.info(
                "%d tensors of new modules keep their init:%s",
                len(new),
                _listing("modules", _modules(new, new_prefixes), 40),
            )
    else:
        # A whole-model checkpoint that lacks a module's tensors is most likely of another model (a TSN
        # file loaded into TAM) or an incomplete file: the run would train those modules from scratch.
        absent = _modules([k for k in new if not (new_head and k.startswith("fc."))], new_prefixes)
        if absent:
            log.warning(
                "%s: the whole-model checkpoint has no tensors for %d module(s), which keep their init "
                "(a checkpoint of another model?):%s",
                path, len(absent), _listing("modules", absent, 40),
            )  # fmt: skip
    if ignored:
        log.info("checkpoint tensors dropped by design:%s", _listing("keys", ignored, 10))
    return report
