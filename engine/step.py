"""One optimizer step of the training loop, without a host sync.

`TrainStep` owns the mechanics between "a batch arrived" and "the weights moved": input to the device
(channels-last), autocast, loss scaling (fp16 only), gradient accumulation (DDP `no_sync` on all but the
last micro-batch), clipping, the fused optimizer skipping a non-finite update on the device, restoring
BN buffers after a skipped step, the EMA, and the running loss for the log line. `NonFiniteGuard` counts
the non-finite steps on the device; its `check` is the one host sync, called on log steps, at epoch ends
and before every checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.amp import autocast
from engine.channels_last import to_channels_last
from engine.config import OptimConfig, TrainConfig
from engine.distributed import mean_over_ranks
from engine.optim import ModelEMA


class NonFiniteLossError(RuntimeError):
    """Training met a non-finite loss (train.nonfinite: stop) or non-finite weights; names the step."""


def all_finite(module: nn.Module) -> bool:
    """True when every floating parameter and buffer is finite (one host sync; checkpoint time only)."""
    flags = [torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(flags).all().item()) if flags else True


class NonFiniteGuard:
    """Non-finite steps, counted on the device. `train.nonfinite: stop` raises at the next check;
    `skip` reports how many updates were skipped since the last check and goes on."""

    def __init__(self, mode: str, device: torch.device, warn: Callable[[str], None]) -> None:
        self.mode = mode
        self.warn = warn
        self.count = torch.zeros((), dtype=torch.long, device=device)  # non-finite steps so far
        self.first = torch.full((), -1, dtype=torch.long, device=device)  # the first of them (1-based)
        self.reported = 0

    def record(self, bad: torch.Tensor, step: int) -> None:
        """Count optimizer step `step` (0-based) as non-finite when `bad` (a device bool) is set."""
        self.first.copy_(torch.where(bad & (self.first < 0), step + 1, self.first))
        self.count += bad.long()

    def check(self, epoch: int, last_ckpt: Path | None) -> None:
        """One host sync (max over ranks): stop, or report skips, when non-finite steps happened."""
        both = torch.stack([self.count, self.first])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
        count, first = (int(v) for v in both.tolist())
        if count <= self.reported:
            return
        if self.mode == "stop":
            raise NonFiniteLossError(
                f"non-finite loss/gradients at step {first} (epoch {epoch + 1}); stopped. Its update was not "
                f"applied and no checkpoint was written after it; last good checkpoint: {last_ckpt or 'none'}"
            )
        self.warn(f"[yellow]skipped {count - self.reported} non-finite step(s) (first at step {first})")
        self.reported = count


class TrainStep:
    """Forward/backward per micro-batch (`forward_backward`) and the optimizer step (`update`)."""

    def __init__(
        self,
        model: nn.Module,
        train_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        ema: ModelEMA | None,
        train_cfg: TrainConfig,
        optim_cfg: OptimConfig,
        warn: Callable[[str], None],
    ) -> None:
        self.model, self.train_model = model, train_model  # train_model: DDP and/or compiled wrapper
        self.optimizer, self.scheduler, self.scaler, self.ema = optimizer, scheduler, scaler, ema
        self.cfg, self.optim_cfg = train_cfg, optim_cfg
        self.device = next(model.parameters()).device
        self.layout = getattr(model, "layout", "NTCHW")
        self.fp16 = train_cfg.amp == "fp16"
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.guard = NonFiniteGuard(train_cfg.nonfinite, self.device, warn)
        # skip mode: a non-finite forward must not leave NaN in BN running stats, so float buffers are
        # snapshotted at each step start and put back when the step is skipped (all on the device)
        skip = train_cfg.nonfinite == "skip"
        self.guarded = [b for b in model.buffers() if b.is_floating_point()] if skip else []
        self.snapshot = [b.clone() for b in self.guarded]
        zero = torch.zeros((), device=self.device)
        self.step_loss, self.loss_sum, self.good_steps = zero.clone(), zero.clone(), zero.clone()

    def begin(self) -> None:
        """At the first micro-batch of a step: remember the buffers a skipped step must restore."""
        if self.guarded:
            torch._foreach_copy_(self.snapshot, self.guarded)

    def forward_backward(self, batch: dict, sync: bool) -> int:
        """One micro-batch; gradients are all-reduced only when `sync` (its step's last). Returns clips."""
        clips = batch["clips"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        if self.cfg.channels_last:
            clips = to_channels_last(clips, self.layout)
        no_sync = nullcontext() if sync or not self.distributed else self.train_model.no_sync()
        with no_sync:
            with autocast(self.device, self.cfg.amp):
                logits = self.train_model(clips)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.optim_cfg.label_smoothing)
            self.scaler.scale(loss / self.cfg.accum_steps).backward()
        self.step_loss += loss.detach()
        return clips.shape[0]

    def update(self, step: int, micro_batches: int) -> None:
        """Optimizer step `step` (0-based) over `micro_batches` accumulated micro-batches: unscale, clip,
        skip a non-finite update on the device (no host sync), schedule, EMA, loss bookkeeping."""
        optimizer = self.optimizer
        if self.fp16:
            self.scaler.unscale_(optimizer)
        if self.optim_cfg.clip_grad > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.optim_cfg.clip_grad)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        bad = ~torch.isfinite(self.step_loss)
        if not self.fp16:  # fp16 overflow of the gradients is GradScaler's business, not an error
            bad |= ~torch.isfinite(grad_norm)
            optimizer.found_inf = (~torch.isfinite(grad_norm)).float()  # fused kernels skip on it
            optimizer.grad_scale = None
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        for b, s in zip(self.guarded, self.snapshot, strict=True):
            b.copy_(torch.where(bad, s, b))
        if self.ema is not None:
            self.ema.update(self.model)
        self.guard.record(bad, step)
        self.loss_sum += torch.where(bad, 0.0, self.step_loss / micro_batches)  # logged over good steps
        self.good_steps += (~bad).float()
        self.step_loss.zero_()

    def take_mean_loss(self) -> float:
        """Mean loss of the good steps since the last call, averaged over ranks (a host sync: log steps)."""
        mean = mean_over_ranks(self.loss_sum / self.good_steps.clamp(min=1))
        self.loss_sum.zero_()
        self.good_steps.zero_()
        return float(mean.item())
