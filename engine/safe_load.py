"""The one reader of checkpoint files: no code from a checkpoint, ever.

A checkpoint is a pickle (inside a torch.save zip archive, or a legacy pre-1.6 stream), and unpickling
calls whatever callables the file names. Every loader here (train.py --resume, model.pretrained,
evaluate.py, predict, models.convert) reads through `safe_load`, whose unpickler resolves names against an
explicit allowlist of data constructors (torch's tensor/storage rebuilders, dtypes, OrderedDict, NumPy
array/dtype/scalar reconstruction, plain containers) and imports nothing. Every other name, `os.system`
and `builtins.exec` as much as mmengine's ConfigDict or argparse.Namespace, becomes an inert stand-in: a
class named like the original whose instances only keep the arguments and state the file gave them, so
official checkpoints that pickle their trainer's objects beside the weights still load, and nothing in
them runs. TorchScript archives (which hold code) are refused.

This module imports nothing of the project, so both engine/ and models/ read through it.
"""

from __future__ import annotations

import _compat_pickle
import collections
import contextvars
import copyreg
import pickle
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:  # NumPy 2 pickles name numpy._core, NumPy 1 numpy.core; the functions are the same
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core import multiarray as _np_multiarray


class SafeLoadError(ValueError):
    """A file that is not a readable checkpoint; the message names the file and the reason."""


# --------------------------------------------------------------------------------------------------
# Inert stand-ins
# --------------------------------------------------------------------------------------------------


class Inert:
    """Stands in for anything a checkpoint names that is not on the allowlist. Calling the class, building
    an instance (NEWOBJ), setting its state (BUILD) or filling it as a dict or list subclass (mmengine's
    ConfigDict) only stores what the file gave; no method of the original ever runs."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: object) -> None:
        self.state = state

    def __setitem__(self, key: object, value: object) -> None:
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: object) -> None:
        self.__dict__.setdefault("listitems", []).append(value)

    def extend(self, values: list) -> None:
        self.__dict__.setdefault("listitems", []).extend(values)

    def __repr__(self) -> str:
        return f"<inert stand-in for {type(self).__module__}.{type(self).__qualname__}>"


# The names stood in for during the current safe_load (None outside one): every stand-in is recorded,
# whether the pickle named it directly or reached it through getattr or a refused reconstruction.
_made: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("safe_load_stand_ins", default=None)


def stand_in(module: str, qualname: str) -> type[Inert]:
    """An inert class named like `module.qualname` (a class, function or method of any package), so
    reprs and error messages still say what the file referred to."""
    module, qualname = str(module), str(qualname)
    made = _made.get()
    if made is not None:
        made.append(f"{module}.{qualname}")
    attrs = {"__module__": module, "__qualname__": qualname}
    return type(qualname.rsplit(".", 1)[-1] or "?", (Inert,), attrs)


def inert_getattr(obj: object, name: str, *default: object) -> type[Inert]:
    """`builtins.getattr` as a pickle calls it (protocol 2 spells a method such as mmengine's
    `HistoryBuffer.min` as `getattr(HistoryBuffer, 'min')`): always a stand-in named after the owner and
    the attribute, never the real attribute (`getattr(numpy.ndarray, 'tofile')` would write files)."""
    if isinstance(obj, type):
        owner_module, owner = obj.__module__, obj.__qualname__
    else:
        owner_module, owner = type(obj).__module__, type(obj).__qualname__
    return stand_in(owner_module, f"{owner}.{name}")


# --------------------------------------------------------------------------------------------------
# The allowlist: data constructors only
# --------------------------------------------------------------------------------------------------


def _latin1_bytes(text: object, encoding: str = "latin1") -> object:
    """`_codecs.encode(text, 'latin1')`: how pickle protocol 2 writes `bytes`; nothing else is encoded."""
    if isinstance(text, str) and str(encoding).lower().replace("-", "").replace("_", "") == "latin1":
        return text.encode("latin1")
    return stand_in("_codecs", "encode")(text, encoding)


def _ndarray_reconstruct(subtype: object, shape: object, dtype: object) -> object:
    """NumPy's array unpickling entry point, for plain ndarrays only (subclasses become stand-ins)."""
    if subtype is not np.ndarray:
        return stand_in("numpy", "ndarray_subclass")(subtype, shape, dtype)
    return _np_multiarray._reconstruct(np.ndarray, shape, dtype)


def _ndarray_frombuffer(buf: object, dtype: object, shape: object, order: object) -> np.ndarray:
    """NumPy's protocol-5 array reader: an array over the given bytes."""
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


_BASES = (object, dict, list, tuple, set, frozenset)


def _reconstructor(cls: object, base: object, state: object) -> object:
    """`copyreg._reconstructor` (pickle protocols 0/1) for allowlisted classes; else an inert instance."""
    if isinstance(cls, type) and issubclass(cls, Inert):
        return cls(base, state)
    if cls in _CLASSES and base in _BASES:
        return copyreg._reconstructor(cls, base, state)
    return stand_in("copyreg", "_reconstructor")(cls, base, state)


_TENSOR_REBUILDERS = (
    "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
    "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_sparse_tensor",
    "_rebuild_meta_tensor_no_storage", "_rebuild_nested_tensor", "_rebuild_wrapper_subclass",
    "_rebuild_device_tensor_from_numpy", "_rebuild_device_tensor_from_cpu_tensor",
)  # fmt: skip
_NP_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")
_NP_NUMERIC = ("numpy.core.numeric", "numpy._core.numeric")

ALLOWED: dict[tuple[str, str], object] = {
    **{("builtins", t.__name__): t for t in (
        list, dict, tuple, set, frozenset, bytearray, bytes, str, int, float, complex, bool, slice, range,
    )},  # fmt: skip
    ("builtins", "getattr"): inert_getattr,
    ("_codecs", "encode"): _latin1_bytes,
    ("copyreg", "_reconstructor"): _reconstructor,
    **{("collections", t.__name__): t for t in (
        collections.OrderedDict, collections.Counter, collections.defaultdict, collections.deque,
    )},  # fmt: skip
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(m, "_reconstruct"): _ndarray_reconstruct for m in _NP_CORE},
    **{(m, "scalar"): _np_multiarray.scalar for m in _NP_CORE},
    **{(m, "_frombuffer"): _ndarray_frombuffer for m in _NP_NUMERIC},
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch", "Tensor"): torch.Tensor,
    ("torch", "UntypedStorage"): torch.UntypedStorage,
    ("torch.storage", "UntypedStorage"): torch.UntypedStorage,
    ("torch._tensor", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
    **{("torch._utils", n): getattr(torch._utils, n) for n in _TENSOR_REBUILDERS if hasattr(torch._utils, n)},
}
if hasattr(torch.serialization, "_get_layout"):
    ALLOWED[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
_CLASSES = {v for v in ALLOWED.values() if isinstance(v, type)}
# torch.float32, torch.strided, torch.channels_last, torch.per_tensor_affine: values, not callables
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)


def python3_name(module: str, name: str) -> tuple[str, str]:
    """Pickle protocol 2 writes Python 2 spellings (`__builtin__ set`); the Python 3 name they mean."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def resolve(module: str, name: str) -> object | None:
    """The allowlisted object that the Python 3 name `module.name` stands for, or None (the caller makes a
    stand-in). Nothing is imported: only the table above and torch's own constants are ever returned."""
    found = ALLOWED.get((module, name))
    if found is not None:
        return found
    if module == "torch" and isinstance(name, str) and not name.startswith("_"):
        value = getattr(torch, name, None)
        if isinstance(value, _TORCH_CONSTANTS):
            return value
        if name.endswith("Storage"):  # legacy typed storages: torch's inert storage-type marker
            try:
                return torch.serialization.StorageType(name)
            except (KeyError, AttributeError):
                return None
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose every global goes through `resolve`; the rest become stand-ins."""

    def find_class(self, module: str, name: str) -> object:
        module, name = python3_name(module, name)
        found = resolve(module, name)
        return stand_in(module, name) if found is None else found


# What torch.load needs of a `pickle_module`: Unpickler (zip archives) and load (legacy files).
restricted_pickle = types.SimpleNamespace(
    Unpickler=RestrictedUnpickler,
    load=lambda f, **kw: RestrictedUnpickler(f, **kw).load(),
    __name__="engine.safe_load",
)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """What a checkpoint file held, and the names it referred to that were replaced by stand-ins."""

    obj: Any
    foreign: list[str] = field(default_factory=list)

    def foreign_note(self, shown: int = 3) -> str:
        """'' or ' (it refers to os.system, ...: inert stand-ins, nothing of them ran)' for messages."""
        if not self.foreign:
            return ""
        names = list(dict.fromkeys(self.foreign))
        more = f", ... {len(names) - shown} more" if len(names) > shown else ""
        return f" (it refers to {', '.join(names[:shown])}{more}: inert stand-ins, nothing of them ran)"


def checkpoint_format(path: Path) -> str:
    """'zip' (torch.save since PyTorch 1.6), 'legacy' (an older pickle stream); else a SafeLoadError."""
    with path.open("rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        if _is_torchscript(path):
            raise SafeLoadError(f"{path}: a TorchScript archive (it holds code), not a checkpoint of tensors")
        return "zip"
    if head[:1] == b"\x80":
        return "legacy"
    raise SafeLoadError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)")


def _is_torchscript(path: Path) -> bool:
    """torch.load hands an archive with constants.pkl to torch.jit.load (code); this finds it first."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False  # torch.load reports the damage
    return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in names)


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> Loaded:
    """Read a checkpoint (zip or legacy) through the restricted unpickler. Raises SafeLoadError naming the
    file for anything unreadable (missing, truncated, foreign format, TorchScript)."""
    path = Path(path)
    if not path.is_file():
        raise SafeLoadError(f"{path}: no such file")
    checkpoint_format(path)
    foreign: list[str] = []
    token = _made.set(foreign)
    try:
        # weights_only=False only hands unpickling to the restricted module above (torch's own restricted
        # reader refuses the numpy and trainer objects that official checkpoints carry); nothing else runs.
        obj = torch.load(path, map_location=map_location, weights_only=False, pickle_module=restricted_pickle)
    except Exception as e:  # torch raises many types for truncated or damaged files
        first = (str(e).splitlines() or [""])[0][:300]
        why = f"truncated or damaged? {type(e).__name__}: {first}"
        raise SafeLoadError(f"{path}: cannot read as a torch checkpoint ({why})") from None
    finally:
        _made.reset(token)
    return Loaded(obj, foreign)
