"""Multi-view testing of a checkpoint, and fusion of score dumps: the command line.

    torchrun --nproc_per_node=8 evaluate.py configs/tsm_k400.yaml --checkpoint tsm_k400.pt --views 3x10
    python evaluate.py --checkpoint RUN_DIR --views 3x2   # a run's ckpt_best.pt (else newest), its config
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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from engine.config import FUSE_MODES, DefaultsHelpFormatter, exit_if_help


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter,
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
    p.add_argument(
        "--allow-config-mismatch", action="store_true",
        help="evaluate even when the checkpoint was trained as another model (model.name/depth/...)",
    )  # fmt: skip
    p.add_argument(
        "--overwrite", action="store_true", help="replace another evaluation's dump at the output path"
    )
    p.add_argument(
        "--progress-every", type=float, default=10.0, metavar="S", help="seconds between progress lines"
    )
    return p


if __name__ == "__main__":
    exit_if_help(build_parser)  # before torch and DALI load

import numpy as np
import torch.distributed as dist

from dali_pipes.fingerprint import describe, differs, run_fingerprints
from dali_pipes.source import ClipLoadError
from engine.channels_last import model_channels_last
from engine.checkpoint import (
    MODEL_IDENTITY,
    CheckpointError,
    check_model_config,
    load_checkpoint,
    load_model_weights,
    run_checkpoint,
)
from engine.config import (
    Config,
    ConfigError,
    EvalConfig,
    build_config,
    dump_yaml,
    get_dotted,
    load_config,
    parse_views,
    split_cli,
)
from engine.distributed import all_gather_objects, exit_on_peer_failure, init_distributed
from engine.preflight import check_labels
from engine.progress import ProgressLines
from engine.reports import (
    DumpError,
    fuse_dumps,
    load_dump,
    metric_rows,
    print_table,
    read_class_names,
    report_paths,
    save_dump,
    write_reports,
)
from engine.scoring import EvalResult, compute_metrics, evaluate_model

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
        first = load_dump(paths[0])  # fuse_dumps checked that all dumps hold the same ids
        extra = {"paths": first["paths"][np.argsort(first["ids"], kind="stable")]} if "paths" in first else {}
        save_dump(
            out_path, ids, labels, class_names, scores=scores, fuse_mode=np.array(mode),
            sources=np.array([str(p) for p in paths]), **extra,
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


def resolve_config(config_path: str | None, ckpt: dict, ckpt_path: str, overrides: list[str]) -> Config:
    """CONFIG when given, else the config stored in the training checkpoint; overrides apply to either."""
    if config_path is not None:
        return load_config(config_path, overrides)
    if "config" not in ckpt:
        raise ConfigError(
            f"{ckpt_path} stores no config (a models.convert output?): "
            "pass the CONFIG file before --checkpoint"
        )
    return build_config(copy.deepcopy(ckpt["config"]), overrides, f"{ckpt_path} (stored config)")


# Fix for a checkpoint trained as another model (engine.checkpoint.check_model_config refuses it).
CONFIG_MISMATCH_FIX = (
    "Fix CONFIG or the overrides (without CONFIG, the checkpoint's own config is used), "
    "or pass --allow-config-mismatch"
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
        path, why = run_checkpoint(args.checkpoint)  # a run folder: its best, else newest (in the outputs)
        args.checkpoint = str(path)
        if info.is_main:
            print(f"checkpoint {path} ({why})")
        ckpt = load_checkpoint(args.checkpoint)
        cfg = resolve_config(args.config, ckpt, args.checkpoint, overrides)
        check_model_config(cfg.model, ckpt, args.checkpoint, CONFIG_MISMATCH_FIX, args.allow_config_mismatch)
        views = cfg.eval.resolved(cfg.data.sampling)
        if cfg.data.device == "gpu" and info.device.type != "cuda":
            raise ConfigError("data.device: 'gpu' but CUDA is not available here; pass --data.device=cpu")
        amp = args.amp or cfg.train.amp
        if cfg.data.val_list:  # unset: the loader names the key
            check_labels(read_list(cfg.data.val_list, cfg.data.root), cfg.model.num_classes)
        out = output_path(args, cfg, views)
        identity = evaluation_identity(args, cfg, views, amp)
        output_verdict(out, identity, args.overwrite, info.is_main)  # before the scoring, not after it

        model = build_model(replace(cfg.model, pretrained=""))  # the checkpoint brings all weights
        load_model_weights(model, ckpt, args.checkpoint, args.weights)
        validated = ckpt.get("dataset", {}).get("val")  # train.py's fingerprint of its val list
        del ckpt
        model.to(info.device)
        if cfg.train.channels_last:
            model = model_channels_last(model)
        device_id = info.local_rank if cfg.data.device == "gpu" else None
        loader = build_loader(cfg.data, "test", info.rank, info.world_size, views=views, device_id=device_id)
        lines = ProgressLines("evaluate", loader.num_videos, "videos", every_s=args.progress_every)
        result = evaluate_model(
            model, loader, cfg.model.num_classes, views.fuse, amp, cfg.train.channels_last,
            progress=progress_printer(lines, info.world_size) if info.is_main else None,
        )  # fmt: skip
        if info.is_main:
            dataset = run_fingerprints(replace(cfg.data, train_list=""), views).get("val", {})
            report_checkpoint_result(args, cfg, views, result, amp, info.world_size, loader, out, identity,
                                     dataset, validated)  # fmt: skip
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def progress_printer(lines: ProgressLines, world: int) -> Callable[[int, int], None]:
    """Rank 0's counts stand for all ranks (the loader shards the list evenly): an estimate beyond world 1."""
    return lambda batches, videos: lines.update(min(lines.total, videos * world))


def output_path(args: argparse.Namespace, cfg: Config, views: EvalConfig) -> Path:
    """--out, or beside the checkpoint a name that says what was scored, so evaluations do not collide:
    eval_<checkpoint>_<model.name>_<CxN>_<temporal mode>[_fullres].npz."""
    if args.out:
        return Path(args.out)
    ckpt = Path(args.checkpoint)
    view_name = f"{views.spatial_crops}x{views.temporal_clips}"
    tail = "_fullres" if views.full_res else ""
    return ckpt.parent / f"eval_{ckpt.stem}_{cfg.model.name}_{view_name}_{views.temporal_mode}{tail}.npz"


# What decides the scores in a dump; two evaluations that agree on all of it are the same evaluation.
IDENTITY_FIELDS = (
    *(f"model.{k}" for k in MODEL_IDENTITY),
    *(f"data.{k}" for k in ("val_list", "root", "source", "sampling", "num_segments", "snippet_len",
                            "dense_window", "clip_len", "frame_interval", "input_size", "scale_size", "mean",
                            "std")),
    *(f"eval.{k}" for k in ("spatial_crops", "temporal_clips", "temporal_mode", "full_res", "fuse")),
)  # fmt: skip


def evaluation_identity(args: argparse.Namespace, cfg: Config, views: EvalConfig, amp: str) -> dict:
    resolved = replace(cfg, eval=views)
    fields = {key: get_dotted(resolved, key) for key in IDENTITY_FIELDS}
    return {"checkpoint": str(Path(args.checkpoint).resolve()), "weights": args.weights, "amp": amp, **fields}


def output_verdict(out: Path, identity: dict, overwrite: bool, is_main: bool) -> None:
    """Rank 0 checks the output path and every rank learns its verdict, so all ranks stop together
    (a refusal on rank 0 alone would leave the others waiting in the scoring's collectives)."""
    problem = ""
    if is_main:
        try:
            check_output_free(out, identity, overwrite)
        except ConfigError as e:
            problem = str(e)
    problem = all_gather_objects(problem)[0]
    if problem:
        raise ConfigError(problem)


def check_output_free(out: Path, identity: dict, overwrite: bool) -> None:
    """Never replace another evaluation's outputs: a dump at `out` from another checkpoint, weights or
    config is refused (before any scoring) unless --overwrite; the same evaluation run again replaces it."""
    reports_there = [p for p in report_paths(out) if p.exists()]
    if overwrite or not (out.exists() or reports_there):
        return
    old: dict = {}
    if out.exists():
        try:
            with np.load(out, allow_pickle=False) as z:
                old = json.loads(str(z["identity"])) if "identity" in z.files else {}
        except (OSError, ValueError) as e:
            msg = f"{out}: exists but is not a readable score dump ({e}); pass --out or --overwrite"
            raise ConfigError(msg) from None
    diffs = [f"{key} {old[key]!r} there, {identity[key]!r} now" for key in identity
             if key in old and old[key] != identity[key]]  # fmt: skip
    if out.exists() and old and not diffs:
        return
    what = "; ".join(diffs[:3]) + (" ..." if len(diffs) > 3 else "") if old else "no record of what it scored"
    raise ConfigError(
        f"{out} holds another evaluation's outputs ({what}): pass --out NEW.npz, or --overwrite to replace it"
    )


def list_paths(cfg: Config, ids: np.ndarray) -> np.ndarray:
    """The video path (list path joined to data.root) of each scored id: dumps name videos, not positions."""
    from dali_pipes.listfile import read_list

    entries = read_list(cfg.data.val_list, cfg.data.root)
    return np.array([entries[i].path for i in ids.tolist()], dtype=str)


def report_checkpoint_result(
    args: argparse.Namespace, cfg: Config, views: EvalConfig, result: EvalResult, amp: str, world: int,
    loader, out: Path, identity: dict, dataset: dict | None = None, validated: dict | None = None,
) -> None:  # fmt: skip
    """Rank 0: score dump, reports next to it, and the table."""
    if result.metrics["videos"] != loader.num_videos:
        left_out = loader.num_videos - result.metrics["videos"]  # over all ranks (the scores are gathered)
        log.warning(
            "scored %d videos, %s lists %d: %d unreadable samples left out under data.skip_bad (the metrics "
            "are over the scored videos; prep.validate lists them)",
            result.metrics["videos"], cfg.data.val_list, loader.num_videos, left_out,
        )  # fmt: skip
    view_name = f"{views.spatial_crops}x{views.temporal_clips}"
    class_names = read_class_names(cfg.model.num_classes, cfg=cfg)
    ckpt = Path(args.checkpoint)
    meta = {
        "views": view_name, "temporal_mode": views.temporal_mode, "full_res": views.full_res,
        "fuse": views.fuse, "amp": amp, "world_size": world, "checkpoint": str(ckpt), "weights": args.weights,
        "dataset": dataset or {},
    }  # fmt: skip
    save_dump(
        out, result.ids, result.labels, class_names, view_logits=result.view_logits,
        paths=list_paths(cfg, result.ids), meta=np.array(json.dumps(meta)), config=np.array(dump_yaml(cfg)),
        identity=np.array(json.dumps(identity)),
    )  # fmt: skip
    title = f"{ckpt.name} {cfg.model.name} {view_name} {views.temporal_mode} ({views.fuse})"
    write_reports(out, result.labels, result.scores, class_names, {**result.metrics, **meta}, title)
    head = [
        ("views", f"{view_name} {views.temporal_mode}{' full-res' if views.full_res else ''}"),
        ("fuse", views.fuse),
    ]
    print_table(head + metric_rows(result.metrics), title)
    print(f"wrote {out} (+ .metrics.json, .per_class.csv, .confusion.csv, .confusion.png)")
    if dataset:
        print(describe("scored", dataset))
        note = differs(dataset, validated)
        if note:
            print(f"note: {note}")


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
        return exit_on_peer_failure(e)


if __name__ == "__main__":
    sys.exit(main())
