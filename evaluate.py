"""Multi-view testing of a checkpoint, and fusion of score dumps: the command line.

    torchrun --nproc_per_node=8 evaluate.py configs/tsm_k400.yaml --checkpoint tsm_k400.pt --views 3x10
    python evaluate.py --checkpoint runs/demo --views 3x2   # newest checkpoint of a run, with its config
    python evaluate.py --fuse rgb.npz flow.npz --fuse-mode softmax --out fused.npz

This file resolves the config and the checkpoint, builds the test loader and the model, and writes the
outputs. The scoring itself (views through the model, gather across ranks, view fusion, metrics) is
engine/scoring.py, the same code train.py validates with; dumps, reports and dump fusion are
engine/reports.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch.distributed as dist
from torch import nn

from dali_pipes.source import ClipLoadError
from engine.channels_last import model_channels_last
from engine.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from engine.config import (
    Config,
    ConfigError,
    EvalConfig,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_config,
    split_cli,
)
from engine.distributed import init_distributed, peer_failure
from engine.preflight import check_labels
from engine.reports import DumpError, fuse_dumps, metric_rows, print_table, save_dump, write_reports
from engine.scoring import FUSE_MODES, EvalResult, compute_metrics, evaluate_model

log = logging.getLogger("evaluate")


# --------------------------------------------------------------------------------------------------
# Fusion of dumps (several models, or the same model under several view settings)
# --------------------------------------------------------------------------------------------------


def fuse_main(paths: list[str], mode: str, out: str | None) -> int:
    ids, labels, scores, class_names = fuse_dumps(paths, mode)
    metrics = compute_metrics(scores, labels)
    print_table(metric_rows(metrics), f"fusion of {len(paths)} dumps ({mode})")
    if out:
        out_path = Path(out)
        save_dump(
            out_path, ids, labels, class_names, scores=scores, fuse_mode=np.array(mode),
            sources=np.array([str(p) for p in paths]),
        )  # fmt: skip
        metrics = {**metrics, "fuse_mode": mode, "sources": [str(p) for p in paths]}
        write_reports(
            out_path, labels, scores, class_names, metrics, f"fusion ({mode}) top-1 {metrics['top1']:.2f}%"
        )
        print(f"wrote {out_path} and its reports")
    return 0


# --------------------------------------------------------------------------------------------------
# Evaluating a checkpoint
# --------------------------------------------------------------------------------------------------


def parse_views(text: str) -> tuple[int, int]:
    """'3x10' -> (spatial crops, temporal clips)."""
    try:
        crops, clips = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--views: expected CROPSxCLIPS such as 1x1, 3x2 or 3x10, got {text!r}") from None
    return crops, clips


def resolve_config(config_path: str | None, ckpt: dict, ckpt_path: str, overrides: list[str]) -> Config:
    """CONFIG when given, else the config stored in the training checkpoint; overrides apply to either."""
    if config_path is not None:
        return load_config(config_path, overrides)
    if "config" not in ckpt:
        raise ConfigError(
            f"{ckpt_path} stores no config (a models.convert output?): "
            "pass the CONFIG file before --checkpoint"
        )
    try:
        return from_dict(apply_overrides(copy.deepcopy(ckpt["config"]), overrides))
    except ConfigError as e:
        raise ConfigError(f"{ckpt_path} (stored config): {e}") from None


def read_class_names(data_root: str, val_list: str, num_classes: int) -> list[str] | None:
    """classes.txt from data.root or next to the list (line i = label i); None when absent or wrong length."""
    for folder in dict.fromkeys(p for p in (data_root, str(Path(val_list).parent)) if p):
        path = Path(folder) / "classes.txt"
        if path.is_file():
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            if len(names) == num_classes:
                return names
            log.warning(
                "%s has %d names, the model %d classes: using class indices", path, len(names), num_classes
            )
            return None
    return None


def load_model_weights(model: nn.Module, ckpt: dict, ckpt_path: str, weights: str) -> None:
    """Strict load of the checkpoint's "model" (or "ema") weights; a mismatch names the keys and the file."""
    if ckpt.get(weights) is None:
        raise ConfigError(f"{ckpt_path}: has no '{weights}' weights (keys: {', '.join(sorted(ckpt))})")
    state = ckpt[weights]
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ConfigError(f"{ckpt_path}: weights do not fit the configured model: {e}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"{ckpt_path}: weights do not fit the configured model (model.name/depth/num_classes?): "
            f"missing {result.missing_keys[:8]}{'...' if len(result.missing_keys) > 8 else ''}, "
            f"unexpected {result.unexpected_keys[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}"
        )


def evaluate_checkpoint(args: argparse.Namespace, overrides: list[str]) -> int:
    # Imported here: --fuse needs neither DALI nor the model zoo.
    from dali_pipes.listfile import read_list
    from dali_pipes.loader import build_loader
    from models import build_model

    info = init_distributed()
    try:
        if args.views:  # the flags are overrides too, applied last, so the config checks cover them
            crops, clips = parse_views(args.views)
            overrides = [*overrides, f"--eval.spatial_crops={crops}", f"--eval.temporal_clips={clips}"]
        if args.fuse:
            overrides = [*overrides, f"--eval.fuse={args.fuse[0]}"]
        if Path(args.checkpoint).is_dir():  # a run folder: its newest checkpoint (named in the outputs)
            args.checkpoint = str(latest_checkpoint(args.checkpoint) or args.checkpoint)
        ckpt = load_checkpoint(args.checkpoint)
        cfg = resolve_config(args.config, ckpt, args.checkpoint, overrides)
        views = cfg.eval.resolved(cfg.data.sampling)
        if cfg.data.device == "gpu" and info.device.type != "cuda":
            raise ConfigError("data.device: 'gpu' but CUDA is not available here; pass --data.device=cpu")
        amp = args.amp or cfg.train.amp
        if cfg.data.val_list:  # unset: the loader names the key
            check_labels(read_list(cfg.data.val_list, cfg.data.root), cfg.model.num_classes)

        model = build_model(replace(cfg.model, pretrained=""))  # the checkpoint brings all weights
        load_model_weights(model, ckpt, args.checkpoint, args.weights)
        del ckpt
        model.to(info.device)
        if cfg.train.channels_last:
            model = model_channels_last(model)
        device_id = info.local_rank if cfg.data.device == "gpu" else None
        loader = build_loader(cfg.data, "test", info.rank, info.world_size, views=views, device_id=device_id)
        result = evaluate_model(
            model, loader, cfg.model.num_classes, views.fuse, amp, cfg.train.channels_last
        )
        if info.is_main:
            report_checkpoint_result(args, cfg, views, result, amp, info.world_size, loader)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def report_checkpoint_result(
    args: argparse.Namespace, cfg: Config, views: EvalConfig, result: EvalResult, amp: str, world: int, loader
) -> None:
    """Rank 0: score dump, reports next to it, and the table."""
    if result.metrics["videos"] != loader.num_videos:
        log.warning(
            "scored %d videos, %s lists %d (%d unreadable samples replaced under data.skip_bad)",
            result.metrics["videos"], cfg.data.val_list, loader.num_videos, loader.skipped,
        )  # fmt: skip
    view_name = f"{views.spatial_crops}x{views.temporal_clips}"
    class_names = read_class_names(cfg.data.root, cfg.data.val_list, cfg.model.num_classes)
    ckpt = Path(args.checkpoint)
    out = Path(args.out or ckpt.parent / f"eval_{view_name}_{views.temporal_mode}.npz")
    meta = {
        "views": view_name, "temporal_mode": views.temporal_mode, "full_res": views.full_res,
        "fuse": views.fuse, "amp": amp, "world_size": world, "checkpoint": str(ckpt),
    }  # fmt: skip
    save_dump(
        out, result.ids, result.labels, class_names, view_logits=result.view_logits,
        meta=np.array(json.dumps(meta)), config=np.array(dump_yaml(cfg)),
    )  # fmt: skip
    title = f"{ckpt.name} {view_name} {views.temporal_mode} ({views.fuse})"
    write_reports(out, result.labels, result.scores, class_names, {**result.metrics, **meta}, title)
    head = [
        ("views", f"{view_name} {views.temporal_mode}{' full-res' if views.full_res else ''}"),
        ("fuse", views.fuse),
    ]
    print_table(head + metric_rows(result.metrics), title)
    print(f"wrote {out} (+ .metrics.json, .per_class.csv, .confusion.csv, .confusion.png)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Multi-view testing of a checkpoint, or fusion of score dumps (--fuse A.npz B.npz ...).",
        epilog="Dotted overrides such as --data.device=cpu or --eval.full_res=true apply after the config.",
    )
    p.add_argument("config", nargs="?", help="YAML config (default: the config stored in the checkpoint)")
    p.add_argument("--checkpoint", help="train.py checkpoint or models.convert output")
    p.add_argument(
        "--views", help="CROPSxCLIPS, e.g. 1x1, 3x2, 3x10 (eval.spatial_crops x eval.temporal_clips)"
    )
    p.add_argument(
        "--fuse", nargs="+", metavar="MODE|DUMP",
        help="logits|softmax: how views are averaged (eval.fuse); or score dumps A.npz B.npz ... to fuse",
    )  # fmt: skip
    p.add_argument("--fuse-mode", choices=FUSE_MODES, help="with dumps: view fusion inside each (logits)")
    p.add_argument(
        "--out", help="score dump .npz; reports are written next to it (default: by the checkpoint)"
    )
    p.add_argument("--amp", choices=("bf16", "fp16", "fp32"), help="autocast dtype (default: train.amp)")
    p.add_argument(
        "--weights", default="model", choices=("model", "ema"), help="which weights of the checkpoint"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    overrides, rest = split_cli(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(rest)
    try:
        if args.fuse and not (len(args.fuse) == 1 and args.fuse[0] in FUSE_MODES):
            if args.config or args.checkpoint or overrides:
                raise ConfigError("--fuse with score dumps takes no CONFIG, --checkpoint or overrides")
            return fuse_main(args.fuse, args.fuse_mode or "logits", args.out)
        if args.fuse_mode:
            raise ConfigError(
                "--fuse-mode goes with --fuse A.npz B.npz ...; views fuse by --fuse logits|softmax"
            )
        if not args.checkpoint:
            raise ConfigError("--checkpoint is required (or --fuse A.npz B.npz ... to fuse score dumps)")
        return evaluate_checkpoint(args, overrides)
    except (ConfigError, DumpError, CheckpointError, ValueError, FileNotFoundError, ClipLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a peer rank died or hung: one line, not a gloo/NCCL traceback
        lost = peer_failure(e)
        if lost is None:
            raise
        print(f"error: {lost}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
