"""Stateless helpers beside train.py: process group, parameter groups, LR schedule, EMA, run logging.

train.py reads top-down; everything here is a small function (or a tiny class holding one piece of
state) that train.py calls, so each piece can be tested and changed on its own.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from config import OptimConfig
from fileio import atomic_write_text

# --------------------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """One process per GPU under torchrun (NCCL), gloo on CPU; a plain `python train.py` is world 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        kwargs = {"device_id": device} if cuda else {}
        dist.init_process_group(backend="nccl" if cuda else "gloo", **kwargs)
    return DistInfo(rank, world, local_rank, device)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` on every rank (a one-element list without a process group).

    Tensors inside travel as NumPy arrays and come back as CPU tensors: torch 2.13 fails to unpickle
    tensors received by all_gather_object (storage without dtype)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, _map_leaves(obj, torch.Tensor, lambda t: t.detach().cpu().numpy()))
    return [_map_leaves(o, np.ndarray, torch.from_numpy) for o in out]


def _map_leaves(obj: Any, kind: type, fn: Any) -> Any:
    if isinstance(obj, kind):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_leaves(v, kind, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_leaves(v, kind, fn) for v in obj)
    return obj


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def any_over_ranks(flag: bool, device: torch.device) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# --------------------------------------------------------------------------------------------------
# Optimizer: TSN parameter groups, SGD / AdamW
# --------------------------------------------------------------------------------------------------

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """TSN groups (TSM's get_optim_policies, written from its description): conv/linear weights decay at
    1x lr; their biases 2x lr without decay; norm layers without decay; with `fc_lr_mult` the top-level
    `fc` gets 5x (weight) / 10x (bias). Parameters of other layer types (deformable kernels, fusion
    weights, ...) decay at 1x. `flat` puts everything in one group, which is what the MSN/TDN and
    MMAction2 recipes effectively train with. Only requires_grad parameters are optimised."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.param_groups == "flat":
        return [_group("all", [p for _, p in trainable], 1.0, 1.0)]
    fc = getattr(model, "fc", None)
    fc_ids = {id(p) for p in fc.parameters()} if isinstance(fc, nn.Linear) and cfg.fc_lr_mult else set()
    kind: dict[int, str] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in kind:
                continue
            if id(p) in fc_ids:
                kind[id(p)] = "fc_weight" if name == "weight" else "fc_bias"
            elif isinstance(module, _NORMS):
                kind[id(p)] = "norm"
            elif isinstance(module, (*_CONVS, nn.Linear)):
                kind[id(p)] = "weight" if name == "weight" else "bias"
            else:
                kind[id(p)] = "other"
    spec = {  # name: (lr_mult, decay_mult)
        "weight": (1.0, 1.0),
        "bias": (2.0, 0.0),
        "norm": (1.0, 0.0),
        "other": (1.0, 1.0),
        "fc_weight": (5.0, 1.0),
        "fc_bias": (10.0, 0.0),
    }
    groups = []
    for name, (lr_mult, decay_mult) in spec.items():
        params = [p for _, p in trainable if kind[id(p)] == name]
        if params:
            groups.append(_group(name, params, lr_mult, decay_mult))
    return groups


def _group(name: str, params: list[nn.Parameter], lr_mult: float, decay_mult: float) -> dict:
    return {"name": name, "params": params, "lr_mult": lr_mult, "decay_mult": decay_mult}


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over `param_groups`, fused kernels (CPU and CUDA).

    Fused optimizers honour a `found_inf` tensor on the device, which is how train.py skips the update
    of a non-finite step without a host sync."""
    groups = param_groups(model, cfg)
    for g in groups:
        g["lr"] = lr * g["lr_mult"]
        g["weight_decay"] = cfg.weight_decay * g["decay_mult"]
    if cfg.name == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, fused=True)
        if cfg.momentum > 0:  # explicit zero buffers: same maths as the first step, and a skipped first
            for g in groups:  # step cannot leave uninitialised buffers behind
                for p in g["params"]:
                    opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return opt
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.momentum, 0.999), fused=True)


def scaled_lr(cfg: OptimConfig, total_batch: int) -> float:
    """Linear scaling rule: `lr` is quoted for `ref_batch` clips per step (0 = use it as given)."""
    return cfg.lr * total_batch / cfg.ref_batch if cfg.ref_batch > 0 else cfg.lr


def lr_factor(step: int, steps_per_epoch: int, epochs: int, cfg: OptimConfig) -> float:
    """Multiplier of the base lr before optimizer step `step` (0-based), updated every step.

    Linear warm-up from `warmup_start` to 1 over `warmup_epochs`; then `step` multiplies by `lr_decay` at
    each epoch in `lr_steps`, or `cosine` anneals to 0 at the end of the last epoch."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return cfg.warmup_start + (1.0 - cfg.warmup_start) * (step + 1) / warmup
    if cfg.schedule == "step":
        epoch = step / steps_per_epoch
        return cfg.lr_decay ** sum(epoch >= m for m in cfg.lr_steps)
    total = max(epochs * steps_per_epoch - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / total))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps_per_epoch, epochs, cfg))


# --------------------------------------------------------------------------------------------------
# Model helpers
# --------------------------------------------------------------------------------------------------


def to_channels_last(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Channels-last input: NCTHW gets channels_last_3d; an NTCHW clip is stored as N,T,H,W,C so that the
    model's fold to (N*T, C, H, W) is already a channels_last 4D tensor (a view, no copy)."""
    if layout == "NCTHW":
        return x.contiguous(memory_format=torch.channels_last_3d)
    if x.dim() == 5:
        return x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    return x


def model_channels_last(model: nn.Module) -> nn.Module:
    """Channels-last weights: 4D tensors get channels_last and 5D ones channels_last_3d (a 2D model may
    hold Conv3d layers, e.g. CT-Net, which `Module.to(memory_format=...)` refuses). Before the optimizer."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.dim() in (4, 5):
            fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
            t.data = t.data.contiguous(memory_format=fmt)
    return model


def all_finite(module: nn.Module) -> bool:
    """True when every floating parameter and buffer is finite (one host sync; checkpoint time only)."""
    flags = [torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(flags).all().item()) if flags else True


class ModelEMA:
    """Exponential moving average of the weights (a frozen copy of the model, updated after each step)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if e.is_floating_point():
                e.lerp_(m, 1.0 - self.decay)
            else:
                e.copy_(m)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


# --------------------------------------------------------------------------------------------------
# Provenance and logging (rank 0)
# --------------------------------------------------------------------------------------------------


def provenance(info: DistInfo) -> dict:
    """Where a run came from: code version, library versions and devices."""
    repo = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
            return out.stdout.strip() if out.returncode == 0 else ""
        except (OSError, subprocess.SubprocessError):
            return ""

    try:
        import nvidia.dali as dali

        dali_version = dali.__version__
    except ImportError:
        dali_version = "not installed"
    if info.device.type == "cuda":
        devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        devices = [f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"]
    return {
        "git_sha": git("rev-parse", "HEAD") or "unknown",
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "dali": dali_version,
        "cuda": torch.version.cuda or "none",
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "devices": devices,
        "world_size": info.world_size,
        "host": socket.gethostname(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class MetricsLog:
    """metrics.jsonl (one JSON object per line, flushed) and TensorBoard when it is installed."""

    def __init__(self, out_dir: Path, resume_step: int | None) -> None:
        self.path = out_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self.file = self.path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"))
        except ImportError:
            self.tb = None

    def _truncate_after(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: drop their old records (atomically)."""
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if rec.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(self.path, "".join(f"{line}\n" for line in keep))

    def write(self, kind: str, step: int, **values: Any) -> None:
        self.file.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
