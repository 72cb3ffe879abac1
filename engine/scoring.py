"""Scoring, shared by train.py's validation and evaluate.py's multi-view test: run every view of every
video through the model, gather the scores of all ranks, fuse the views, and measure.

The loader shards the videos over the ranks; every rank sends its scores to every other (padded
all_gather), and the union is de-duplicated and sorted by video id, so each video counts exactly once
whatever the world size, and the result does not depend on it. A CxN test (say 3x10) is one batch of
C*N views per video: `fuse_views` averages their logits (TSM family) or softmax (MMAction2, MSN).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from engine.amp import autocast
from engine.channels_last import to_channels_last
from engine.config import FUSE_MODES

log = logging.getLogger(__name__)



@dataclass
class EvalResult:
    """Scores of every video of the list, sorted by video id, identical on every rank."""

    ids: np.ndarray  # (n,) int64: line index of the video in the list
    labels: np.ndarray  # (n,) int64
    view_logits: np.ndarray  # (n, V, C) float32, view v = clip * crops + crop
    scores: np.ndarray  # (n, C) views fused (mean logits, or mean softmax probabilities)
    metrics: dict[str, float]  # top1, top5, mean_class (percent), videos, videos_per_s

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
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Score every view of every video the loader yields (all ranks together), fuse views, measure.

    Batches are {"clips": (N, V, ...) or a single-view (N, ...), "labels": (N,), "ids": (N,)}. The V views
    are folded into the batch (N*V clips through the model at once) and unfolded from the logits.
    Logits stay on the device until the end, so the loop has no host syncs. `progress(batches, videos)`
    is called after each batch with this rank's counts so far (shapes only: no sync); the caller decides
    what to print, the library prints nothing.
    """
    if fuse not in FUSE_MODES:
        raise ValueError(f"fuse must be one of {', '.join(FUSE_MODES)}, got {fuse!r}")
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    layout = getattr(net, "layout", "NTCHW")
    amp_context = autocast(device, amp)
    ids, labels, logits = [], [], []
    videos = 0
    start = time.perf_counter()
    try:
        for batch in loader:
            clips = batch["clips"]
            if clips.dim() == 5:  # a train/val-shaped batch: one view per video
                clips = clips.unsqueeze(1)
            n, v = clips.shape[:2]
            if n == 0:  # every video of the batch was left out (data.skip_bad): nothing to score
                continue
            x = clips.to(device, non_blocking=True).flatten(0, 1)
            if amp == "fp32":
                x = x.float()
            if channels_last:
                x = to_channels_last(x, layout)
            with amp_context:
                out = net(x)
            if out.shape != (n * v, num_classes):
                raise ValueError(
                    f"model output {tuple(out.shape)} for {n} videos x {v} views; expected "
                    f"({n * v}, {num_classes}) (num_classes = model.num_classes)"
                )
            logits.append(out.float().view(n, v, num_classes))
            ids.append(batch["ids"].reshape(-1))
            labels.append(batch["labels"].reshape(-1))
            videos += n
            if progress is not None:
                progress(len(logits), videos)
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


