"""Mixed precision in one place: the `train.amp` names and the autocast context they mean.

bf16 is the default (no loss scaling needed); fp16 also needs a GradScaler, which the trainer enables
only for it; fp32 runs without autocast."""

from __future__ import annotations

import contextlib

import torch

AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """torch.autocast for bf16/fp16 on `device`; a no-op context for fp32."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    dtype = AMP_DTYPES[amp]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
