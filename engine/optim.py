"""Optimizer and LR schedule: TSN parameter groups, SGD / AdamW, linear scaling, warm-up then step or
cosine decay (updated every step), and the EMA of the weights."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from engine.config import OptimConfig

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

