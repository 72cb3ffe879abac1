"""`python -m models.summary`: parameters and GMACs of every model in `MODELS` at full size.

MACs are counted with forward hooks: every Conv1d/2d/3d and Linear layer contributes
output elements x (input channels / groups) x kernel volume (x in_features for Linear), and a module
with an `extra_macs(input, output)` method adds what it computes outside such layers (TAM's
per-clip temporal conv). Norms, activations, pooling and element-wise products are not counted, which
is how the published GFLOPs figures were taken. The forward runs on the meta device (no memory,
no arithmetic), falling back to the CPU for a model that cannot run there. One clip: 8 segments at
224x224 for 2D models (5-frame snippets for MSN/TDN), 32 frames for 3D models.
"""

from __future__ import annotations

import argparse
import math
import sys

from engine.config import DefaultsHelpFormatter, ModelConfig, exit_if_help


def build_parser() -> argparse.ArgumentParser:
    """The command line, defined before torch loads so that `--help` needs none."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--depth", type=int, default=50, help="ResNet depth for every model (default 50)")
    parser.add_argument("--models", nargs="*", help="subset of the keys of models.MODELS (default: all)")
    return parser


if __name__ == "__main__":
    exit_if_help(build_parser)

import torch
from torch import nn

from models import MODELS

# (name, depth) -> (params at 400 classes, params at 174 classes, GMACs per clip), from models.md.
REFERENCE: dict[tuple[str, int], tuple[int | None, int | None, float | None]] = {
    ("tsn", 50): (24_327_632, 23_864_558, 32.70),
    ("tsm", 50): (24_327_632, 23_864_558, 32.70),
    ("ctnet", 50): (21_422_224, 20_959_150, 28.36),
    ("tam", 50): (25_590_320, 25_127_246, 32.76),
    ("msn", 50): (31_480_836, 31_017_762, 58.0),
    ("tdn", 50): (24_883_120, 24_420_046, 35.64),
    ("ir_csn", 50): (13_131_152, None, 42.31),
    ("ip_csn", 50): (14_396_176, None, None),
    ("ir_csn", 152): (29_703_568, None, 74.05),
    ("ip_csn", 152): (33_016_592, None, 83.29),
}
CLIP_FRAMES_3D = 32


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass of `model` on `x` (see the module docstring)."""
    total = 0

    def hook(m: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            total += out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        elif isinstance(m, nn.Linear):
            total += out.numel() * m.in_features
        if hasattr(m, "extra_macs"):
            total += int(m.extra_macs(inputs[0], out))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return total


def example_input(model: nn.Module, cfg: ModelConfig, size: int = 224) -> torch.Tensor:
    """One clip in the model's layout, as the reference figures were measured."""
    device = next(model.parameters()).device
    if model.layout == "NCTHW":
        return torch.empty(1, 3, CLIP_FRAMES_3D, size, size, device=device)
    return torch.empty(1, cfg.num_segments * model.snippet_len, 3, size, size, device=device)


def measure(cfg: ModelConfig) -> tuple[int, float]:
    """(parameters, GMACs per clip) of the model `cfg` describes."""
    try:
        with torch.device("meta"):
            model = MODELS[cfg.name](cfg)
            return count_params(model), count_macs(model, example_input(model, cfg)) / 1e9
    except (NotImplementedError, RuntimeError):  # an op without a meta kernel: run it for real
        model = MODELS[cfg.name](cfg)
        return count_params(model), count_macs(model, example_input(model, cfg).normal_()) / 1e9


def summary_rows(depth: int = 50, names: list[str] | None = None) -> list[dict]:
    rows = []
    for name in names or list(MODELS):
        params = {}
        for classes in (400, 174):
            params[classes], gmacs = measure(ModelConfig(name=name, depth=depth, num_classes=classes))
        ref = REFERENCE.get((name, depth), (None, None, None))
        rows.append(dict(name=name, depth=depth, p400=params[400], p174=params[174], gmacs=gmacs, ref=ref))
    return rows


def _fmt(value: int | float | None, spec: str) -> str:
    if value is None:
        return "-"
    return f"{value:{spec[:-1]}}%" if spec.endswith("%") else format(value, spec)


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'model':<8} {'depth':>5} {'params (400)':>13} {'ref':>13} {'params (174)':>13} {'ref':>13} "
        f"{'GMACs':>7} {'ref':>6} {'diff':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        p400, p174, g = r["ref"]
        diff = None if g is None else 100 * (r["gmacs"] - g) / g
        lines.append(
            f"{r['name']:<8} {r['depth']:>5} {r['p400']:>13,} {_fmt(p400, ',d'):>13} {r['p174']:>13,} "
            f"{_fmt(p174, ',d'):>13} {r['gmacs']:>7.2f} {_fmt(g, '.2f'):>6} {_fmt(diff, '+.1f%'):>6}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models or []) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    print(format_table(summary_rows(args.depth, args.models)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
