"""Multi-view testing: a checkpoint's per-view scores -> metrics, plots, score dumps; and fusion of dumps.

    torchrun --nproc_per_node=8 evaluate.py configs/tsm_k400.yaml --checkpoint tsm_k400.pt --views 3x10
    python evaluate.py --checkpoint runs/demo --views 3x2   # newest checkpoint of a run, with its config
    python evaluate.py --fuse rgb.npz flow.npz --fuse-mode softmax --out fused.npz

`evaluate_model` is also train.py's validation step, so a validation accuracy and a test accuracy come
from the same code. The loader shards the videos over the ranks; every rank sends its scores to every
other (padded all_gather), and the union is de-duplicated and sorted by video id, so each video counts
exactly once whatever the world size, and the result does not depend on it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import json
import logging
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from config import (
    Config,
    ConfigError,
    EvalConfig,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_config,
    split_cli,
)
from fileio import atomic_write
from trainlib import init_distributed, to_channels_last

log = logging.getLogger("evaluate")

FUSE_MODES = ("logits", "softmax")


class DumpError(ValueError):
    """A score dump that cannot be used (missing keys, disagreeing ids/labels); names the file."""


@dataclass
class EvalResult:
    """Scores of every video of the list, sorted by video id, identical on every rank."""

    ids: np.ndarray  # (n,) int64: line index of the video in the list
    labels: np.ndarray  # (n,) int64
    view_logits: np.ndarray  # (n, V, C) float32, view v = clip * crops + crop
    scores: np.ndarray  # (n, C) views fused (mean logits, or mean softmax probabilities)
    metrics: dict[str, float]  # top1, top5, mean_class (percent), videos, videos_per_s


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def fuse_views(view_logits: np.ndarray, mode: str) -> np.ndarray:
    """(n, V, C) -> (n, C): the TSM family averages logits; MMAction2 and MSN average softmax."""
    if mode not in FUSE_MODES:
        raise ValueError(f"fuse mode must be one of {', '.join(FUSE_MODES)}, got {mode!r}")
    views = view_logits.astype(np.float32)
    return (softmax(views) if mode == "softmax" else views).mean(axis=1)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows = true class, columns = predicted class, counts."""
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise ValueError(
            f"label {int(labels[bad][0])} is outside 0..{num_classes - 1} "
            f"(model.num_classes = {num_classes}): the list and the model disagree on the classes"
        )
    flat = labels.astype(np.int64) * num_classes + preds.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def compute_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 / top-5 over videos and mean class accuracy over the classes present, in percent.

    Mean class accuracy averages per-class recall over classes with at least one video (as MMAction2);
    an absent class would otherwise be 0/0.
    """
    n, num_classes = scores.shape
    if n == 0:
        raise ValueError("no videos to score")
    k = min(5, num_classes)
    topk = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    hits = topk == labels[:, None]
    cm = confusion_matrix(labels, topk[:, 0], num_classes)
    count, correct = cm.sum(axis=1), np.diag(cm)
    present = count > 0
    return {
        "top1": float(hits[:, 0].mean() * 100),
        "top5": float(hits.any(axis=1).mean() * 100),
        "mean_class": float((correct[present] / count[present]).mean() * 100),
        "videos": n,
    }


def _unwrap(model: nn.Module) -> nn.Module:
    """DDP's forward is not needed to score, and skipping it keeps ranks with fewer batches from hanging."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    if amp not in dtypes:
        raise ValueError(f"amp must be one of bf16, fp16, fp32, got {amp!r}")
    if dtypes[amp] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtypes[amp])


def _gather_from_ranks(
    ids: torch.Tensor, labels: torch.Tensor, view_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate every rank's rows on every rank. Ranks hold different counts (the last may hold none),
    so rows are padded to the largest count for all_gather and trimmed afterwards."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ids, labels, view_logits
    backend = dist.get_backend()
    comm = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    world = dist.get_world_size()
    n, v, c = view_logits.shape
    sizes = [torch.zeros(2, dtype=torch.int64, device=comm) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([n, v], dtype=torch.int64, device=comm))
    sizes = [tuple(s.tolist()) for s in sizes]
    views = sorted({v_r for n_r, v_r in sizes if n_r})
    if len(views) > 1:
        raise RuntimeError(f"ranks delivered different numbers of views per video: {views}")
    views_per_video = views[0] if views else v
    most = max(n_r for n_r, _ in sizes)

    def gather(local: torch.Tensor, row_shape: tuple[int, ...]) -> torch.Tensor:
        padded = torch.zeros((most, *row_shape), dtype=local.dtype, device=comm)
        if n:
            padded[:n] = local.to(comm)
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n_r] for part, (n_r, _) in zip(parts, sizes, strict=True)]).cpu()

    return gather(ids, ()), gather(labels, ()), gather(view_logits, (views_per_video, c))


@torch.inference_mode()
def evaluate_model(
    model: nn.Module,
    loader: Iterable[dict],
    num_classes: int,
    fuse: str = "logits",
    amp: str = "bf16",
    channels_last: bool = True,
) -> EvalResult:
    """Score every view of every video the loader yields (all ranks together), fuse views, measure.

    Batches are {"clips": (N, V, ...) or a single-view (N, ...), "labels": (N,), "ids": (N,)}. The V views
    are folded into the batch (N*V clips through the model at once) and unfolded from the logits.
    Logits stay on the device until the end, so the loop has no host syncs.
    """
    if fuse not in FUSE_MODES:
        raise ValueError(f"fuse must be one of {', '.join(FUSE_MODES)}, got {fuse!r}")
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    layout = getattr(net, "layout", "NTCHW")
    autocast = _autocast(device, amp)
    ids, labels, logits = [], [], []
    start = time.perf_counter()
    try:
        for batch in loader:
            clips = batch["clips"]
            if clips.dim() == 5:  # a train/val-shaped batch: one view per video
                clips = clips.unsqueeze(1)
            n, v = clips.shape[:2]
            x = clips.to(device, non_blocking=True).flatten(0, 1)
            if amp == "fp32":
                x = x.float()
            if channels_last:
                x = to_channels_last(x, layout)
            with autocast:
                out = net(x)
            if out.shape != (n * v, num_classes):
                raise ValueError(
                    f"model output {tuple(out.shape)} for {n} videos x {v} views; expected "
                    f"({n * v}, {num_classes}) (num_classes = model.num_classes)"
                )
            logits.append(out.float().view(n, v, num_classes))
            ids.append(batch["ids"].reshape(-1))
            labels.append(batch["labels"].reshape(-1))
    finally:
        net.train(was_training)
    if logits:
        local = (torch.cat(ids).to(torch.int64), torch.cat(labels).to(torch.int64), torch.cat(logits))
    else:  # this rank's shard was empty
        empty = torch.zeros(0, dtype=torch.int64)
        local = (empty, empty, torch.zeros(0, 0, num_classes, device=device))
    all_ids, all_labels, all_logits = (t.cpu().numpy() for t in _gather_from_ranks(*local))
    elapsed = time.perf_counter() - start

    order = np.argsort(all_ids, kind="stable")
    all_ids, all_labels, all_logits = all_ids[order], all_labels[order], all_logits[order]
    first = np.ones(len(all_ids), dtype=bool)
    first[1:] = all_ids[1:] != all_ids[:-1]
    if not first.all():
        log.warning("%d duplicate video ids from the loader were scored once", int((~first).sum()))
        all_ids, all_labels, all_logits = all_ids[first], all_labels[first], all_logits[first]
    if len(all_ids) == 0:
        raise ValueError("the loader yielded no videos on any rank (empty list?)")

    scores = fuse_views(all_logits, fuse)
    metrics = compute_metrics(scores, all_labels)
    metrics["videos_per_s"] = len(all_ids) / max(elapsed, 1e-9)
    return EvalResult(all_ids, all_labels, all_logits.astype(np.float32), scores, metrics)


# --------------------------------------------------------------------------------------------------
# Outputs (all written atomically: a temp file next to the target, then os.replace)
# --------------------------------------------------------------------------------------------------


def save_dump(
    path: Path, ids: np.ndarray, labels: np.ndarray, class_names: list[str] | None, **arrays
) -> None:
    """A .npz of ids, labels, class_names (when known) and `arrays` (view_logits, or scores for a fusion).

    Strings are stored as fixed-width unicode arrays, so np.load needs no pickle.
    """
    content = {"ids": ids.astype(np.int64), "labels": labels.astype(np.int64), **arrays}
    if class_names is not None:
        content["class_names"] = np.array(class_names, dtype=str)
    atomic_write(Path(path), lambda f: np.savez(f, **content))


def load_dump(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise DumpError(f"{path}: score dump not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            dump = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise DumpError(f"{path}: not a readable .npz score dump ({e})") from None
    missing = {"ids", "labels"} - dump.keys()
    if missing or not ({"view_logits", "scores"} & dump.keys()):
        raise DumpError(
            f"{path}: not a score dump from evaluate.py (has {sorted(dump)}, needs ids, labels and "
            "view_logits or scores)"
        )
    rows = {k: len(dump[k]) for k in ("ids", "labels", "view_logits", "scores") if k in dump}
    if len(set(rows.values())) != 1:
        raise DumpError(f"{path}: arrays of different lengths {rows}")
    return dump


def per_class_rows(cm: np.ndarray, names: list[str]) -> list[list]:
    """class, name, videos, correct, accuracy % (empty for a class without videos)."""
    rows = []
    for c, name in enumerate(names):
        count, correct = int(cm[c].sum()), int(cm[c, c])
        rows.append([c, name, count, correct, f"{100 * correct / count:.2f}" if count else ""])
    return rows


def write_reports(
    out: Path,
    labels: np.ndarray,
    scores: np.ndarray,
    class_names: list[str] | None,
    metrics: dict,
    title: str,
) -> list[Path]:
    """Next to the dump <out>.npz: <out>.metrics.json, .per_class.csv, .confusion.csv and .confusion.png."""
    stem = Path(out).with_suffix("")
    num_classes = scores.shape[1]
    names = class_names or [str(c) for c in range(num_classes)]
    cm = confusion_matrix(labels, scores.argmax(axis=1), num_classes)
    paths = [
        Path(f"{stem}.{suffix}")
        for suffix in ("metrics.json", "per_class.csv", "confusion.csv", "confusion.png")
    ]

    atomic_write(paths[0], lambda f: f.write(json.dumps(metrics, indent=2) + "\n"), binary=False)

    def per_class(f):
        w = csv.writer(f)
        w.writerow(["class", "name", "videos", "correct", "accuracy"])
        w.writerows(per_class_rows(cm, names))

    def confusion(f):
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *names])
        w.writerows([name, *row.tolist()] for name, row in zip(names, cm, strict=True))

    atomic_write(paths[1], per_class, binary=False)
    atomic_write(paths[2], confusion, binary=False)
    atomic_write(paths[3], lambda f: plot_confusion(cm, names, title, f))
    return paths


def plot_confusion(cm: np.ndarray, names: list[str], title: str, f: io.IOBase) -> None:
    """Row-normalised confusion matrix as PNG. A bare Figure renders with Agg and touches no pyplot state."""
    from matplotlib.figure import Figure

    num_classes = len(names)
    counts = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, counts, out=np.zeros(cm.shape, dtype=float), where=counts > 0)
    side = min(4 + 0.3 * num_classes, 30)
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot()
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if num_classes <= 50:  # beyond that the names are unreadable; the CSV has them
        ax.set_xticks(range(num_classes), names, rotation=90, fontsize=7)
        ax.set_yticks(range(num_classes), names, fontsize=7)
    fig.tight_layout()
    fig.savefig(f, format="png", dpi=100)


def print_table(rows: list[tuple[str, str]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name, _ in rows:
        table.add_column(name, justify="right", no_wrap=True)
    table.add_row(*(value for _, value in rows))
    Console().print(table)


def metric_rows(metrics: dict) -> list[tuple[str, str]]:
    rows = [("videos", str(metrics["videos"]))]
    rows += [(name, f"{metrics[key]:.2f}") for key, name in (("top1", "top-1 %"), ("top5", "top-5 %"))]
    rows.append(("mean class %", f"{metrics['mean_class']:.2f}"))
    if "videos_per_s" in metrics:
        rows.append(("videos/s", f"{metrics['videos_per_s']:.1f}"))
    return rows


# --------------------------------------------------------------------------------------------------
# Fusion of dumps (several models, or the same model under several view settings)
# --------------------------------------------------------------------------------------------------


def fuse_dumps(
    paths: list[str | Path], mode: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str] | None]:
    """Mean over the dumps of each dump's view-fused scores, every dump weighted equally.

    Like the seeds' score-fusion scripts: each input's views are fused first (mean logits or mean softmax),
    then the inputs are averaged. Ids and labels must agree (a dump is sorted by id when read), and the
    error names the file that differs. A fused file (scores, no view_logits) can be an input if it was
    fused with the same mode.
    """
    if mode not in FUSE_MODES:
        raise ValueError(f"--fuse-mode must be one of {', '.join(FUSE_MODES)}, got {mode!r}")
    total, ref_ids, ref_labels, ref_path, class_names = None, None, None, None, None
    for path in paths:
        dump = load_dump(path)
        order = np.argsort(dump["ids"], kind="stable")
        ids, labels = dump["ids"][order], dump["labels"][order]
        if "view_logits" in dump:
            scores = fuse_views(dump["view_logits"][order], mode)
        else:
            stored = str(dump.get("fuse_mode", "unknown"))
            if stored != mode:
                raise DumpError(f"{path}: holds scores fused as {stored}, cannot fuse them as {mode}")
            scores = dump["scores"][order].astype(np.float32)
        if total is None:
            total, ref_ids, ref_labels, ref_path = scores.astype(np.float64), ids, labels, path
            class_names = dump["class_names"].tolist() if "class_names" in dump else None
            continue
        if len(ids) != len(ref_ids) or (ids != ref_ids).any():
            missing = np.setdiff1d(ref_ids, ids)
            extra = np.setdiff1d(ids, ref_ids)
            raise DumpError(
                f"{path}: video ids differ from {ref_path} ({len(missing)} missing, e.g. "
                f"{missing[:3].tolist()}; {len(extra)} extra, e.g. {extra[:3].tolist()}); "
                "were both made from the same list?"
            )
        if (labels != ref_labels).any():
            bad = ids[labels != ref_labels]
            raise DumpError(
                f"{path}: labels differ from {ref_path} for {len(bad)} videos (ids {bad[:5].tolist()})"
            )
        if scores.shape[1] != total.shape[1]:
            raise DumpError(f"{path}: {scores.shape[1]} classes, {ref_path} has {total.shape[1]}")
        total += scores
    if total is None:
        raise DumpError("--fuse needs at least one dump")
    return ref_ids, ref_labels, (total / len(paths)).astype(np.float32), class_names


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
    # Imported here: evaluate_model (train.py) and --fuse need neither DALI nor the model zoo.
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

        model = build_model(replace(cfg.model, pretrained=""))  # the checkpoint brings all weights
        load_model_weights(model, ckpt, args.checkpoint, args.weights)
        del ckpt
        model.to(info.device)
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last_3d if model.layout == "NCTHW" else torch.channels_last)
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
    except (ConfigError, DumpError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
