"""Checks that run before any heavy work (loaders, model, process-group traffic), so a typo or a bad run
directory costs a second, not a GPU-hour: labels within the model's classes, a writable output folder,
and the removal of temp files that interrupted checkpoint writes left behind. `preflight_problems`
collects every finding of one start, so they are reported together (one block, rc 2)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from engine.config import Config, ConfigError
    from engine.runlock import RunLock

import torch
from torch import nn


class PreflightError(ValueError):
    """A problem found before training started; the message names the file, line or config key."""


class LabelledEntry(Protocol):
    label: int

    @property
    def where(self) -> str: ...  # "list_file:line"


# The temp names engine.fileio.atomic_write gives checkpoints: ".{name}.{random}.tmp" (mkstemp), and
# engine.checkpoint.mark_best's ".ckpt_best.pt.{random}.tmp"
STALE_CKPT_TMP = re.compile(r"^\.ckpt_(e\d+_s\d+|best)\.pt\.[^/]+\.tmp$")


def check_labels(entries: Iterable[LabelledEntry], num_classes: int, key: str = "model.num_classes") -> None:
    """Every label in [0, num_classes): the first that is not names its list line (an index error deep
    inside the loss after minutes of setup is the alternative)."""
    for e in entries:
        if not 0 <= e.label < num_classes:
            raise PreflightError(
                f"{e.where}: label {e.label} is outside [0, {num_classes}) ({key} is {num_classes})"
            )


def class_count_warning(
    entries: Iterable[LabelledEntry], num_classes: int, list_path: str | Path, root: str | Path = ""
) -> str:
    """'' when the training list's classes fill model.num_classes, else one line saying how they differ.

    The list's classes are the names in classes.txt beside it (or in data.root) when there is one, else
    max label + 1. With fewer classes than num_classes, the extra outputs never see a label (a recipe's 400
    on a 10-class set); labels beyond num_classes are `check_labels`'s error, not this warning."""
    labels = max((e.label for e in entries), default=-1) + 1
    folders = [Path(list_path).parent] + ([Path(root)] if root else [])
    named = next((f / "classes.txt" for f in folders if (f / "classes.txt").is_file()), None)
    if named is not None:
        count = sum(1 for line in named.read_text(errors="replace").splitlines() if line.strip())
        source = f"{named} names {count} classes"
    else:
        count, source = labels, f"{list_path} has labels 0..{labels - 1} ({labels} classes)"
    if count == num_classes:
        return ""
    return (
        f"model.num_classes is {num_classes} but {source}: the model's class count differs from the data's "
        "(set model.num_classes to match unless this is intended)"
    )


def check_writable_dir(path: str | Path, key: str = "train.out_dir") -> Path:
    """Create `path` if needed and prove a file can be written there (a file in its place, a read-only
    folder or a missing permission fails here, in one line, instead of at the first checkpoint)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PreflightError(f"{key}: {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PreflightError(f"{key}: cannot write to {path}: {e.strerror or e}") from None
    return path


def remove_stale_checkpoint_temps(out_dir: str | Path) -> list[Path]:
    """Delete temp files of checkpoint writes that a crash or kill interrupted (ours only, by name)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    stale = [p for p in out_dir.iterdir() if STALE_CKPT_TMP.match(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def preflight_problems(
    cfg: Config, cuda: bool, resuming: bool, lists: list[str], make_out_dir: bool = True
) -> tuple[list[str], list[str]]:
    """Everything knowable before heavy work, collected rather than stopping at the first: (problems,
    warnings). Problems: data.device gpu without CUDA, a missing model.pretrained (unless resuming: the
    checkpoint brings the weights) or data.flip_pairs file, unreadable lists and labels outside
    model.num_classes, an unwritable train.out_dir (created when `make_out_dir`). Warnings:
    class_count_warning for the training list."""
    from dali_pipes.listfile import read_list  # lazily: engine stays importable without DALI

    problems: list[str] = []
    if cfg.data.device == "gpu" and not cuda:
        problems.append("data.device: 'gpu' but this machine has no CUDA device; pass --data.device=cpu")
    if cfg.model.pretrained and not resuming and not Path(cfg.model.pretrained).is_file():
        problems.append(f"model.pretrained: {cfg.model.pretrained} not found")
    if cfg.data.flip == "pairs" and cfg.data.flip_pairs and not Path(cfg.data.flip_pairs).is_file():
        problems.append(f"data.flip_pairs: {cfg.data.flip_pairs} not found")
    entries: dict[str, list] = {}
    for key in lists:
        path = getattr(cfg.data, key)
        if not path:  # unset: the loader names the key (and a test's in-memory loader needs none)
            continue
        try:
            found = read_list(path, cfg.data.root)
            check_labels(found, cfg.model.num_classes)
            entries[path] = found  # labels in range: then its class count is worth a warning
        except (ValueError, OSError) as e:  # ListFileError, PreflightError
            problems.append(f"data.{key}: {e}" if str(path) not in str(e) else str(e))
    if make_out_dir:
        try:
            check_writable_dir(cfg.train.out_dir)
        except PreflightError as e:
            problems.append(str(e))
    train = cfg.data.train_list  # the list the fc learns from: does its class count fit?
    warning = class_count_warning(entries[train], cfg.model.num_classes, train, cfg.data.root) if (
        train in entries) else ""  # fmt: skip
    return problems, [warning] if warning else []


def with_preflight_findings(error: ConfigError, cuda: bool) -> str:
    """A config error's message plus what the preflight finds in the rest of that config (the bad keys at
    their defaults; nothing created), so one start reports every problem together."""
    cfg = error.partial
    if cfg is None:
        return str(error)
    lists = ["train_list"] + (["val_list"] if cfg.train.eval_every > 0 else [])
    try:
        problems, _ = preflight_problems(cfg, cuda, False, lists, make_out_dir=False)
    except Exception:  # the config error is the report; a failing extra check must not hide it
        return str(error)
    head = str(error).split("\n", 1)
    lines = (head[1].splitlines() if len(head) > 1 and head[0].endswith("problems:") else [f"  {error}"])
    lines += [f"  {p}" for p in problems]
    return lines[0].strip() if len(lines) == 1 else f"{len(lines)} problems:\n" + "\n".join(lines)


def checkpoint_bytes(model: nn.Module, optimizer: str, momentum: float, ema: bool) -> int:
    """About what one checkpoint of `model` takes on disk: its state, the optimizer's per-parameter slots
    (SGD momentum: 1, AdamW: 2) and the EMA copy. `model` may live on the meta device (sizes only)."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    slots = 2 if optimizer == "adamw" else int(momentum > 0)
    return state * (2 if ema else 1) + params * slots


def check_free_space(out_dir: str | Path, need: int, key: str = "train.out_dir") -> None:
    """Refuse to start when `out_dir` has less room than one checkpoint (plus a margin), instead of
    finding out at the first checkpoint, an epoch or more later."""
    need = int(need * 1.05) + (1 << 20)
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise PreflightError(
            f"{key}: {out_dir} has {free / 2**20:.0f} MiB free, one checkpoint needs about "
            f"{need / 2**20:.0f} MiB (model, optimizer state, EMA); free some space or choose another {key}"
        )


def meta_model(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` on the meta device: the shapes of a model without its memory or its init time."""
    with torch.device("meta"):
        return build()


def claim_run_dir(cfg: Config, say: Callable[[str], None]) -> RunLock:
    """Rank 0, once the checks have passed: train.out_dir locked for this run (one trainer per run
    directory), temp files of interrupted checkpoint writes removed, room for one checkpoint checked.
    Returns the held lock; a refusal (PreflightError) leaves it released."""
    import dataclasses

    from engine.runlock import RunLock
    from models import build_model

    out_dir = Path(cfg.train.out_dir)
    lock = RunLock(out_dir, say)
    lock.acquire()
    try:
        for stale in remove_stale_checkpoint_temps(out_dir):
            say(f"removed {stale.name} (temp file of an interrupted checkpoint write)")
        net = meta_model(lambda: build_model(dataclasses.replace(cfg.model, pretrained="")))
        need = checkpoint_bytes(net, cfg.optim.name, cfg.optim.momentum, cfg.train.ema > 0)
        check_free_space(out_dir, need)
    except BaseException:
        lock.release()
        raise
    return lock
