"""models.convert on MMAction2 1.x checkpoints, which mmengine's `Runner.save_checkpoint` writes as
{meta, state_dict, message_hub, optimizer, param_schedulers}: the message hub pickles mmengine
`HistoryBuffer` objects whose state holds the class's statistics methods (`HistoryBuffer.min`, ...), which
pickle protocol 2 spells `getattr(HistoryBuffer, 'min')`. The restricted reader (engine/safe_load.py) makes
every such reference an inert stand-in, with or without mmengine installed and without `--trust` (now a
no-op), and the tensors of 'state_dict' must convert exactly.

The hand-made checkpoint below reproduces mmengine 0.10's pickled layout (a fake
`mmengine.logging.history_buffer` module registered in sys.modules while dumping, then removed); where
mmengine is importable, a second test writes the same checkpoint with the real mmengine objects and checks
that both pickles are opcode for opcode the same."""

from __future__ import annotations

import collections
import contextlib
import pickle
import pickletools
import sys
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from test_convert_layouts import model_cfg, official_layout, randomised

from engine.safe_load import Inert, inert_getattr, safe_load, stand_in
from models import build_model
from models.convert import convert_file, main

HISTORY_BUFFER_MODULE = "mmengine.logging.history_buffer"

# The state mmengine's HistoryBuffer pickles (its __getstate__): max_length, _log_history and
# _count_history (numpy arrays), and 'statistics_methods', the class-level registry {name: function} that
# always holds the four default methods, i.e. functions referenced by qualified name. Written here from
# that layout, executed as module `mmengine.logging.history_buffer` so pickle names it exactly as mmengine.
FAKE_HISTORY_BUFFER_SOURCE = """
import numpy as np


class HistoryBuffer:
    _statistics_methods = {}

    def __init__(self, log_history=(), count_history=(), max_length=1000000):
        self.max_length = max_length
        for method in (HistoryBuffer.min, HistoryBuffer.max, HistoryBuffer.current, HistoryBuffer.mean):
            self._statistics_methods.setdefault(method.__name__, method)
        self._log_history = np.array(list(log_history))
        self._count_history = np.array(list(count_history))

    def update(self, value, count=1):
        self._log_history = np.append(self._log_history, value)
        self._count_history = np.append(self._count_history, count)

    def min(self):
        return self._log_history.min()

    def max(self):
        return self._log_history.max()

    def current(self):
        return self._log_history[-1]

    def mean(self):
        return self._log_history.sum() / self._count_history.sum()

    def __getstate__(self):
        self.__dict__["statistics_methods"] = self._statistics_methods
        return self.__dict__
"""

SCALARS = {"train/lr": [0.01, 0.01], "train/loss": [1.5, 1.25], "train/time": [0.25, 0.5]}
RUNTIME_INFO = {"experiment_name": "tsm_r50_k400", "loop_stage": "train", "epoch": 3, "iter": 120}


@contextlib.contextmanager
def fake_mmengine(monkeypatch: pytest.MonkeyPatch) -> Iterator[type]:
    """Registers `mmengine`, `mmengine.logging` and the fake history_buffer module while the block runs."""
    with monkeypatch.context() as patch:
        names = ["mmengine", "mmengine.logging", HISTORY_BUFFER_MODULE]
        modules = [types.ModuleType(n) for n in names]
        exec(FAKE_HISTORY_BUFFER_SOURCE, modules[-1].__dict__)
        for name, module in zip(names, modules, strict=True):
            patch.setitem(sys.modules, name, module)
        modules[0].logging, modules[1].history_buffer = modules[1], modules[2]
        yield modules[-1].HistoryBuffer


def message_hub_state(history_buffer: type) -> dict:
    """MessageHub.state_dict() after a few iterations: a buffer per scalar (created with the first value,
    then updated), the runtime info, and which keys are resumed."""
    scalars = collections.OrderedDict()
    for key, values in SCALARS.items():
        scalars[key] = history_buffer([values[0]], [1])
        for value in values[1:]:
            scalars[key].update(value)
    info = collections.OrderedDict(RUNTIME_INFO, eta=np.float64(12.5))
    resumed = collections.OrderedDict((k, True) for k in [*info, *scalars])
    return {"log_scalars": scalars, "runtime_info": info, "resumed_keys": resumed}


def runner_checkpoint(state_dict: dict[str, torch.Tensor], hub: dict) -> dict:
    """Runner.save_checkpoint's container: meta, the model's state_dict (an OrderedDict with _metadata),
    the message hub, the optimizer's state_dict and one state_dict per parameter scheduler."""
    weights = collections.OrderedDict(state_dict)
    weights._metadata = collections.OrderedDict({"": {"version": 1}})
    first = next(iter(state_dict.values()))
    return {
        "meta": {
            "epoch": 3,
            "iter": 120,
            "cfg": "model = dict(type='Recognizer2D')\n",
            "seed": 0,
            "experiment_name": RUNTIME_INFO["experiment_name"],
            "time": "20240101_000000",
            "mmengine_version": "0.10.7",
            "dataset_meta": {"classes": ("a", "b")},
        },
        "state_dict": weights,
        "message_hub": hub,
        "optimizer": {
            "state": {0: {"momentum_buffer": torch.zeros_like(first)}},
            "param_groups": [{"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "params": [0]}],
        },
        "param_schedulers": [
            {"milestones": collections.Counter({40: 1}), "gamma": 0.1, "by_epoch": True, "last_step": 3}
        ],
    }


def hide_mmengine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every `import mmengine...` fail from here on (even where it is installed), as on a machine
    without it."""
    names = {"mmengine", "mmengine.logging", HISTORY_BUFFER_MODULE}
    for name in names | {n for n in sys.modules if n.startswith("mmengine.")}:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture(scope="module")
def tsm_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return randomised(build_model(model_cfg("tsm"))).state_dict()


def assert_converts_exactly(src: Path, tmp_path: Path, tsm_state: dict[str, torch.Tensor]) -> None:
    state = convert_file(src, tmp_path / "out.pt", "mmaction", "tsm", debug=True)
    assert f"{HISTORY_BUFFER_MODULE}.HistoryBuffer" in state["meta"]["stand_ins"]
    assert set(state["model"]) == set(tsm_state)
    for key, value in tsm_state.items():
        assert torch.equal(state["model"][key], value), key


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
@pytest.mark.parametrize("protocol", [2, 4])  # 2: torch.save's default (getattr); 4: 'HistoryBuffer.min'
def test_reads_an_mmengine_runner_checkpoint_without_mmengine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tsm_state, protocol: int
) -> None:
    src = tmp_path / "tsm_mmaction2.pth"
    with fake_mmengine(monkeypatch) as history_buffer:
        ckpt = runner_checkpoint(
            official_layout("mmaction", "tsm", tsm_state), message_hub_state(history_buffer)
        )
        torch.save(ckpt, src, pickle_protocol=protocol)
    hide_mmengine(monkeypatch)
    names = pickled_names(src)
    assert f"{HISTORY_BUFFER_MODULE} HistoryBuffer" in names or HISTORY_BUFFER_MODULE in names
    if protocol == 2:
        assert "__builtin__ getattr" in names  # getattr(HistoryBuffer, 'min'), the failing path of issue 15
    else:
        assert "HistoryBuffer.min" in names  # find_class(module, 'HistoryBuffer.min')

    assert_converts_exactly(src, tmp_path, tsm_state)
    assert sys.modules["mmengine"] is None  # nothing was imported or registered on the way

    # What the stand-ins hold: the pickled state as data; the methods are inert stand-ins named as in
    # mmengine (nothing of mmengine's runs, only 'state_dict' is read by the converter).
    full = safe_load(src).obj
    loss = full["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(loss, Inert) and type(loss).__module__ == HISTORY_BUFFER_MODULE
    np.testing.assert_array_equal(loss.state["_log_history"], SCALARS["train/loss"])
    methods = loss.state["statistics_methods"]
    assert sorted(methods) == ["current", "max", "mean", "min"]
    assert methods["min"].__qualname__ == "HistoryBuffer.min" and issubclass(methods["min"], Inert)
    assert full["message_hub"]["runtime_info"]["eta"] == 12.5
    assert full["param_schedulers"][0]["milestones"] == collections.Counter({40: 1})


def test_trust_is_an_accepted_no_op(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tsm_state, capsys
) -> None:
    """`--trust` (which once unpickled fully) is accepted, says it is ignored, and converts the same way."""
    src = tmp_path / "tsm_mmaction2.pth"
    with fake_mmengine(monkeypatch) as history_buffer:
        hub = message_hub_state(history_buffer)
        torch.save(runner_checkpoint(official_layout("mmaction", "tsm", tsm_state), hub), src)
    hide_mmengine(monkeypatch)
    args = [str(src), str(tmp_path / "out.pt"), "--from", "mmaction", "--model", "tsm", "--debug", "--trust"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "--trust is no longer needed and is ignored" in out and "inert stand-ins, none run" in out
    converted = safe_load(tmp_path / "out.pt")
    assert not converted.foreign
    for key, value in tsm_state.items():
        assert torch.equal(converted.obj["model"][key], value), key


def pickled_names(path: Path) -> set[str]:
    """The global references and strings in the data.pkl record of a torch.save zip archive."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    return {arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str)}


def test_getattr_in_a_pickle_always_gives_a_stand_in() -> None:
    """Even attributes that exist: `getattr(numpy.ndarray, 'tofile')` called by a pickle would write files."""
    real = inert_getattr(np.ndarray, "tofile")
    assert issubclass(real, Inert) and (real.__module__, real.__qualname__) == ("numpy", "ndarray.tofile")
    renamed = inert_getattr(collections.OrderedDict, "removed_in_a_newer_version", 7)
    assert issubclass(renamed, Inert) and renamed.__qualname__ == "OrderedDict.removed_in_a_newer_version"
    instance = stand_in("mmengine.hooks", "Hook")()  # a bound method pickles as getattr(instance, name)
    method = inert_getattr(instance, "before_run")
    assert method.__module__ == "mmengine.hooks" and method.__qualname__ == "Hook.before_run"
    assert isinstance(method("anything"), Inert)  # calling a stand-in only stores its arguments


def test_the_hand_made_pickle_is_mmengines_and_converts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tsm_state
) -> None:
    """With the real mmengine (where installed): its MessageHub state pickles opcode for opcode as the
    hand-made one above, and a checkpoint assembled by its own helpers converts once mmengine is hidden."""
    logging_ = pytest.importorskip("mmengine.logging")
    checkpoint = pytest.importorskip("mmengine.runner.checkpoint")
    optim = pytest.importorskip("mmengine.optim")

    hub = logging_.MessageHub.get_instance("test_convert_trust")
    for key, value in {**RUNTIME_INFO, "eta": np.float64(12.5)}.items():
        hub.update_info(key, value)
    for key, values in SCALARS.items():
        for value in values:
            hub.update_scalar(key, value)
    real_hub = hub.state_dict()
    real = pickle.dumps(real_hub, protocol=2)
    with fake_mmengine(monkeypatch) as history_buffer:
        fake = pickle.dumps(message_hub_state(history_buffer), protocol=2)
    assert list(pickletools.genops(fake)) and [(op.name, arg) for op, arg, _ in pickletools.genops(fake)] == [
        (op.name, arg) for op, arg, _ in pickletools.genops(real)
    ]

    net = build_model(model_cfg("tsm"))
    wrapper = optim.OptimWrapper(torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9))
    scheduler = optim.MultiStepLR(wrapper, milestones=[40], by_epoch=True)
    for p in net.parameters():
        p.grad = torch.ones_like(p)  # one step, so that SGD has momentum buffers to save
    wrapper.step()
    weights = checkpoint.weights_to_cpu(
        collections.OrderedDict(official_layout("mmaction", "tsm", tsm_state))
    )
    ckpt = runner_checkpoint(weights, real_hub)
    ckpt["optimizer"], ckpt["param_schedulers"] = wrapper.state_dict(), [scheduler.state_dict()]
    src = tmp_path / "tsm_mmaction2.pth"
    checkpoint.save_checkpoint(ckpt, str(src))

    hide_mmengine(monkeypatch)
    assert_converts_exactly(src, tmp_path, tsm_state)
