"""Checkpoint files shared by train.py, evaluate.py and models.convert.

A training checkpoint is one `torch.save`d dict: {"model": unwrapped state_dict, "optimizer", "scaler",
"scheduler", "epoch", "step", "data_state", "rng", "config", "ema"?}; models.convert writes
{"model", "meta"}. Everything inside is plain containers and tensors; files are read through
engine/safe_load.py's restricted unpickler (no code in a checkpoint ever runs), and a file that refers to
anything else (a Python object, `os.system`) is refused.

Writes are atomic (temp file in the same directory, fsync, os.replace): a crash mid-write never leaves a
truncated file under a checkpoint's name, and a good checkpoint is only ever replaced by a complete one.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.config import ConfigError, ModelConfig
from engine.fileio import atomic_write
from engine.safe_load import SafeLoadError, safe_load

log = logging.getLogger(__name__)

CKPT_PATTERN = re.compile(r"^ckpt_e(\d+)_s(\d+)\.pt$")
BEST_NAME = "ckpt_best.pt"  # the best validated checkpoint (train.best_metric); outside CKPT_PATTERN


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or not what the caller needs; the message names the file."""


def checkpoint_name(epoch: int, step: int) -> str:
    """File name for a checkpoint taken after `epoch` epochs / `step` optimizer steps (sorts by age)."""
    return f"ckpt_e{epoch:04d}_s{step:09d}.pt"


# torch.save's zip writer reports a failed write (ENOSPC included) as this, without the errno
_TORCH_WRITE_FAILED = "unexpected pos"


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write `state` to `path` atomically: temp file + fsync + os.replace (same filesystem).

    Free space is checked first (the tensors' bytes plus a margin), and a full disk during the write is
    reported as such, naming the file; the previous checkpoint is untouched either way."""
    path = Path(path)
    need = int(state_bytes(state) * 1.05) + (1 << 20)
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise CheckpointError(
            f"disk full: {path} needs about {need / 2**20:.0f} MiB, {path.parent} has "
            f"{free / 2**20:.0f} MiB free; not written{_kept(path)}"
        )
    try:
        return atomic_write(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as e:
        if getattr(e, "errno", None) == errno.ENOSPC or _TORCH_WRITE_FAILED in str(e):
            free = shutil.disk_usage(path.parent).free
            raise CheckpointError(
                f"disk full while writing {path} ({free / 2**20:.0f} MiB left); not written{_kept(path)}"
            ) from None
        raise


def _kept(path: Path) -> str:
    """What a failed write leaves: the newest earlier checkpoint beside it, if there is one."""
    previous = latest_checkpoint(path.parent)
    return f", the previous checkpoint {previous.name} is kept" if previous else " (no earlier checkpoint)"


def state_bytes(obj: Any) -> int:
    """Bytes of the tensors inside nested dicts/lists/tuples (what torch.save writes, give or take)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint dict; every failure is a CheckpointError naming the file and the reason."""
    path = run_checkpoint(path)[0] if Path(path).is_dir() else Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        loaded = safe_load(path, map_location)
    except SafeLoadError as e:
        raise CheckpointError(str(e)) from None
    if loaded.foreign:
        raise CheckpointError(
            f"{path}: not a vidrec checkpoint: holds Python objects besides tensors and plain containers"
            f"{loaded.foreign_note()}"
        )
    state = loaded.obj
    if not isinstance(state, dict) or "model" not in state:
        got = sorted(map(str, state))[:10] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path}: not a vidrec checkpoint (expected a dict with a 'model' key, got {got})"
        )
    return state


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Training checkpoints in `out_dir`, oldest first (ordered by the step in the name)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for p in out_dir.iterdir():
        m = CKPT_PATTERN.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(2)), int(m.group(1)), p))
    return [p for _, _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest training checkpoint in `out_dir` (highest step), or None when there is none."""
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(out_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps everything); returns the deleted.

    The newest is always kept (keep >= 1), and ckpt_best.pt is never a candidate: it is its own file
    (a hard link or copy of the checkpoint it was), so pruning that epoch's file leaves the best whole."""
    ckpts = list_checkpoints(out_dir)
    if keep <= 0 or len(ckpts) <= keep:
        return []
    doomed = ckpts[:-keep]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def best_checkpoint(out_dir: str | Path) -> Path | None:
    """RUN/ckpt_best.pt when training recorded one, else None."""
    path = Path(out_dir) / BEST_NAME
    return path if path.is_file() else None


def run_checkpoint(path: str | Path) -> tuple[Path, str]:
    """What evaluate.py and predict load for `path`: a file is itself; a run folder gives its
    ckpt_best.pt when there is one, else its newest checkpoint. Returns (file, why it was chosen)."""
    path = Path(path)
    if not path.is_dir():
        return path, "as given"
    best = best_checkpoint(path)
    if best is not None:
        return best, "the run's best (train.best_metric)"
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: is a directory with no {BEST_NAME} or ckpt_e*_s*.pt checkpoint in it")
    return latest, "the run's newest (no ckpt_best.pt)"


def mark_best(src: str | Path) -> Path:
    """Make src's folder's ckpt_best.pt the checkpoint `src`, atomically: a hard link (no second copy on
    disk) under a temp name, then os.replace; a byte copy where the filesystem has no hard links."""
    src = Path(src)
    dst = src.parent / BEST_NAME
    fd, tmp = tempfile.mkstemp(prefix=f".{BEST_NAME}.", suffix=".tmp", dir=src.parent)
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            atomic_write(dst, lambda f: f.write(src.read_bytes()))
            return dst
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


@dataclass
class BestTracker:
    """The best validation value so far of `metric` (a key of the val metrics: top1, top5, mean_class),
    higher is better for mode max; saved in every checkpoint so a resumed run keeps comparing."""

    metric: str = "top1"
    mode: str = "max"
    value: float | None = None
    epoch: int = 0

    def update(self, metrics: dict, epoch: int) -> bool:
        """True when `metrics` beats the best so far (which then becomes it)."""
        if self.metric not in metrics:
            return False
        value = float(metrics[self.metric])
        better = self.value is None or (value > self.value if self.mode == "max" else value < self.value)
        if better:
            self.value, self.epoch = value, epoch
        return better

    def state_dict(self) -> dict:
        return {"metric": self.metric, "mode": self.mode, "value": self.value, "epoch": self.epoch}

    def load_state_dict(self, state: dict | None) -> None:
        """Take a checkpoint's record unless it ranked by another metric or mode (then start afresh)."""
        if state and state.get("metric") == self.metric and state.get("mode") == self.mode:
            self.value, self.epoch = state.get("value"), int(state.get("epoch", 0))


# --------------------------------------------------------------------------------------------------
# RNG states, stored as tensors and plain lists so the file holds no Python objects
# --------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (if present) CUDA generator states of this process."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (the CUDA state only where CUDA is in use)."""
    random.setstate(_to_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


# The fields that decide which network a checkpoint's weights belong to (not dropout, not pretrained).
MODEL_IDENTITY = ("name", "depth", "num_classes", "num_segments", "debug")


def stored_model_config(ckpt: dict) -> dict:
    """The model fields a checkpoint records: train.py's stored config, or a models.convert output's meta."""
    config = ckpt.get("config")
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        return config["model"]
    meta = ckpt.get("meta")
    if isinstance(meta, dict) and "model" in meta:
        stored = {k: meta[k] for k in ("depth", "num_classes", "num_segments") if k in meta}
        return {"name": meta["model"], **stored}
    return {}


def check_model_config(
    model_cfg: ModelConfig, ckpt: dict, ckpt_path: str | Path, fix: str, allow: bool = False
) -> None:
    """Refuse a checkpoint trained as another model than the configured one, even when its weights happen
    to fit (a tsn config on a tsm checkpoint loads, and runs without the shift): one ConfigError naming
    the differing keys and ending in `fix` (what the caller's user can do), or a warning when `allow`.
    evaluate.py scores with it; train.py --resume continues with it (`check_resumable`)."""
    stored = stored_model_config(ckpt)
    diffs = [
        f"model.{key} {stored[key]!r} in the checkpoint, {getattr(model_cfg, key)!r} configured"
        for key in MODEL_IDENTITY
        if key in stored and stored[key] != getattr(model_cfg, key)
    ]
    if not diffs:
        return
    if allow:
        log.warning("%s: despite a model config mismatch: %s", ckpt_path, "; ".join(diffs))
        return
    raise ConfigError(f"{ckpt_path} was trained as another model: {'; '.join(diffs)}. {fix}")


# What train.py's checkpoints hold beyond the weights; --resume needs all of it.
TRAINING_STATE = ("optimizer", "scheduler", "scaler", "epoch", "batch_in_epoch", "step", "data_state", "rng",
                  "config")  # fmt: skip


def check_resumable(ckpt: dict, ckpt_path: str | Path, model_cfg: ModelConfig) -> None:
    """--resume continues a training run: the file must be a train.py checkpoint (not a models.convert
    output or a bare state dict) of the configured model (`check_model_config`); else one line saying so."""
    missing = [k for k in TRAINING_STATE if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{ckpt_path}: not a train.py checkpoint (no {', '.join(missing[:3])}): --resume continues a "
            "training run; to start from these weights, use --model.pretrained in a new run"
        )
    check_model_config(
        model_cfg, ckpt, ckpt_path, "Resume it with the model config it was trained with, or fine-tune it "
        "in a new run: --train.out_dir=NEW --model.pretrained=CHECKPOINT",
    )  # fmt: skip


def load_model_weights(
    model: torch.nn.Module, ckpt: dict, ckpt_path: str | Path, weights: str = "model"
) -> None:
    """Strict load of a checkpoint's "model" (or "ema") weights into `model`. A mismatch is one line (a
    ConfigError: the configured model is what differs) naming the file and counting the differing keys,
    never a partly loaded network."""
    if ckpt.get(weights) is None:
        raise ConfigError(f"{ckpt_path}: has no '{weights}' weights (keys: {', '.join(sorted(ckpt))})")
    state = ckpt[weights]
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    problems = weight_mismatches(model.state_dict(), state)
    if problems:
        raise ConfigError(
            f"{ckpt_path}: weights do not fit the configured model (model.name/depth/num_classes?): "
            + problems
        )
    model.load_state_dict(state)


def weight_mismatches(own: dict, state: dict, shown: int = 3) -> str:
    """'' when `state` fits `own` exactly, else one line: counts of missing / unexpected / reshaped
    tensors with the first few keys of each (a recipe config on a debug checkpoint differs in ~150)."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    for name, keys in (("shape mismatches (checkpoint vs model)", reshaped), ("missing", missing),
                       ("unexpected", unexpected)):  # fmt: skip
        if keys:
            more = f", ... {len(keys) - shown} more" if len(keys) > shown else ""
            parts.append(f"{len(keys)} {name}: {', '.join(keys[:shown])}{more}")
    return "; ".join(parts)
