"""Train a video classifier: `python train.py CONFIG [--section.key=value ...] [--resume auto|PATH]`.

Multi-GPU: `torchrun --nproc_per_node=N train.py CONFIG ...` (one process and one DALI pipeline per GPU,
NCCL; gloo on CPU). Reads top-down: `train` sets up in order (process group -> data -> model ->
optimizer -> resume) and runs the epochs; `train_epoch` is the loop (fetch, forward/backward, optimizer
step, log, checkpoint). The step mechanics (AMP, accumulation, clipping, non-finite guard) are in
engine/step.py, the LR schedule in engine/optim.py, checkpoint files in engine/checkpoint.py, validation
scoring in engine/scoring.py. See docs/TRAINING.md and docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import signal
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import DefaultsHelpFormatter, exit_if_help


def build_parser() -> argparse.ArgumentParser:
    """The command line, defined before torch and DALI load so that `--help` needs neither."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter,
        epilog="Config keys are overridden with --section.key=value; --print-config shows every value with "
        "the defaults filled in (README.md: the config reference).",
    )  # fmt: skip
    parser.add_argument("config", help="YAML config (configs/*.yaml)")
    parser.add_argument("--resume", default="", help="auto (newest checkpoint in train.out_dir) or a path")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


if __name__ == "__main__":
    exit_if_help(build_parser)

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dali_pipes.fingerprint import describe, run_fingerprints
from dali_pipes.source import ClipLoadError
from engine.channels_last import model_channels_last
from engine.checkpoint import (
    BestTracker,
    CheckpointError,
    check_resumable,
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    mark_best,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from engine.config import (
    Config,
    ConfigError,
    dump_yaml,
    join_problems,
    load_config,
    print_config_text,
    split_cli,
    to_dict,
)
from engine.distributed import DistInfo, all_gather_objects, exit_on_peer_failure, init_distributed
from engine.fileio import atomic_write_text
from engine.metrics_log import LogWindow, MetricsLog, MetricsLogError, provenance
from engine.optim import ModelEMA, build_optimizer, build_scheduler, scaled_lr
from engine.plot import save_run_curves
from engine.preemption import StopRequest, exit_on_signals, restore_signals
from engine.preflight import PreflightError, claim_run_dir, preflight_problems, with_preflight_findings
from engine.progress import log_console
from engine.scoring import evaluate_model
from engine.step import NonFiniteLossError, TrainStep, all_finite


class RunDirError(RuntimeError):
    """The run directory and --resume disagree (e.g. a fresh start over existing checkpoints)."""


# Errors whose message is the whole story (config key, file, list line, step): one line, no traceback.
# ConfigError, PretrainedMismatchError, PreflightError and list errors are ValueErrors; ClipLoadError
# (a bad sample with data.skip_bad off) is the loader's RuntimeError naming the list line and file;
# MetricsLogError is a full disk under metrics.jsonl.
USER_ERRORS = (
    ValueError, FileNotFoundError, CheckpointError, RunDirError, NonFiniteLossError, ClipLoadError,
    MetricsLogError,
)  # fmt: skip


@dataclass
class Run:
    """One training job: the pieces a checkpoint saves, and the loop's bookkeeping."""

    cfg: Config
    info: DistInfo
    out_dir: Path
    console: Console
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: ModelEMA | None
    train_loader: Any
    val_loader: Any
    stepper: TrainStep | None = None
    metrics: MetricsLog | None = None
    progress: Progress | None = None
    window: LogWindow = field(default_factory=LogWindow)
    epoch: int = 0
    step: int = 0
    last_ckpt: Path | None = None
    val_results: dict = field(default_factory=dict)
    batches_per_rank: list[list[int]] = field(default_factory=list)
    skipped_samples: int = 0  # unreadable samples replaced (data.skip_bad), summed over ranks
    stop: StopRequest = field(default_factory=StopRequest)
    best: BestTracker = field(default_factory=BestTracker)
    dataset: dict = field(default_factory=dict)  # fingerprints of the train/val lists (rank 0)


def train(cfg: Config, resume: str = "") -> dict:
    """Run (or continue) one training job; returns a summary (step, final validation, checkpoint path)."""
    info = setup_process(cfg)
    out_dir = Path(cfg.train.out_dir)
    console = log_console(stderr=True, quiet=not info.is_main)  # log files: no 80-column cut
    ckpt_path = resolve_resume(resume, out_dir)
    # rank 0 holds out_dir's lock (engine.runlock) until the end
    with preflight(cfg, info, console, resuming=ckpt_path is not None):
        return run_training(cfg, info, out_dir, console, ckpt_path)


def run_training(
    cfg: Config, info: DistInfo, out_dir: Path, console: Console, ckpt_path: Path | None
) -> dict:
    """`train` after the preflight checks: build everything, resume, run the epochs."""
    # data: one loader per rank (imported late: `--print-config` works without DALI)
    from dali_pipes.loader import build_loader

    device_id = info.local_rank if cfg.data.device == "gpu" else None
    train_loader = build_loader(cfg.data, "train", info.rank, info.world_size, device_id=device_id)
    val_loader = None
    if cfg.train.eval_every > 0:
        val_loader = build_loader(cfg.data, "val", info.rank, info.world_size, device_id=device_id)

    # model: build_model loads model.pretrained; a resumed run takes its weights from the checkpoint
    from models import build_model

    model = build_model(dataclasses.replace(cfg.model, pretrained="") if ckpt_path else cfg.model)
    model = model.to(info.device)
    if cfg.train.channels_last:
        model = model_channels_last(model)

    # optimizer, schedule, AMP loss scaling (fp16 only), EMA
    total_batch = cfg.data.batch_size * info.world_size * cfg.train.accum_steps
    lr = scaled_lr(cfg.optim, total_batch)
    optimizer = build_optimizer(model, cfg.optim, lr)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.accum_steps)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, cfg.train.epochs)
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.train.amp == "fp16")
    ema = ModelEMA(model, cfg.train.ema) if cfg.train.ema > 0 else None
    run = Run(cfg, info, out_dir, console, model, optimizer, scheduler, scaler, ema, train_loader, val_loader)
    run.best = BestTracker(cfg.train.best_metric, cfg.train.best_mode)

    start_epoch, start_batch, data_state = restore(run, ckpt_path) if ckpt_path else (0, 0, None)
    run.stepper = TrainStep(
        model, wrap_model(model, cfg.train.compile, info), optimizer, scheduler, scaler, ema,
        cfg.train, cfg.optim, warn=console.print,
    )  # fmt: skip
    if info.is_main:
        start_log(run, ckpt_path, f"total batch {total_batch}, lr {lr:g}, {steps_per_epoch} steps/epoch")

    # the epochs
    run.progress = Progress(
        TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"), console=console,
        disable=not (info.is_main and cfg.train.progress and console.is_terminal),
    )  # fmt: skip
    model.train()
    run.window.reset()
    with run.progress, run.stop:
        for epoch in range(start_epoch, cfg.train.epochs):
            first = start_batch if epoch == start_epoch else 0
            if train_epoch(run, epoch, first, data_state if first else None):
                return finish(run, epoch, stopped=True)
            if end_epoch(run, epoch):
                return finish(run, epoch + 1, stopped=True)
    return finish(run, cfg.train.epochs, stopped=False)


def train_epoch(run: Run, epoch: int, first: int, data_state: dict | None) -> bool:
    """Batches `first`.. of one epoch; True when train.stop_at_step or a stop signal (SIGTERM, SIGINT)
    stopped it (a checkpoint was written)."""
    cfg, loader, stepper, progress = run.cfg, run.train_loader, run.stepper, run.progress
    accum = cfg.train.accum_steps
    run.epoch = epoch
    loader.set_epoch(epoch)
    if data_state is not None:
        loader.load_state_dict(data_state)
    n_batches = len(loader)
    skipped_before = getattr(loader, "skipped", 0)
    task = progress.add_task("", total=n_batches, completed=first, epoch=epoch + 1, stats="")
    i, start_step = first, run.step
    # a checkpoint taken after the epoch's last step (a signal) resumes at its end: no batch left to run
    for batch in run.window.timed(loader) if first < n_batches else ():
        if i % accum == 0:
            stepper.begin()
        i += 1
        last_micro = i % accum == 0 or i == n_batches
        run.window.clips += stepper.forward_backward(batch, sync=last_micro)
        progress.advance(task)
        if not last_micro:
            continue
        stepper.update(run.step, micro_batches=accum if i % accum == 0 else i % accum)
        run.step += 1
        if run.step % cfg.train.log_every == 0:
            log_train(run, task, i, n_batches)
        if cfg.train.stop_at_step and run.step >= cfg.train.stop_at_step and i < n_batches:
            path = save(run, epoch, i)
            run.console.print(f"stopped at step {run.step} as asked (train.stop_at_step); checkpoint {path}")
            return True
        if run.stop.agreed():
            path = save(run, epoch, i)
            run.console.print(
                f"stopped by {run.stop.name} at step {run.step}; checkpoint {path} "
                "(continue with --resume auto)"
            )
            return True
    if no_log_this_epoch(run, start_step):
        log_train(run, task, i, n_batches)
    progress.remove_task(task)
    record_epoch(run, epoch, i - first, getattr(loader, "skipped", 0) - skipped_before)
    return False


def record_epoch(run: Run, epoch: int, batches: int, skipped: int) -> None:
    """Batches and replaced samples (data.skip_bad) of every rank: metrics.jsonl's epoch record, console."""
    per_rank = all_gather_objects((batches, skipped))
    counts = [b for b, _ in per_rank]
    skipped_per_rank = [s for _, s in per_rank]
    run.batches_per_rank.append(counts)
    run.skipped_samples += sum(skipped_per_rank)
    if sum(skipped_per_rank):
        run.console.print(
            f"[yellow]epoch {epoch + 1}: {sum(skipped_per_rank)} unreadable training samples replaced "
            f"(data.skip_bad; per rank {skipped_per_rank})"
        )
    if run.metrics is not None:
        run.metrics.write(
            "epoch", run.step, epoch=epoch + 1, batches_per_rank=counts, skipped=sum(skipped_per_rank),
            skipped_per_rank=skipped_per_rank,
        )  # fmt: skip


def end_epoch(run: Run, epoch: int) -> bool:
    """Validation and checkpoint at an epoch's end; True when train.stop_at_step ends the run here."""
    cfg = run.cfg.train
    run.stepper.guard.check(epoch, run.last_ckpt)
    last_epoch = epoch + 1 == cfg.epochs
    improved = False  # the same verdict on every rank (the val metrics are gathered to all)
    if run.val_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or last_epoch):
        run.val_results = validate(run, epoch)
        improved = run.best.update(run.val_results["val"], epoch + 1)
    stop_now = bool(cfg.stop_at_step) and run.step >= cfg.stop_at_step
    if last_epoch or stop_now or improved or (epoch + 1) % cfg.ckpt_every == 0:
        path = save(run, epoch + 1, 0)
        if path is not None:
            run.console.print(f"checkpoint {path}")
            if improved:
                record_best(run, path)
    if stop_now and not last_epoch:
        run.console.print(f"stopped at step {run.step} as asked (train.stop_at_step)")
        return True
    return False


# --------------------------------------------------------------------------------------------------
# The pieces `train` calls, in the order it calls them
# --------------------------------------------------------------------------------------------------


def setup_process(cfg: Config) -> DistInfo:
    """Process group, CPU threads, per-rank seeds and CUDA math flags."""
    info = init_distributed(cfg.train.dist_timeout_s)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    seed = cfg.train.seed + info.rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return info


def preflight(cfg: Config, info: DistInfo, console: Console, resuming: bool) -> AbstractContextManager:
    """Before any heavy work, on rank 0, every finding at once (engine.preflight.preflight_problems: CUDA
    for data.device gpu, model.pretrained, lists and labels, train.out_dir writable; a warning when the
    training list's class count differs from model.num_classes); then, with none, train.out_dir locked
    (one trainer per run directory), temp files of interrupted checkpoint writes removed, room for one
    checkpoint. Every rank stops on rank 0's findings (no rank is left waiting in a collective for a
    peer that quit). Returns the held lock (rank 0) to release when the run ends."""
    error = ""
    lock: AbstractContextManager = nullcontext()
    if info.is_main:
        lists = ["train_list"] + (["val_list"] if cfg.train.eval_every > 0 else [])
        problems, warnings = preflight_problems(cfg, torch.cuda.is_available(), resuming, lists)
        if not problems:
            try:
                lock = claim_run_dir(cfg, console.print)
            except ValueError as e:  # PreflightError
                problems.append(str(e))
        error = join_problems(problems, "preflight") if problems else ""
        if not problems:  # warnings only for a run that starts
            for warning in warnings:
                console.print(f"warning: {warning}", style="yellow", markup=False)
    errors = [e for e in all_gather_objects(error) if e]
    if errors:
        lock.__exit__(None, None, None)  # (released: no run follows)
        raise PreflightError(errors[0])
    return lock


def resolve_resume(resume: str, out_dir: Path) -> Path | None:
    """`auto`: newest checkpoint in out_dir (None: start fresh); a path: that file; "": fresh start,
    which refuses to run over existing checkpoints so a forgotten --resume never mixes two runs."""
    if resume == "auto":
        return latest_checkpoint(out_dir)
    if resume:
        path = Path(resume)
        if not path.is_file():
            raise CheckpointError(f"--resume: checkpoint not found: {path}")
        return path
    existing = latest_checkpoint(out_dir)
    if existing is not None:
        raise RunDirError(
            f"{out_dir} already holds checkpoints (newest {existing.name}): pass --resume auto to continue "
            "that run, or set --train.out_dir to a new directory"
        )
    return None


def restore(run: Run, path: Path) -> tuple[int, int, dict]:
    """Load a checkpoint into the run; returns (epoch, batch in that epoch, loader state) to continue at."""
    state = load_checkpoint(path, map_location=run.info.device)
    check_resumable(state, path, run.cfg.model)  # a train.py checkpoint of the configured model
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty when the run it comes from did not use fp16
        run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"] if state.get("ema") else state["model"])
    rngs = state["rng"]
    set_rng_state(rngs[run.info.rank] if len(rngs) == run.info.world_size else rngs[0])
    run.step, run.last_ckpt = state["step"], path
    run.best.load_state_dict(state.get("best"))
    run.console.print(f"resumed from {path} (epoch {state['epoch']}, step {run.step})")
    changed = config_changes(state["config"], to_dict(run.cfg))
    if changed:
        run.console.print(f"[yellow]config differs from the checkpoint's: {', '.join(changed)}")
    return state["epoch"], state["batch_in_epoch"], state["data_state"]


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (reported when resuming)."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return keys


def wrap_model(model: nn.Module, compile: bool, info: DistInfo) -> nn.Module:
    """DDP over the ranks (after the weights are loaded: DDP broadcasts rank 0's), then torch.compile."""
    if info.world_size > 1:
        ids = [info.local_rank] if info.device.type == "cuda" else None
        model = DDP(model, device_ids=ids, gradient_as_bucket_view=True)
    return torch.compile(model) if compile else model


def start_log(run: Run, ckpt_path: Path | None, schedule: str) -> None:
    """Rank 0: config.yaml, the start record of metrics.jsonl, and two lines saying what runs where."""
    cfg, model = run.cfg, run.model
    run.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.out_dir / "config.yaml", dump_yaml(cfg))
    run.metrics = MetricsLog(run.out_dir, resume_step=run.step if ckpt_path else None)
    prov = provenance(run.info)
    resumed_from = str(ckpt_path or "")
    run.dataset = run_fingerprints(cfg.data, cfg.eval)
    run.metrics.write("start", run.step, provenance=prov, config=to_dict(cfg), resumed_from=resumed_from,
                      dataset=run.dataset)  # fmt: skip
    n_all = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dirty = " (dirty)" if prov["git_dirty"] else ""
    groups = ", ".join(g["name"] for g in run.optimizer.param_groups)
    run.console.print(
        f"run dir {run.out_dir.resolve()} | git {prov['git_sha'][:10]}{dirty} | torch {prov['torch']}, "
        f"DALI {prov['dali']}, CUDA {prov['cuda']} | {run.info.world_size} x {prov['devices'][0]}"
    )
    run.console.print(
        f"{cfg.model.name}: {n_trainable:,} trainable / {n_all:,} params; groups {groups}; {schedule} x "
        f"{cfg.train.epochs} epochs, amp {cfg.train.amp}"
    )
    for name, fp in run.dataset.items():
        run.console.print(describe(name, fp), markup=False)


def log_train(run: Run, task: int, i: int, n_batches: int) -> None:
    """A log step: the non-finite check, the mean loss over ranks (host syncs), metrics.jsonl, console."""
    run.stepper.guard.check(run.epoch, run.last_ckpt)
    elapsed = time.perf_counter() - run.window.t0
    group = run.optimizer.param_groups[0]
    stats = {
        "epoch": run.epoch + 1,
        "loss": run.stepper.take_mean_loss(),
        "lr": group["lr"] / group["lr_mult"],
        "clips_per_s": run.window.clips * run.info.world_size / elapsed,
        "data_wait": run.window.wait / elapsed,
    }
    if run.stepper.fp16:
        stats["loss_scale"] = float(run.scaler.get_scale())
    if run.metrics is not None:
        run.metrics.write("train", run.step, **stats)
        text = (
            f"loss {stats['loss']:.4f}  lr {stats['lr']:.3g}  {stats['clips_per_s']:.1f} "
            f"clips/s  data wait {100 * stats['data_wait']:.0f}%"
        )
        run.progress.update(task, stats=text)
        if run.progress.disable:  # log lines instead of a bar (files, non-tty)
            run.console.print(f"step {run.step} (epoch {run.epoch + 1}, {i}/{n_batches})  {text}")
    run.window.reset()


def no_log_this_epoch(run: Run, start_step: int) -> bool:
    """The epoch made steps but none was a log step (epochs shorter than train.log_every): then its end
    logs the loss, so every epoch has a training loss line. The same answer on every rank (no sync)."""
    every = run.cfg.train.log_every
    return run.step > start_step and run.step // every == start_step // every


def save(run: Run, next_epoch: int, batch_in_epoch: int) -> Path | None:
    """Checkpoint after `run.step` (all ranks call it: RNG states are gathered). Refuses NaN weights."""
    run.stepper.guard.check(run.epoch, run.last_ckpt)
    if not all_finite(run.model):
        raise NonFiniteLossError(
            f"weights are non-finite at step {run.step}; not saving over {run.last_ckpt or 'nothing'}"
        )
    rngs = all_gather_objects(rng_state())
    if not run.info.is_main:
        return None
    state = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "epoch": next_epoch,
        "batch_in_epoch": batch_in_epoch,
        "step": run.step,
        "data_state": run.train_loader.state_dict(),
        "rng": rngs,
        "config": to_dict(run.cfg),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "best": run.best.state_dict(),
        "dataset": run.dataset,
    }
    run.last_ckpt = save_checkpoint(run.out_dir / checkpoint_name(next_epoch, run.step), state)
    prune_checkpoints(run.out_dir, run.cfg.train.keep_ckpts)
    return run.last_ckpt


def record_best(run: Run, path: Path) -> None:
    """Rank 0: RUN/ckpt_best.pt becomes `path` (atomically), a "best" record in metrics.jsonl."""
    best = mark_best(path)
    b = run.best
    run.console.print(f"best {b.metric} so far ({b.value:.2f} at epoch {b.epoch}): {best} = {path.name}")
    if run.metrics is not None:
        run.metrics.write(
            "best", run.step, epoch=b.epoch, metric=b.metric, mode=b.mode, value=b.value, checkpoint=path.name
        )


def validate(run: Run, epoch: int) -> dict:
    """Score the val list with the weights (and the EMA's); the same code as evaluate.py's test."""
    cfg = run.cfg
    results = {}
    for tag, net in [("val", run.model)] + ([("val_ema", run.ema.module)] if run.ema is not None else []):
        res = evaluate_model(
            net, run.val_loader, cfg.model.num_classes, fuse=cfg.eval.fuse, amp=cfg.train.amp,
            channels_last=cfg.train.channels_last,
        )  # fmt: skip
        results[tag] = {k: float(v) for k, v in res.metrics.items()}
    run.model.train()
    if run.metrics is not None:
        for tag, m in results.items():
            run.metrics.write(tag, run.step, epoch=epoch + 1, **m)
            run.console.print(
                f"epoch {epoch + 1} {tag}: top1 {m['top1']:.2f}  top5 {m['top5']:.2f}  "
                f"({int(m['videos'])} videos, {m['videos_per_s']:.1f}/s)"
            )
    return results


def finish(run: Run, epochs_done: int, stopped: bool) -> dict:
    """Close the metrics log, draw RUN_DIR/curves.png (a failure only warns); the run's summary."""
    if run.metrics is not None:
        run.metrics.close()
        save_run_curves(run.out_dir)
    return {
        "out_dir": str(run.out_dir.resolve()),
        "step": run.step,
        "epoch": epochs_done,
        "checkpoint": str(run.last_ckpt or ""),
        "val": run.val_results,
        "batches_per_rank": run.batches_per_rank,
        "stopped_early": stopped,
        "stopped_by": run.stop.name,
        "skipped_steps": run.stepper.guard.reported,
        "skipped_samples": run.skipped_samples,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = split_cli(argv)
    args = build_parser().parse_args(rest)
    # SIGTERM / SIGINT during setup exit with one line (the loaders' workers are shut down); during the
    # epochs train()'s StopRequest takes over: a checkpoint at the next step on every rank, then rc 0
    # (SIGTERM: a scheduler's preemption) or 130 (SIGINT: Ctrl-C, so a `train && evaluate` chain stops)
    previous = exit_on_signals()
    try:
        if args.print_config:  # the resolved tree, each non-default value with the file that set it
            print(print_config_text(args.config, overrides), end="")
            return 0
        summary = train(load_config(args.config, overrides), args.resume)
        return 128 + signal.SIGINT if summary["stopped_by"] == "SIGINT" else 0
    except ConfigError as e:  # with the preflight's findings in the rest of the config: one block
        print(f"error: {with_preflight_findings(e, torch.cuda.is_available())}", file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        # rank 0's preflight finding stops every rank: one of them says it
        if not (isinstance(e, PreflightError) and os.environ.get("RANK", "0") != "0"):
            print(f"error: {e}", file=sys.stderr)
        return 3 if isinstance(e, NonFiniteLossError) else 2
    except RuntimeError as e:  # a peer rank died or hung: one line, not a gloo/NCCL traceback
        return exit_on_peer_failure(e)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        restore_signals(previous)  # not while the interpreter exits (DALI's atexit)


if __name__ == "__main__":
    sys.exit(main())
