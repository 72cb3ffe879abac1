"""Train a video classifier: `python train.py CONFIG [--section.key=value ...] [--resume auto|PATH]`.

Multi-GPU: `torchrun --nproc_per_node=N train.py CONFIG ...` (one process and one DALI pipeline per GPU,
NCCL; gloo on CPU). Reads top-down: config -> process group -> data -> model -> optimizer -> resume ->
loop (AMP, accumulation, clipping, non-finite guard) -> validation -> checkpoints. Helpers without
state live in trainlib.py, checkpoint files in checkpoint.py. See docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import (
    CheckpointError,
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from config import Config, ConfigError, dump_yaml, load_config, split_cli, to_dict
from fileio import atomic_write_text
from trainlib import (
    MetricsLog,
    ModelEMA,
    all_finite,
    all_gather_objects,
    build_optimizer,
    build_scheduler,
    init_distributed,
    mean_over_ranks,
    model_channels_last,
    provenance,
    scaled_lr,
    to_channels_last,
)


class NonFiniteLossError(RuntimeError):
    """Training met a non-finite loss (train.nonfinite: stop) or non-finite weights; names the step."""


class RunDirError(RuntimeError):
    """The run directory and --resume disagree (e.g. a fresh start over existing checkpoints)."""


# Errors whose message is the whole story (config key, file, list line, step): one line, no traceback.
# ConfigError, PretrainedMismatchError and the loader's list/sample errors are ValueErrors.
USER_ERRORS = (ValueError, FileNotFoundError, CheckpointError, RunDirError, NonFiniteLossError)


def train(cfg: Config, resume: str = "") -> dict:
    """Run (or continue) one training job; returns a summary (step, final validation, checkpoint path)."""
    # ---------------------------------------------------------------- process group, seeds, run dir
    info = init_distributed()
    main_rank = info.is_main
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
    if cfg.data.device == "gpu" and info.device.type != "cuda":
        raise ConfigError("data.device: 'gpu' but this machine has no CUDA device; pass --data.device=cpu")
    out_dir = Path(cfg.train.out_dir)
    ckpt_path = resolve_resume(resume, out_dir)
    console = Console(stderr=True, quiet=not main_rank)

    # ---------------------------------------------------------------- data: one loader per rank
    from dali_pipes.loader import build_loader  # imported late: `--print-config` works without DALI

    device_id = info.local_rank if cfg.data.device == "gpu" else None
    train_loader = build_loader(cfg.data, "train", info.rank, info.world_size, device_id=device_id)
    val_loader = None
    if cfg.train.eval_every > 0:
        val_loader = build_loader(cfg.data, "val", info.rank, info.world_size, device_id=device_id)

    # ---------------------------------------------------------------- model
    from models import build_model

    # build_model loads model.pretrained; a resumed run takes its weights from the checkpoint instead
    model = build_model(dataclasses.replace(cfg.model, pretrained="") if ckpt_path else cfg.model)
    model = model.to(info.device)
    layout = getattr(model, "layout", "NTCHW")
    if cfg.train.channels_last:
        model = model_channels_last(model)
    params = [p for p in model.parameters() if p.requires_grad]

    # ---------------------------------------------------------------- optimizer, schedule, AMP, EMA
    accum = cfg.train.accum_steps
    total_batch = cfg.data.batch_size * info.world_size * accum
    lr = scaled_lr(cfg.optim, total_batch)
    optimizer = build_optimizer(model, cfg.optim, lr)
    steps_per_epoch = math.ceil(len(train_loader) / accum)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, cfg.train.epochs)
    fp16 = cfg.train.amp == "fp16"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)
    scaler = torch.amp.GradScaler(info.device.type, enabled=fp16)
    ema = ModelEMA(model, cfg.train.ema) if cfg.train.ema > 0 else None

    # ---------------------------------------------------------------- resume
    start_epoch, start_batch, step, data_state = 0, 0, 0, None
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path, map_location=info.device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when the run it comes from did not use fp16
            scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"] if state.get("ema") else state["model"])
        start_epoch, start_batch, step = state["epoch"], state["batch_in_epoch"], state["step"]
        data_state = state["data_state"]
        rngs = state["rng"]
        set_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0])
        changed = config_changes(state["config"], to_dict(cfg))
        console.print(f"resumed from {ckpt_path} (epoch {start_epoch}, step {step})")
        if changed:
            console.print(f"[yellow]config differs from the checkpoint's: {', '.join(changed)}")

    train_model: torch.nn.Module = model
    if info.world_size > 1:
        ids = [info.local_rank] if info.device.type == "cuda" else None
        train_model = DDP(model, device_ids=ids, gradient_as_bucket_view=True)
    if cfg.train.compile:
        train_model = torch.compile(train_model)

    # ---------------------------------------------------------------- provenance (rank 0)
    metrics = None
    if main_rank:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", dump_yaml(cfg))
        metrics = MetricsLog(out_dir, resume_step=step if ckpt_path else None)
        prov = provenance(info)
        metrics.write("start", step, provenance=prov, config=to_dict(cfg), resumed_from=str(ckpt_path or ""))
        n_all = sum(p.numel() for p in model.parameters())
        dirty = " (dirty)" if prov["git_dirty"] else ""
        groups = ", ".join(g["name"] for g in optimizer.param_groups)
        console.print(
            f"run dir {out_dir.resolve()} | git {prov['git_sha'][:10]}{dirty} | torch {prov['torch']}, "
            f"DALI {prov['dali']}, CUDA {prov['cuda']} | {info.world_size} x {prov['devices'][0]}"
        )
        console.print(
            f"{cfg.model.name}: {sum(p.numel() for p in params):,} trainable / {n_all:,} params; groups "
            f"{groups}; total batch {total_batch}, lr {lr:g}, {steps_per_epoch} steps/epoch x "
            f"{cfg.train.epochs} epochs, amp {cfg.train.amp}"
        )

    # ---------------------------------------------------------------- helpers that close over the run
    last_ckpt: Path | None = ckpt_path
    bad_steps = torch.zeros((), dtype=torch.long, device=info.device)  # non-finite steps so far
    first_bad = torch.full((), -1, dtype=torch.long, device=info.device)  # the first of them
    reported_bad = 0

    def check_nonfinite() -> None:
        """One host sync: stop (or report skips) when non-finite steps happened since the last check."""
        nonlocal reported_bad
        n_bad = torch.stack([bad_steps, first_bad])
        if info.world_size > 1:
            dist.all_reduce(n_bad, op=dist.ReduceOp.MAX)
        count, first = (int(v) for v in n_bad.tolist())
        if count <= reported_bad:
            return
        if cfg.train.nonfinite == "stop":
            raise NonFiniteLossError(
                f"non-finite loss/gradients at step {first} (epoch {epoch + 1}); stopped. Its update was not "
                f"applied and no checkpoint was written after it; last good checkpoint: {last_ckpt or 'none'}"
            )
        console.print(f"[yellow]skipped {count - reported_bad} non-finite step(s) (first at step {first})")
        reported_bad = count

    def save(next_epoch: int, batch_in_epoch: int) -> Path | None:
        """Checkpoint after `step` (all ranks call it: RNG states are gathered). Refuses NaN weights."""
        nonlocal last_ckpt
        check_nonfinite()
        if not all_finite(model):
            raise NonFiniteLossError(
                f"weights are non-finite at step {step}; not saving over {last_ckpt or 'nothing'}"
            )
        rngs = all_gather_objects(rng_state())
        if not main_rank:
            return None
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": next_epoch,
            "batch_in_epoch": batch_in_epoch,
            "step": step,
            "data_state": train_loader.state_dict(),
            "rng": rngs,
            "config": to_dict(cfg),
            "ema": ema.state_dict() if ema is not None else None,
        }
        last_ckpt = save_checkpoint(out_dir / checkpoint_name(next_epoch, step), state)
        prune_checkpoints(out_dir, cfg.train.keep_ckpts)
        return last_ckpt

    def validate(epoch: int) -> dict:
        from evaluate import evaluate_model

        results = {}
        for tag, net in [("val", model)] + ([("val_ema", ema.module)] if ema is not None else []):
            net.eval()
            res = evaluate_model(
                net, val_loader, cfg.model.num_classes, fuse=cfg.eval.fuse, amp=cfg.train.amp,
                channels_last=cfg.train.channels_last,
            )  # fmt: skip
            results[tag] = {k: float(v) for k, v in res.metrics.items()}
        model.train()
        if main_rank:
            for tag, m in results.items():
                metrics.write(tag, step, epoch=epoch + 1, **m)
                console.print(
                    f"epoch {epoch + 1} {tag}: top1 {m['top1']:.2f}  top5 {m['top5']:.2f}  "
                    f"({int(m['videos'])} videos, {m['videos_per_s']:.1f}/s)"
                )
        return results

    def finish(epochs_done: int, stopped: bool) -> dict:
        if metrics is not None:
            metrics.close()
        return {
            "out_dir": str(out_dir.resolve()),
            "step": step,
            "epoch": epochs_done,
            "checkpoint": str(last_ckpt or ""),
            "val": val_results,
            "batches_per_rank": batches_per_rank,
            "stopped_early": stopped,
            "skipped_steps": reported_bad,
        }

    # ---------------------------------------------------------------- the loop
    progress = Progress(
        TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"), console=console,
        disable=not (main_rank and cfg.train.progress and console.is_terminal),
    )  # fmt: skip
    plain_logs = main_rank and progress.disable  # log lines instead of a bar (files, non-tty)
    autocast = torch.autocast(
        info.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
    )
    loss_sum = torch.zeros((), device=info.device)
    step_loss = torch.zeros((), device=info.device)
    good_steps = torch.zeros((), device=info.device)
    # skip mode: a non-finite forward must not leave NaN in BN running stats, so float buffers are
    # snapshotted at each step start and put back when the step is skipped (all on the device)
    guarded = [b for b in model.buffers() if b.is_floating_point()] if cfg.train.nonfinite == "skip" else []
    snapshot = [b.clone() for b in guarded]
    window = {"steps": 0, "clips": 0, "wait": 0.0, "t0": time.perf_counter()}
    batches_per_rank: list[list[int]] = []
    val_results: dict = {}
    epoch = start_epoch
    model.train()
    with progress:
        for epoch in range(start_epoch, cfg.train.epochs):
            train_loader.set_epoch(epoch)
            first = start_batch if epoch == start_epoch else 0
            if first:
                train_loader.load_state_dict(data_state)
            n_batches = len(train_loader)
            task = progress.add_task("", total=n_batches, completed=first, epoch=epoch + 1, stats="")
            i = first
            it = iter(train_loader)
            while True:
                if guarded and i % accum == 0:
                    torch._foreach_copy_(snapshot, guarded)
                t_wait = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    break
                window["wait"] += time.perf_counter() - t_wait
                clips = batch["clips"].to(info.device, non_blocking=True)
                labels = batch["labels"].to(info.device, non_blocking=True)
                if cfg.train.channels_last:
                    clips = to_channels_last(clips, layout)
                i += 1
                last_micro = i % accum == 0 or i == n_batches
                sync = nullcontext() if last_micro or info.world_size == 1 else train_model.no_sync()
                with sync:
                    with autocast:
                        logits = train_model(clips)
                    loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.optim.label_smoothing)
                    scaler.scale(loss / accum).backward()
                step_loss += loss.detach()
                window["clips"] += clips.shape[0]
                progress.advance(task)
                if not last_micro:
                    continue

                # optimizer step: unscale, clip, skip non-finite on the device (no host sync)
                if fp16:
                    scaler.unscale_(optimizer)
                if cfg.optim.clip_grad > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
                else:
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                bad = ~torch.isfinite(step_loss)
                if not fp16:  # fp16 overflow of the gradients is GradScaler's business, not an error
                    bad |= ~torch.isfinite(grad_norm)
                    optimizer.found_inf = (~torch.isfinite(grad_norm)).float()  # fused kernels skip on it
                    optimizer.grad_scale = None
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                for b, s in zip(guarded, snapshot, strict=True):
                    b.copy_(torch.where(bad, s, b))
                if ema is not None:
                    ema.update(model)
                first_bad.copy_(torch.where(bad & (first_bad < 0), step + 1, first_bad))  # 1-based
                bad_steps += bad.long()
                micro = accum if i % accum == 0 else i % accum
                loss_sum += torch.where(bad, 0.0, step_loss / micro)  # the logged loss is over good steps
                good_steps += (~bad).float()
                step_loss.zero_()
                step += 1
                window["steps"] += 1

                if step % cfg.train.log_every == 0:
                    check_nonfinite()
                    mean_loss = mean_over_ranks(loss_sum / good_steps.clamp(min=1))
                    elapsed = time.perf_counter() - window["t0"]
                    stats = {
                        "epoch": epoch + 1,
                        "loss": float(mean_loss.item()),
                        "lr": optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["lr_mult"],
                        "clips_per_s": window["clips"] * info.world_size / elapsed,
                        "data_wait": window["wait"] / elapsed,
                    }
                    if fp16:
                        stats["loss_scale"] = float(scaler.get_scale())
                    if main_rank:
                        metrics.write("train", step, **stats)
                        text = (
                            f"loss {stats['loss']:.4f}  lr {stats['lr']:.3g}  {stats['clips_per_s']:.1f} "
                            f"clips/s  data wait {100 * stats['data_wait']:.0f}%"
                        )
                        progress.update(task, stats=text)
                        if plain_logs:
                            console.print(f"step {step} (epoch {epoch + 1}, {i}/{n_batches})  {text}")
                    loss_sum.zero_()
                    good_steps.zero_()
                    window.update(steps=0, clips=0, wait=0.0, t0=time.perf_counter())

                if cfg.train.stop_at_step and step >= cfg.train.stop_at_step and i < n_batches:
                    path = save(epoch, i)
                    console.print(f"stopped at step {step} as asked (train.stop_at_step); checkpoint {path}")
                    return finish(epoch, stopped=True)

            # ------------------------------------------------------------ end of epoch
            progress.remove_task(task)
            counts = all_gather_objects(i - first)
            batches_per_rank.append(counts)
            if main_rank:
                metrics.write("epoch", step, epoch=epoch + 1, batches_per_rank=counts)
            check_nonfinite()
            last_epoch = epoch + 1 == cfg.train.epochs
            if val_loader is not None and ((epoch + 1) % cfg.train.eval_every == 0 or last_epoch):
                val_results = validate(epoch)
            stop_now = bool(cfg.train.stop_at_step) and step >= cfg.train.stop_at_step
            if last_epoch or stop_now or (epoch + 1) % cfg.train.ckpt_every == 0:
                path = save(epoch + 1, 0)
                if path is not None:
                    console.print(f"checkpoint {path}")
            if stop_now and not last_epoch:
                console.print(f"stopped at step {step} as asked (train.stop_at_step)")
                return finish(epoch + 1, stopped=True)

    return finish(cfg.train.epochs, stopped=False)


# --------------------------------------------------------------------------------------------------
# Small pieces used above
# --------------------------------------------------------------------------------------------------


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = split_cli(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="YAML config (configs/*.yaml)")
    parser.add_argument("--resume", default="", help="auto (newest checkpoint in train.out_dir) or a path")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(rest)
    # SIGTERM (scheduler preemption, torchrun stopping a failed job) unwinds like Ctrl-C, so the loaders'
    # worker processes are shut down instead of being orphaned
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        train(cfg, args.resume)
        return 0
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 3 if isinstance(e, NonFiniteLossError) else 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
