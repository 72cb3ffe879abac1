"""The process group: one process per GPU under torchrun (NCCL), gloo on CPU, and the few collectives
the trainer and the scorer need (gather any object, mean a tensor, agree on a flag)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float = 0) -> DistInfo:
    """One process per GPU under torchrun (NCCL), gloo on CPU; a plain `python train.py` is world 1.

    `timeout_s` > 0 bounds every collective: a rank whose peer hangs or died fails after that long instead
    of waiting until the launcher kills it (0: torch's default)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        kwargs: dict[str, Any] = {"device_id": device} if cuda else {}
        if timeout_s > 0:
            kwargs["timeout"] = timedelta(seconds=timeout_s)
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




# What gloo/NCCL/the store say when the other end of a collective died, hung or was killed
_PEER_LOST = (
    "Connection closed by peer", "Connection reset by peer", "Broken pipe", "timed out", "Timed out",
)  # fmt: skip


def peer_failure(e: BaseException) -> str | None:
    """One line for a collective that failed because another rank failed, was killed or hung (that
    rank's own output says why); None for any other error."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # (the group may be destroyed by now)
        return None
    text = str(e).strip()
    if not (isinstance(e, dist.DistError) or any(m in text for m in _PEER_LOST)):
        return None
    first = text.splitlines()[0] if text else type(e).__name__
    return (
        f"rank {os.environ.get('RANK', '?')}: a collective failed because another rank failed, was killed "
        f"or hung (see that rank's error): {first}"
    )


def exit_on_peer_failure(e: RuntimeError) -> int:
    """The CLIs' handler: exit status 1 with one line when `e` is a collective that failed because
    another rank did; any other RuntimeError is raised again as it is."""
    lost = peer_failure(e)
    if lost is None:
        raise e
    print(f"error: {lost}", file=sys.stderr)
    return 1
