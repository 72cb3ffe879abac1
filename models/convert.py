"""Import checkpoints published by the official code bases into our models (docs/CHECKPOINTS.md).

    python -m models.convert SRC DST --from torchvision|tsm|tam|ctnet|msn|tdn|mmaction --model NAME
        [--depth 50] [--num-classes N] [--num-segments 8]

Each official layout differs from ours only in names (prefixes such as `module.base_model.`, wrapper
modules such as TSM's `.net` or MMAction2's ConvModule `.conv`/`.bn`), so a conversion is an ordered list
of regex renames per source (plus one lossless reshape: CT-Net's separable Conv3d kernels onto our equal
Conv2d ones). The renamed dict must cover our model exactly, tensor for tensor and shape for shape;
anything else is refused with the unmatched keys of both sides, because a partially loaded network still
runs and silently gives wrong scores. Only a torchvision file loses keys on purpose: its ImageNet
classifier (`UNUSED`) and the 3x3 convs that CT blocks replace (`pretrained_ignore`), all reported.

The output is {"model": state_dict, "meta": {...}} written atomically; `evaluate.py --checkpoint` and
`model.pretrained` read it through the "model" key. `--from torchvision` gives a trunk-only file in the
same container, keys named as torchvision's (meta.backbone_only), which `model.pretrained` loads into
`model.backbone`.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from engine.config import DefaultsHelpFormatter, ModelConfig, exit_if_help

SOURCES = ("torchvision", "tsm", "tam", "ctnet", "msn", "tdn", "mmaction")


def build_parser() -> argparse.ArgumentParser:
    """The command line, defined before torch loads so that `--help` needs none."""
    p = argparse.ArgumentParser(
        prog="python -m models.convert",
        description="Convert an official checkpoint (TSM, TAM, CT-Net, MSN, TDN, MMAction2, torchvision) "
        "into this package's layout. See docs/CHECKPOINTS.md.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("src", help="official checkpoint (.pth, .pth.tar)")
    p.add_argument("dst", help="output file ({'model', 'meta'}), written atomically")
    p.add_argument("--from", dest="source", required=True, choices=SOURCES, help="which code base wrote SRC")
    p.add_argument("--model", required=True, help="our model name (a key of models.MODELS)")
    p.add_argument("--depth", type=int, default=50, help="ResNet depth (default 50)")
    p.add_argument("--num-classes", type=int, default=None, help="default: read off the classifier in SRC")
    p.add_argument("--num-segments", type=int, default=8, help="segments T the model was trained with")
    p.add_argument("--debug", action="store_true", help="our tiny debug flavour (tests)")
    p.add_argument(
        "--trust",
        action="store_true",
        help="accepted and ignored: every file is read the same restricted way (nothing in it runs; "
        "Python objects beside the tensors become inert stand-ins), so no file needs trusting",
    )
    return p


if __name__ == "__main__":
    exit_if_help(build_parser)

import torch
from torch import nn

from engine.checkpoint import save_checkpoint
from engine.safe_load import SafeLoadError, safe_load

Rule = tuple[str, str]  # (regex, replacement) applied with re.sub, in order

# Which of our models each source publishes weights for.
SOURCE_MODELS: dict[str, tuple[str, ...]] = {
    "torchvision": ("tsn", "tsm", "tam", "ctnet", "msn", "tdn"),
    "tsm": ("tsn", "tsm"),
    "tam": ("tam",),
    "ctnet": ("ctnet",),
    "msn": ("msn",),
    "tdn": ("tdn",),
    "mmaction": ("tsn", "tsm", "tam", "ir_csn", "ip_csn"),
}

BLOCK = r"(layer\d+\.\d+)"  # one residual block, e.g. layer3.5

# The TSN wrapper shared by TSM, TAM, CT-Net, MSN and TDN (ops/models.py): the network is `base_model`,
# the classifier `new_fc` (or base_model.fc when they trained with dropout 0).
TSN_WRAPPER: list[Rule] = [
    (r"^new_fc\.", "fc."),
    (r"^base_model\.fc\.", "fc."),
    (r"^base_model\.", "backbone."),
]

# TSM's TemporalShift keeps the wrapped module as `.net` (on conv1 for "blockres", on the whole block for
# "block"); the shift itself has no parameters.
SHIFT_WRAPPER: list[Rule] = [(r"\.net\.", ".")]

# TAM's TemporalBottleneck: the ResNet block moves to `.net`, the TAM sits beside it as `.tam`.
TAM_BLOCK: list[Rule] = [
    (rf"^backbone\.{BLOCK}\.net\.", r"backbone.\1."),
    (rf"^backbone\.{BLOCK}\.tam\.", r"backbone.\1.temporal."),
]

# CT-Net's ReshapeBlock: conv1/bn1 and conv3/bn3 in Sequentials, the interaction as conv2.
CT_BLOCK: list[Rule] = [
    (rf"^backbone\.{BLOCK}\.conv1\.0\.", r"backbone.\1.conv1."),
    (rf"^backbone\.{BLOCK}\.conv1\.1\.", r"backbone.\1.bn1."),
    (rf"^backbone\.{BLOCK}\.conv3\.0\.", r"backbone.\1.conv3."),
    (rf"^backbone\.{BLOCK}\.conv3\.1\.", r"backbone.\1.bn3."),
    (
        rf"^backbone\.{BLOCK}\.conv2\.(?=conv1_|conv2_|fusion\.|[stc][xy]_attention\.)",
        r"backbone.\1.temporal.",
    ),
    # inside the interaction (official ReshapeInteraction -> our CTInteraction): stage 1 groups by x,
    # stage 2 by y; the attentions' second conv is a bare conv in ours, a 1-element Sequential there.
    (r"\.temporal\.conv1_x\.", ".temporal.stage1.spatial."),
    (r"\.temporal\.conv1_z\.", ".temporal.stage1.temporal."),
    (r"\.temporal\.conv2_y\.", ".temporal.stage2.spatial."),
    (r"\.temporal\.conv2_z\.", ".temporal.stage2.temporal."),
    (r"\.temporal\.([stc])x_attention\.", r".temporal.stage1.\1_attention."),
    (r"\.temporal\.([stc])y_attention\.", r".temporal.stage2.\1_attention."),
    (r"\.s_attention\.", ".spatial_attention."),
    (r"\.t_attention\.", ".temporal_attention."),
    (r"\.c_attention\.", ".channel_attention."),
    (r"_attention\.fc2\.0\.", "_attention.fc2."),
]

# TDN_Net / MSN_Net (inside the TSN wrapper): the trunk's stages are `layerK_bak`, the second ResNet's
# layer1 `resnext_layer1`; the block modules sit beside the ResNet layers of a block; the learnable shift
# is a Conv1d kept as `shift.conv`. Ours: one ResNet with `temporal.{mse|motion, shift}` in each block.
DIFFERENCE_NET: list[Rule] = [
    (r"^backbone\.layer(\d)_bak\.", r"backbone.layer\1."),
    (r"^backbone\.resnext_layer1\.", "backbone.diff_layer1."),
    (r"^backbone\.conv1_temp\.", "backbone.unused.conv1_temp."),  # registered, never run (kept)
    (rf"^backbone\.{BLOCK}\.shift\.conv\.", r"backbone.\1.temporal.shift."),
    (rf"^backbone\.{BLOCK}\.mse\.", r"backbone.\1.temporal.mse."),
    (rf"^backbone\.{BLOCK}\.motion_layer\.", r"backbone.\1.temporal.motion."),
]
TDN_STEM: list[Rule] = [(r"^backbone\.conv1_5\.", "backbone.difference_stem.conv.")]
MSN_STEM: list[Rule] = [
    (r"^backbone\.(conv_1|conv_2|conv_diff_1|conv_diff_2)\.", r"backbone.difference_stem.\1."),
    (r"^backbone\.conv1_5\.", "backbone.unused.conv1_5."),  # TDN's stem, built but unused by MSN (kept)
]

# MMAction2 recognisers: `backbone.` + `cls_head.fc_cls.`; every conv+BN pair an mmcv ConvModule.
MMACTION_HEAD: list[Rule] = [(r"^cls_head\.fc_cls\.", "fc.")]
MMACTION_2D: list[Rule] = [
    (r"\.block\.", "."),  # TANet's TABlock keeps the ResNet block as `.block`
    (r"\.net\.", "."),  # TSM: the shift wraps conv1's conv inside the ConvModule (or, "block", the block)
    (r"^backbone\.conv1\.conv\.", "backbone.conv1."),
    (r"^backbone\.conv1\.bn\.", "backbone.bn1."),
    (rf"^backbone\.{BLOCK}\.downsample\.conv\.", r"backbone.\1.downsample.0."),
    (rf"^backbone\.{BLOCK}\.downsample\.bn\.", r"backbone.\1.downsample.1."),
    (rf"^backbone\.{BLOCK}\.conv(\d)\.conv\.", r"backbone.\1.conv\2."),
    (rf"^backbone\.{BLOCK}\.conv(\d)\.bn\.", r"backbone.\1.bn\2."),
    (rf"^backbone\.{BLOCK}\.tam\.", r"backbone.\1.temporal."),
]


def rules_for(source: str, model: str) -> list[Rule]:
    """The ordered renames that take `source`'s names (without `module.`) to ours for `model`."""
    if source == "torchvision":
        return []  # our trunk uses torchvision's names
    if source == "tsm":
        return TSN_WRAPPER + SHIFT_WRAPPER
    if source == "tam":
        return TSN_WRAPPER + TAM_BLOCK
    if source == "ctnet":
        return TSN_WRAPPER + CT_BLOCK
    if source == "tdn":
        return TSN_WRAPPER + DIFFERENCE_NET + TDN_STEM
    if source == "msn":
        return TSN_WRAPPER + DIFFERENCE_NET + MSN_STEM
    if source == "mmaction":
        # our CSN already uses MMAction2's ResNet3dCSN names; only the head moves
        return MMACTION_HEAD if model in ("ir_csn", "ip_csn") else MMACTION_HEAD + MMACTION_2D
    raise ConvertError(f"--from {source}: no mapping onto --model {model}")


def squeeze_conv3d_kernel(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """CT-Net's separable Conv3d kernels as our equal Conv2d ones (models/temporal/ctnet.py): a 1xKxK
    kernel (O, I, 1, K, K) is a KxK conv on frames -> (O, I, K, K); a Kx1x1 kernel (O, I, K, 1, 1) is a
    (K, 1) conv over (T, H*W) -> (O, I, K, 1). Anything else is left for the shape check to refuse."""
    if tensor.ndim != 5 or len(shape) != 4:
        return None
    o, i, kt, kh, kw = tensor.shape
    if kt == 1 and (o, i, kh, kw) == tuple(shape):
        return tensor.reshape(shape)
    if (kh, kw) == (1, 1) and (o, i, kt, 1) == tuple(shape):
        return tensor.reshape(shape)
    return None


# Per-source tensor fixes tried when an official tensor's shape differs from ours (same values, other view).
RESHAPES = {"ctnet": squeeze_conv3d_kernel}


# Official keys with no counterpart in our model by design (dropped, printed and kept in meta.dropped).
UNUSED: dict[str, tuple[str, ...]] = {
    "torchvision": (r"^fc\.",),  # the ImageNet classifier: the video model has its own fc
}


class ConvertError(Exception):
    """A user-facing failure: the message names the file or key and why."""


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of an official checkpoint, whatever container it comes in (see docs/CHECKPOINTS.md),
    and the names of the Python objects in the file that were read as inert stand-ins.

    Read through engine/safe_load.py: a downloaded file never runs code, and the trainer objects that
    official files carry beside the weights (argparse args, mmengine's message hub) load as stand-ins.
    """
    path = Path(path)
    try:
        loaded = safe_load(path)
    except SafeLoadError as e:
        raise ConvertError(str(e)) from None
    return unwrap_container(loaded.obj, path, loaded.foreign_note()), list(dict.fromkeys(loaded.foreign))


def unwrap_container(obj: object, path: Path, note: str = "") -> dict[str, torch.Tensor]:
    """{'state_dict': sd, ...} (official trainers, MMAction2), {'model': sd, ...} (ours) or a bare sd.
    `note` (what the file referred to, read as stand-ins) is added to the refusals."""
    if not isinstance(obj, dict):
        found = f"{type(obj).__module__}.{type(obj).__qualname__}"
        raise ConvertError(f"{path}: expected a dict of tensors, found {found}{note}")
    for container in ("state_dict", "model"):
        inner = obj.get(container)
        if isinstance(inner, dict) and inner:
            obj = inner
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors or len(tensors) != len(obj):
        others = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))[:10]
        raise ConvertError(
            f"{path}: no state dict found (looked for 'state_dict', 'model' or a bare dict of tensors; "
            f"non-tensor entries: {others}){note}"
        )
    return {str(k): v for k, v in tensors.items()}


# --------------------------------------------------------------------------------------------------
# mapping
# --------------------------------------------------------------------------------------------------


def rename(key: str, rules: Sequence[Rule]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def convert_state_dict(
    official: dict[str, torch.Tensor],
    source: str,
    model: str,
    target: dict[str, torch.Tensor],
    optional: Sequence[str] = (),
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename `official` onto `target`'s keys; check coverage and shapes. Returns (ours, dropped keys).

    target: our model's state_dict (meta tensors are fine: only names and shapes are read).
    optional: prefixes of our keys that may stay unfilled (the temporal modules and fc for torchvision).
    num_batches_tracked is optional on both sides (PyTorch < 0.4.1 did not save it).
    """
    # nn.DataParallel / DistributedDataParallel prefix every key with `module.` (all official trainers)
    rules = [(r"^module\.", "")] + rules_for(source, model)
    unused = [re.compile(p) for p in UNUSED.get(source, ())]
    ours: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    dropped: list[str] = []
    extra: list[str] = []  # official keys whose renamed key our model lacks
    for key, tensor in official.items():
        if any(p.search(key.removeprefix("module.")) for p in unused):
            dropped.append(key)
            continue
        new = rename(key, rules)
        if new not in target:
            if key.endswith("num_batches_tracked"):
                dropped.append(key)
            else:
                extra.append(f"{key} -> {new}" if new != key else key)
            continue
        if new in ours:
            raise ConvertError(f"official keys {origin[new]!r} and {key!r} both map to our {new!r}")
        ours[new] = tensor
        origin[new] = key
    missing = [
        k
        for k in target
        if k not in ours and not k.endswith("num_batches_tracked") and not k.startswith(tuple(optional))
    ]
    if extra or missing:
        raise ConvertError(unmatched_message(source, model, extra, missing))
    fix = RESHAPES.get(source)
    bad = []
    for k, v in ours.items():
        if tuple(v.shape) == tuple(target[k].shape):
            continue
        fixed = fix(v, target[k].shape) if fix else None
        if fixed is None:
            bad.append(f"{origin[k]} {tuple(v.shape)} -> {k} {tuple(target[k].shape)}")
        else:
            ours[k] = fixed
    if bad:
        raise ConvertError(
            f"--from {source} --model {model}: {len(bad)} shape mismatch(es) (official -> ours; check "
            f"--depth/--num-classes/--num-segments); nothing written:\n" + listing(bad)
        )
    for k in target:  # buffers the official file did not save
        if k.endswith("num_batches_tracked") and k not in ours and not k.startswith(tuple(optional)):
            ours[k] = torch.zeros((), dtype=torch.long)
    return ours, dropped


def listing(keys: list[str], limit: int = 40) -> str:
    shown = "\n  ".join(keys[:limit])
    more = f"\n  ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"  {shown}{more}"


def unmatched_message(source: str, model: str, extra: list[str], missing: list[str]) -> str:
    parts = [f"--from {source} --model {model}: the checkpoint does not match our model; nothing written."]
    if extra:
        parts.append(f"{len(extra)} official key(s) with no place in our model (official -> renamed):")
        parts.append(listing(extra))
    if missing:
        parts.append(f"{len(missing)} key(s) of our model that no official key fills:")
        parts.append(listing(missing))
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------
# our side
# --------------------------------------------------------------------------------------------------


def target_model(cfg: ModelConfig) -> nn.Module:
    """Our model for `cfg`, built on the meta device (names and shapes only, no memory, no init time)."""
    from models import build_model

    with torch.device("meta"):
        return build_model(cfg)


def optional_prefixes(module: nn.Module) -> list[str]:
    """Keys an ImageNet (torchvision) import leaves at their init, by the rule load_pretrained applies:
    the blocks' temporal modules and modules marked `pretrained_new` (MSN/TDN difference stems)."""
    return [
        f"{name}."
        for name, m in module.named_modules()
        if name and (name.split(".")[-1] == "temporal" or getattr(m, "pretrained_new", False))
    ]


def ignored_official_keys(module: nn.Module) -> list[str]:
    """ImageNet keys that our blocks drop on purpose (`block.pretrained_ignore`, e.g. CT-Net's conv2)."""
    return [f"{name}.{p}" for name, m in module.named_modules() for p in getattr(m, "pretrained_ignore", ())]


def check_shift_placement(official: dict[str, torch.Tensor], net: nn.Module, source: str, model: str) -> None:
    """TSM's shift has no parameters, so only its wrappers tell where it was: the blocks whose conv1 is
    wrapped (`.conv1.net.`, MMAction2 `.conv1.conv.net.`) must be exactly the blocks our model shifts.
    Otherwise a TSN file would load into TSM (or the reverse) and silently compute something else."""
    if model not in ("tsm", "tsn") or source not in ("tsm", "mmaction"):
        return
    keys = [k.removeprefix("module.") for k in official]
    if any(re.search(r"layer\d+\.\d+\.net\.", k) for k in keys):
        raise ConvertError(
            "the checkpoint shifts whole blocks (shift_place='block', keys 'layerL.B.net.*'); our TSM shifts "
            "the residual branch only (shift_place='blockres'), a different network"
        )
    theirs = {m.group(1) for k in keys if (m := re.search(r"(layer\d+\.\d+)\.conv1\.(?:conv\.)?net\.", k))}
    ours = {
        name.removeprefix("backbone.").removesuffix(".temporal")
        for name, _ in net.named_modules()
        if name.endswith(".temporal")
    }
    if theirs != ours:
        hint = "a TSM checkpoint: use --model tsm" if theirs and not ours else ""
        hint = hint or ("a TSN checkpoint (no shift): use --model tsn" if ours and not theirs else "")
        hint = hint or "check --depth (the shift is on every other block for ResNet-101/152)"
        raise ConvertError(
            f"temporal shift placement differs: the checkpoint shifts {len(theirs)} blocks, --model {model} "
            f"{len(ours)} (only in the checkpoint: {sorted(theirs - ours)[:6]}, only ours: "
            f"{sorted(ours - theirs)[:6]}); this looks like {hint}"
        )


def infer_num_classes(official: dict[str, torch.Tensor], source: str, model: str) -> int:
    rules = [(r"^module\.", "")] + rules_for(source, model)
    for key, tensor in official.items():
        if rename(key, rules) == "fc.weight" and tensor.ndim == 2:
            return int(tensor.shape[0])
    raise ConvertError(f"--from {source}: found no classifier weight in the checkpoint; pass --num-classes")


def convert_file(
    src: str | Path,
    dst: str | Path,
    source: str,
    model: str,
    depth: int = 50,
    num_classes: int | None = None,
    num_segments: int = 8,
    debug: bool = False,
) -> dict:
    """Convert SRC into DST; returns the written checkpoint dict. Raises ConvertError on user errors."""
    if source not in SOURCES:
        raise ConvertError(f"--from {source}: unknown source (one of {', '.join(SOURCES)})")
    if model not in SOURCE_MODELS[source]:
        raise ConvertError(
            f"--from {source} publishes weights for --model {' | '.join(SOURCE_MODELS[source])}, "
            f"not {model!r}"
        )
    src, dst = Path(src), Path(dst)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise ConvertError(f"{dst}: DST is the source file; refusing to overwrite it")
    official, stand_ins = read_state_dict(src)
    if source == "torchvision":
        num_classes = num_classes or 1  # our fc is not imported; any width builds the backbone
    elif num_classes is None:
        num_classes = infer_num_classes(official, source, model)
    cfg = ModelConfig(
        name=model, depth=depth, num_classes=num_classes, num_segments=num_segments, debug=debug
    )
    try:
        net = target_model(cfg)
    except (ValueError, KeyError) as e:
        raise ConvertError(f"cannot build --model {model} --depth {depth}: {e}") from None
    # An ImageNet file becomes a torchvision-named trunk checkpoint: load_pretrained puts such a file
    # into model.backbone and leaves the temporal modules and fc at their init.
    module = net.backbone if source == "torchvision" else net
    ignore, optional = [], []
    if source == "torchvision":
        prefixes, optional = tuple(ignored_official_keys(module)), optional_prefixes(module)
        ignore = [k for k in official if k.startswith(prefixes)]
        official = {k: v for k, v in official.items() if not k.startswith(prefixes)}
        if hasattr(module, "imagenet_state"):  # MSN/TDN: second layer1, zero conv biases, ... from ImageNet
            official = module.imagenet_state(official)
    try:
        check_shift_placement(official, net, source, model)
        ours, dropped = convert_state_dict(official, source, model, module.state_dict(), optional)
    except ConvertError as e:
        raise ConvertError(f"{src}: {e}") from None
    meta = {
        "source": source,
        "model": model,
        "depth": depth,
        "num_classes": num_classes,
        "num_segments": num_segments,
        "src": str(src),
        "dropped": sorted(dropped + ignore),
        "stand_ins": stand_ins,  # Python objects of SRC read as inert stand-ins (never run, not converted)
    }
    if source == "torchvision":
        meta["backbone_only"] = True
        del meta["num_classes"]
    leftover = [k for k, v in ours.items() if v.is_meta]
    if leftover:  # a bug in a model's imagenet_state, never a user error: do not write a hollow file
        raise RuntimeError(f"internal error: no values for {leftover[:5]}")
    state = {"model": ours, "meta": meta}
    try:
        save_checkpoint(dst, state)
    except OSError as e:
        raise ConvertError(f"{dst}: cannot write ({e.strerror or e})") from None
    return state


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.trust:
        print("--trust is no longer needed and is ignored: every file is read the same restricted way")
    try:
        state = convert_file(
            args.src,
            args.dst,
            args.source,
            args.model,
            args.depth,
            args.num_classes,
            args.num_segments,
            args.debug,
        )
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stand_ins = state["meta"]["stand_ins"]
    if stand_ins:
        shown = ", ".join(stand_ins[:5]) + (f", ... {len(stand_ins) - 5} more" if len(stand_ins) > 5 else "")
        print(f"{args.src}: read {len(stand_ins)} Python name(s) as inert stand-ins, none run: {shown}")
    dropped = state["meta"]["dropped"]
    if dropped:
        print(f"dropped {len(dropped)} key(s) with no counterpart by design:\n" + listing(dropped, limit=10))
    print(f"wrote {args.dst}: {len(state['model'])} tensors, --model {args.model} from {args.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
