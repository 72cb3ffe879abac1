"""One typed config tree for train.py, evaluate.py and the profiler.

YAML files load strictly into small dataclasses: an unknown key, a wrong type or a missing file is a
`ConfigError` that names the key (with a did-you-mean) or the file. Dotted command-line overrides
(`--optim.lr=0.02`) are applied after the file. Each component receives only its own section
(`build_model(cfg.model)`, `build_loader(cfg.data, ...)`), never the root.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config problem, phrased for the user: names the file and/or the dotted key. `partial`: the config
    with the bad keys left at their defaults (for checks that can still run, e.g. the preflight's)."""

    partial: Config | None = None

    def with_partial(self, cfg: Config) -> ConfigError:
        self.partial = cfg
        return self


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader whose booleans are only true/false (YAML 1.2), so `flip: on` stays the string 'on'."""


_Yaml12Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def yaml_load(text: str):
    """Parse config YAML with YAML 1.2 booleans."""
    return yaml.load(text, Loader=_Yaml12Loader)


# --------------------------------------------------------------------------------------------------
# Sections. Every field is documented where it is declared; README.md's config reference lists them.
# --------------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where clips come from and how they are sampled and augmented (dali_pipes)."""

    root: str = ""  # directory that list paths are relative to ("" = the list file's directory)
    train_list: str = ""  # "path num_frames label" lines (prep.lists output)
    val_list: str = ""  # used for validation during training and by evaluate.py
    source: str = "video"  # video: encoded files; frames: JPEG frame folders (Sth-Sth V1)
    frame_template: str = "{:05d}.jpg"  # file name of frame i inside a frame folder
    frame_start: int = 1  # number of the first frame file (Sth-Sth V1 starts at 00001.jpg)
    device: str = "gpu"  # gpu: NVDEC/nvJPEG + GPU augmentation; cpu: portable CPU route
    cpu_decoder: str = "pyav"  # cpu decoding route: pyav (seeking, any codec) | dali (VP8/VP9/MJPEG)
    trim: str = "on"  # DALI video decoder routes: feed it only the GOPs the sampled frames need (on | off)
    sampling: str = "uniform"  # uniform (TSN segments) | dense (I3D window) | clip3d (CSN clips)
    num_segments: int = 8  # T: frames (or snippets) per clip
    snippet_len: int = 1  # consecutive frames per segment (5 for MSN/TDN)
    dense_window: int = 64  # dense sampling window; stride = dense_window // num_segments
    # dense start range: window (pos = 1 + F - dense_window: TSM, CT-Net, MMAction2) | strides
    # (pos = 1 + F - (dense_window // T) * T: TAM); they differ only when T does not divide the window
    dense_span: str = "window"
    clip_len: int = 32  # clip3d: frames per clip
    frame_interval: int = 2  # clip3d: step between frames
    # dense val start: centre (pos // 2, TAM) | ctnet ((pos - 1) // 2, CT-Net) | random (as train: TSM)
    val_sampling: str = "centre"
    input_size: int = 224  # side of the square crop fed to the model
    scale_size: int = 256  # val/test: resize the short side to this before cropping
    train_crop: str = "multiscale"  # multiscale (TSN 13 positions) | random_resized (CSN)
    crop_scales: list[float] = field(default_factory=lambda: [1.0, 0.875, 0.75, 0.66])  # multiscale sides
    flip: str = "on"  # off | on | pairs (flip and swap labels listed in flip_pairs)
    flip_pairs: str = ""  # file of "a b" label pairs swapped on flip (flip: pairs)
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    dtype: str = "float32"  # output dtype: float32 | float16 | bfloat16
    layout: str = "NTCHW"  # NTCHW (2D models) | NCTHW (3D models)
    batch_size: int = 8  # clips per rank per step (per video in test mode)
    num_threads: int = 4  # DALI CPU threads per pipeline
    num_workers: int = 2  # parallel external-source worker processes (cpu route)
    prefetch: int = 2  # DALI prefetch queue depth
    uneven: str = "pad"  # train: ranks get equal batch counts by padding (pad) or dropping (drop)
    skip_bad: bool = False  # replace an unreadable sample (and count it) instead of raising
    seed: int = 0  # every random choice derives from (seed, epoch, sample id)


@dataclass
class ModelConfig:
    """Which network to build (models.build_model)."""

    name: str = "tsm"  # a key of models.MODELS
    depth: int = 50  # ResNet depth: 18 | 34 | 50 | 101 | 152
    num_classes: int = 400
    num_segments: int = 8  # must match data.num_segments
    dropout: float = 0.5  # before the fc
    pretrained: str = ""  # torchvision-format ImageNet checkpoint or a models.convert output
    partial_bn: bool = False  # freeze all BN layers but the first (TSN); recipes turn it off
    freeze_bn: bool = False  # BN in eval mode without grads (CSN fine-tuning)
    debug: bool = False  # tiny flavour (narrow, shallow) for tests and the CPU demo
    ctnet_freeze: bool = False  # ctnet: train only the CT blocks and the fc (official CT-Net recipe)


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (train.py)."""

    name: str = "sgd"  # sgd | adamw
    lr: float = 0.01  # for the total batch (batch_size * world size * accum_steps)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"  # step | cosine
    lr_steps: list[int] = field(default_factory=lambda: [20, 40])  # step: epochs where lr *= 0.1
    warmup_epochs: float = 0.0  # linear warm-up from 0
    clip_grad: float = 20.0  # max grad norm (0 = off)
    label_smoothing: float = 0.0
    fc_lr_mult: bool = False  # new fc gets 5x (weight) / 10x (bias) lr when fine-tuning
    param_groups: str = "tsn"  # tsn: biases 2x lr no decay, BN no decay | flat: one group (MSN/TDN, CSN)
    ref_batch: int = 0  # lr is quoted for this total batch and scaled linearly to the real one (0: as is)
    lr_decay: float = 0.1  # step schedule: lr *= lr_decay at each of lr_steps
    warmup_start: float = 0.0  # warm-up starts at this fraction of lr (mmaction2 recipes: 0.1)


@dataclass
class TrainConfig:
    """The training run (train.py)."""

    epochs: int = 50
    out_dir: str = "runs/default"  # checkpoints, metrics.jsonl, config.yaml
    amp: str = "bf16"  # bf16 | fp16 | fp32
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    accum_steps: int = 1  # gradient accumulation
    ema: float = 0.0  # weight EMA decay (0 = off)
    ckpt_every: int = 1  # epochs between checkpoints (always one at the end)
    eval_every: int = 1  # epochs between validations (0 = never)
    log_every: int = 20  # steps between log lines (the only host syncs); an epoch without one logs at its end
    nonfinite: str = "stop"  # stop | skip: what a non-finite loss does
    seed: int = 0
    stop_at_step: int = 0  # end this job after this optimizer step with a checkpoint (0: run all epochs)
    keep_ckpts: int = 3  # keep only the newest N ckpt_e*_s*.pt in out_dir (0: keep all; ckpt_best.pt apart)
    best_metric: str = "top1"  # val metric that picks out_dir/ckpt_best.pt: top1 | top5 | mean_class
    best_mode: str = "max"  # max: higher is better | min
    progress: bool = True  # rich progress bar on rank 0 (log lines are printed either way when not a tty)
    threads: int = 0  # torch CPU threads per process (0: torch's default; 1 suits small CPU boxes)
    dist_timeout_s: int = 900  # a collective waiting this long for a hung or dead rank fails (0: torch's)


@dataclass
class EvalConfig:
    """Multi-view testing (evaluate.py and validation during training)."""

    spatial_crops: int = 1  # 1 (centre) | 3 (left/centre/right along the long side)
    temporal_clips: int = 1  # N clips per video
    # auto (by data.sampling: uniform -> centres/twice/uniform for 1/2/N clips, dense -> dense,
    # clip3d -> clip3d) | centres | twice | uniform | uniform_random (N training draws from the seed:
    # MSN/TDN Kinetics) | dense | clip3d; names as in docs/DATA.md
    temporal_mode: str = "auto"
    full_res: bool = False  # crop at scale_size (256) instead of input_size
    fuse: str = "logits"  # average views as logits (TSM family) or softmax (MMAction2, MSN)
    batch_size: int = 8  # videos per rank per step, each with all its views (TAM tests 3x10 with 8)

    def resolved(self, sampling: str) -> EvalConfig:
        """A copy with `temporal_mode: auto` made concrete, so the loader sees a named mode."""
        mode, clips = self.temporal_mode, self.temporal_clips
        if mode == "auto":
            by_clips = {1: "centres", 2: "twice"}
            mode = {"uniform": by_clips.get(clips, "uniform"), "dense": "dense", "clip3d": "clip3d"}[sampling]
        if clips < 1:
            raise ConfigError(f"eval.temporal_clips: must be >= 1, got {clips}")
        fixed = {"centres": 1, "twice": 2}.get(mode)
        if fixed is not None and clips != fixed:
            raise ConfigError(
                f"eval.temporal_mode: '{mode}' gives {fixed} clip(s) but eval.temporal_clips is {clips}"
            )
        return dataclasses.replace(self, temporal_mode=mode)


@dataclass
class Config:
    """The root. Only train.py / evaluate.py see it; components get their section."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------------
# Strict loading
# --------------------------------------------------------------------------------------------------


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# A decimal number in exponent notation without the dot or the exponent sign YAML 1.1 asks for.
_FLOAT_TEXT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints widen to floats, nothing else is converted."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} fits none of {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)  # 1e30, 1.0e30: YAML 1.2 floats that PyYAML (YAML 1.1) leaves as text
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if value is None:
            raise ConfigError(f"{where}: expected a string, got null (write '' for none)")
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    raise ConfigError(f"{where}: unsupported annotation {tp}")


def _build(cls: type, raw: Any, where: str, problems: list[tuple[str, str]] | None = None) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys by name. With `problems`, a bad key
    is recorded there as (dotted key, message) and left at its default, so every problem is found."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{where}.{key}" if where else str(key)
        try:
            if key not in hints:
                raise ConfigError(f"unknown key '{dotted}'{_did_you_mean(str(key), names)}")
            tp = hints[key]
            if dataclasses.is_dataclass(tp) and problems is not None:
                kwargs[key] = _build(tp, value, dotted, problems)
            else:
                kwargs[key] = _coerce(value, tp, dotted)
        except ConfigError as e:
            if problems is None:
                raise
            problems.append((dotted, str(e)))
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """A command-line value is read as YAML, so `0.02`, `true`, `[1, 2]` and `abc` all work."""
    try:
        return yaml_load(text)
    except yaml.YAMLError:
        return text


def _field_type(parts: list[str]) -> Any:
    """The annotation of the dotted field `parts` in Config, or None where no such field exists."""
    tp: Any = Config
    for part in parts:
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


def _override_value(parts: list[str], text: str) -> Any:
    """Parse one override's value; a string field takes the text as written, and empty/null clears it.

    The command line has no types, so `--train.out_dir=2024` means the folder "2024", and
    `--model.pretrained=` (or `=""`, `=null`) means no pretrained file, not a type error.
    """
    value = _parse_scalar(text)
    if _field_type(parts) is str:
        if value is None:
            return ""
        if not isinstance(value, (str, list, dict)):
            return text
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `--a.b=value` (or `a.b=value`) overrides onto the raw mapping, key names checked later."""
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"command line: {item}: an override must look like --section.key=value")
        dotted, value = text.split("=", 1)
        parts = dotted.split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: {item}: '{part}' is not a section")
        node[parts[-1]] = _override_value(parts, value)
    return raw


def build_config(
    raw: dict, overrides: list[str] | None = None, source: str | None = None, origins: dict | None = None
) -> Config:
    """Validate `raw` (read from `source`), then each override; every error names where its value came from.

    A bad key or value in the file names the file (with `base:` inheritance, the file that set it; `origins`
    maps dotted keys to files); one given on the command line names that override (`command line:
    --optim.lrr=1: unknown key 'optim.lrr' ...`), never the file it was not in. All problems are collected
    and raised together as one ConfigError (one line each), whose `partial` is the config without them.
    """
    origins = origins if origins is not None else {}
    errors: list[str] = []
    file_problems: list[tuple[str, str]] = []
    _build(Config, raw, "", file_problems)
    errors += [f"{_origin(origins, key, source)}{msg}" for key, msg in file_problems]
    raw = _without(raw, [key for key, _ in file_problems])
    base = copy.deepcopy(raw)
    applied = []
    for item in overrides or []:
        trial = copy.deepcopy(raw)
        try:
            apply_overrides(trial, [item])
        except ConfigError as e:
            errors.append(str(e))
            continue
        problems: list[tuple[str, str]] = []
        _build(Config, trial, "", problems)
        if problems:
            errors += [f"command line: {item}: {msg}" for _, msg in problems]
            continue
        raw = trial
        applied.append(item)
        origins[_override_key(item)] = "command line"
    cfg = _build(Config, raw, "")
    file_alone = config_problems(_build(Config, base, ""))
    for msg in config_problems(cfg):
        if msg in file_alone or not applied:
            errors.append(f"{_origin(origins, msg.split(' ')[0].rstrip(':'), source)}{msg}")
        else:
            named = [o for o in applied if _override_key(o) in msg]
            errors.append(f"command line: {' '.join(named or applied)}: {msg}")
    if errors:
        raise ConfigError(join_problems(errors, "config")).with_partial(cfg)
    return cfg


def join_problems(problems: list[str], what: str) -> str:
    """One problem: its line; several: a count and one indented line each (reported together, rc 2)."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} {what} problems:\n" + "\n".join(f"  {p}" for p in problems)


def _origin(origins: dict, dotted: str, source: str | None) -> str:
    """'FILE: ' for the file that set `dotted` (or its section), else the top file; '' when none."""
    where = origins.get(dotted) or origins.get(dotted.split(".")[0]) or source
    return f"{where}: " if where else ""


def _override_key(item: str) -> str:
    text = item[2:] if item.startswith("--") else item
    return text.split("=", 1)[0]


def _without(raw: dict, dotted_keys: list[str]) -> dict:
    """A copy of `raw` with the dotted keys (section or section.key) removed."""
    raw = copy.deepcopy(raw)
    for dotted in dotted_keys:
        section, _, key = dotted.partition(".")
        if not key:
            raw.pop(section, None)
        elif isinstance(raw.get(section), dict):
            raw[section].pop(key, None)
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML file (or defaults when `path` is None), apply overrides, validate everything."""
    return load_config_origins(path, overrides)[0]


def load_config_origins(path: str | Path | None, overrides: list[str] | None = None) -> tuple[Config, dict]:
    """`load_config`, and where each value came from: {dotted key: file or "command line"}."""
    raw: dict = {}
    origins: dict[str, str] = {}
    if path is not None:
        raw, origins = read_config_file(Path(path))
    cfg = build_config(raw, list(overrides or []), None if path is None else str(path), origins)
    return cfg, origins


def read_config_file(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str]]:
    """The raw mapping of a config file with its `base:` chain merged in (a section's keys override the
    base's one by one; `base` is relative to the file naming it), and {dotted key: the file that set it}."""
    if not path.is_file():
        names = [q.name for q in path.parent.iterdir()] if path.parent.is_dir() else []
        hint = _did_you_mean(path.name, names)
        if chain:
            raise ConfigError(f"{chain[-1]}: base: {path} not found{hint}")
        raise ConfigError(f"config file not found: {path}{hint}")
    try:
        raw = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = raw.pop("base", None)
    origins = {str(s): str(path) for s in raw}
    origins.update({f"{s}.{k}": str(path) for s, sec in raw.items() if isinstance(sec, dict) for k in sec})
    if base is None:
        return raw, origins
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base: expected the file name of another config, got {base!r}")
    base_path = path.parent / base
    seen = [p.resolve() for p in (*chain, path)]
    if base_path.resolve() in seen:
        loop = [*chain, path][seen.index(base_path.resolve()) :] + [base_path]
        raise ConfigError(f"{path}: base: a cycle: {' -> '.join(str(p) for p in loop)}")
    base_raw, base_origins = read_config_file(base_path, (*chain, path))
    return merge_sections(base_raw, raw), {**base_origins, **origins}


def merge_sections(base: dict, child: dict) -> dict:
    """`child` over `base` section by section: a key the child sets replaces the base's (lists whole)."""
    merged = copy.deepcopy(base)
    for section, keys in child.items():
        if isinstance(keys, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **keys}
        elif keys is not None or section not in merged:
            merged[section] = copy.deepcopy(keys)
    return merged


FUSE_MODES = ("logits", "softmax")  # how a video's views are averaged (engine.scoring.fuse_views)

_CHOICES = {
    "data.source": ("video", "frames"),
    "data.device": ("gpu", "cpu"),
    "data.cpu_decoder": ("pyav", "dali"),
    "data.trim": ("on", "off"),
    "data.sampling": ("uniform", "dense", "clip3d"),
    "data.dense_span": ("window", "strides"),
    "data.val_sampling": ("centre", "ctnet", "random"),
    "data.train_crop": ("multiscale", "random_resized"),
    "data.flip": ("off", "on", "pairs"),
    "data.dtype": ("float32", "float16", "bfloat16"),
    "data.layout": ("NTCHW", "NCTHW"),
    "data.uneven": ("pad", "drop"),
    "optim.name": ("sgd", "adamw"),
    "optim.schedule": ("step", "cosine"),
    "optim.param_groups": ("tsn", "flat"),
    "train.amp": ("bf16", "fp16", "fp32"),
    "train.nonfinite": ("stop", "skip"),
    "train.best_metric": ("top1", "top5", "mean_class"),
    "train.best_mode": ("max", "min"),
    "eval.spatial_crops": (1, 3),
    "eval.temporal_mode": ("auto", "centres", "twice", "uniform", "uniform_random", "dense", "clip3d"),
    "eval.fuse": FUSE_MODES,
}


def check_config(cfg: Config) -> None:
    """Value checks that types cannot express; raises them all together, each naming its key."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(join_problems(problems, "config"))


def config_problems(cfg: Config) -> list[str]:
    """Every failed value check, one message each, starting with the key it is about."""
    problems = []
    for dotted, allowed in _CHOICES.items():
        value = get_dotted(cfg, dotted)
        if value not in allowed:
            problems.append(
                f"{dotted}: {value!r} is not one of {', '.join(map(str, allowed))}"
                + _did_you_mean(str(value), [str(a) for a in allowed])
            )
    if cfg.data.flip == "pairs" and not cfg.data.flip_pairs:
        problems.append("data.flip_pairs: required when data.flip is 'pairs'")
    if not cfg.data.crop_scales or not all(0 < s <= 1 for s in cfg.data.crop_scales):
        scales = cfg.data.crop_scales
        problems.append(f"data.crop_scales: need fractions of the short side in (0, 1], got {scales}")
    if len(cfg.data.mean) != 3 or len(cfg.data.std) != 3:
        problems.append("data.mean / data.std: need 3 values (RGB)")
    if cfg.model.num_segments != cfg.data.num_segments and cfg.data.sampling != "clip3d":
        problems.append(
            f"model.num_segments ({cfg.model.num_segments}) differs from data.num_segments "
            f"({cfg.data.num_segments})"
        )
    if not cfg.train.out_dir.strip():
        raise ConfigError("train.out_dir: empty; name a run directory (not the current one by accident)")
    for dotted in ("data.num_segments", "data.batch_size", "train.epochs", "train.accum_steps",
                   "eval.batch_size"):  # fmt: skip
        if get_dotted(cfg, dotted) < 1:
            problems.append(f"{dotted}: must be >= 1, got {get_dotted(cfg, dotted)}")
    return problems + number_problems(cfg)


# Ranges of numeric fields: (low, high, low included, high included); a value outside, or NaN/inf in any
# float field, is refused at load time, not found by torch ("Invalid learning rate") after the setup.
_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "optim.lr": (0.0, math.inf, False, False),
    "optim.momentum": (0.0, 1.0, True, False),
    "optim.weight_decay": (0.0, math.inf, True, False),
    "optim.warmup_epochs": (0.0, math.inf, True, False),
    "optim.warmup_start": (0.0, 1.0, True, True),
    "optim.clip_grad": (0.0, math.inf, True, False),
    "optim.label_smoothing": (0.0, 1.0, True, False),
    "optim.lr_decay": (0.0, math.inf, False, False),
    "optim.ref_batch": (0.0, math.inf, True, False),
    "model.dropout": (0.0, 1.0, True, False),
    "train.ema": (0.0, 1.0, True, False),
}


def number_problems(cfg: Config) -> list[str]:
    """Every float finite, and the fields of `_RANGES` inside their range; one message per key."""
    problems = [
        f"{dotted}: must be a finite number, got {value}"
        for dotted, value in _float_fields(cfg, "")
        if not math.isfinite(value)
    ]
    for dotted, (low, high, low_in, high_in) in _RANGES.items():
        value = get_dotted(cfg, dotted)
        if not math.isfinite(value):  # said above
            continue
        if not ((low <= value if low_in else low < value) and (value <= high if high_in else value < high)):
            if math.isinf(high):
                span = f"{'>=' if low_in else '>'} {low:g}"
            else:
                span = f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
            problems.append(f"{dotted}: must be {span}, got {value:g}")
    return problems


def _float_fields(node: Any, prefix: str) -> list[tuple[str, float]]:
    """(dotted key, value) of every float in the tree, list items included (data.mean[1])."""
    found = []
    for f in dataclasses.fields(node):
        value, dotted = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            found += _float_fields(value, f"{dotted}.")
        elif isinstance(value, float):
            found.append((dotted, value))
        elif isinstance(value, list):
            found += [(f"{dotted}[{i}]", v) for i, v in enumerate(value) if isinstance(v, float)]
    return found


def get_dotted(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (for YAML dumps and checkpoints)."""
    return dataclasses.asdict(cfg)


def from_dict(raw: dict) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. the copy stored in a checkpoint)."""
    cfg = _build(Config, raw, "")
    check_config(cfg)
    return cfg


def dump_yaml(cfg: Any) -> str:
    """Block-style YAML of a config (run folders' config.yaml, dumps)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def dump_yaml_origins(cfg: Config, origins: dict[str, str]) -> str:
    """`--print-config`: the resolved tree in block style, each value that differs from the default
    followed by a comment naming where it came from (a config file of the `base:` chain, or the command
    line). Still loadable YAML."""
    defaults = Config()
    lines = []
    for section in dataclasses.fields(cfg):
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(getattr(cfg, section.name)):
            dotted = f"{section.name}.{f.name}"
            value = get_dotted(cfg, dotted)
            text = yaml.safe_dump({f.name: value}, sort_keys=False, default_flow_style=False).splitlines()
            if value != get_dotted(defaults, dotted):
                where = origins.get(dotted) or origins.get(section.name) or "?"
                text[0] += f"  # {where}"
            lines += [f"  {line}" for line in text]
    return "\n".join(lines) + "\n"


def print_config_text(path: str | Path | None, overrides: list[str]) -> str:
    """What `--print-config` prints for CONFIG and the overrides."""
    return dump_yaml_origins(*load_config_origins(path, overrides))


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` of every command shows each option's default, except unset ones (None, False, "")
    and those whose help text already names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, "") or "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


def exit_if_help(
    build_parser: typing.Callable[[], argparse.ArgumentParser], argv: list[str] | None = None
) -> None:
    """With -h/--help among the arguments, print the command's help and exit 0. Entry points call it
    before importing torch and DALI (1-2 s quiet, 20-30 s on a loaded machine), so help is instant."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        build_parser().print_help()
        sys.exit(0)


def parse_views(text: str) -> tuple[int, int]:
    """--views '3x10' -> (eval.spatial_crops, eval.temporal_clips)."""
    try:
        crops, clips = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--views: expected CROPSxCLIPS such as 1x1, 3x2 or 3x10, got {text!r}") from None
    return crops, clips


def split_cli(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate dotted overrides (`--a.b=v`) from a script's own arguments."""
    overrides, rest = [], []
    for arg in argv:
        head = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        (overrides if "." in head and "=" in arg else rest).append(arg)
    return overrides, rest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.config", description="Print the resolved config (defaults filled in).",
        epilog="Config keys are overridden with --section.key=value.",
    )  # fmt: skip
    parser.add_argument("config", nargs="?", help="YAML config (none: the defaults)")
    parser.add_argument("--print-config", action="store_true", help="accepted, as train.py's (the default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m engine.config CONFIG [--a.b=v ...]`: print the resolved config."""
    argv = list(sys.argv[1:] if argv is None else argv)
    exit_if_help(build_parser, argv)
    overrides, rest = split_cli(argv)
    rest = [a for a in rest if a != "--print-config"]
    try:
        text = print_config_text(rest[0] if rest else None, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
