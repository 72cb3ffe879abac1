"""train.py on in-memory batches: one step for every model, exact resume, non-finite handling, CLI.

`MemoryLoader` speaks the loader protocol (len, set_epoch, state_dict/load_state_dict, {"clips",
"labels", "ids"} batches, each val video once over the ranks) with batches derived from
(seed, epoch, position), so these tests need no video decoding and take seconds. The same trainer on the
real DALI loader and the demo dataset is covered by tests/test_train_demo.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import train
from engine.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from engine.config import Config, load_config
from models import MODELS, build_model


class MemoryLoader:
    """Deterministic synthetic batches; `nan_at` = {(epoch, position)} batches whose clips are NaN."""

    def __init__(self, data, mode, rank=0, world_size=1, views=None, device_id=None, *, num_classes=5,
                 videos=8, nan_at=()):  # fmt: skip
        self.data, self.mode, self.rank, self.num_classes, self.nan_at = data, mode, rank, num_classes, nan_at
        self.frames = data.clip_len if data.layout == "NCTHW" else data.num_segments * data.snippet_len
        self.ids = list(range(videos))[rank::world_size]
        self.num_videos = videos  # the list's length, as ClipLoader.num_videos
        self.batch = data.batch_size
        self._len = len(self.ids) // self.batch if mode == "train" else -(-len(self.ids) // self.batch)
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def __iter__(self):
        while self.position < self._len:
            ids = torch.tensor(self.ids[self.position * self.batch :][: self.batch])
            g = torch.Generator().manual_seed(1000 * self.epoch + 10 * self.position + self.rank)
            size = self.data.input_size
            shape = (
                (3, self.frames, size, size) if self.data.layout == "NCTHW" else (self.frames, 3, size, size)
            )
            clips = torch.randn(len(ids), *shape, generator=g)
            labels = ids % self.num_classes
            if (self.epoch, self.position) in self.nan_at:
                clips[0] = float("nan")
            if self.mode != "train":
                clips = clips.unsqueeze(1)
            self.position += 1
            yield {"clips": clips, "labels": labels, "ids": ids}
        self.epoch, self.position = self.epoch + 1, 0


@pytest.fixture(autouse=True)
def _restore_threads():
    """train.threads sets torch's thread count for the process; put it back for the next test."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def memory_data(monkeypatch):
    """Route train.py's build_loader to MemoryLoader; returns a dict of MemoryLoader kwargs to tweak."""
    import dali_pipes.loader

    kwargs: dict = {}
    monkeypatch.setattr(dali_pipes.loader, "build_loader", lambda *a, **kw: MemoryLoader(*a, **kw, **kwargs))
    return kwargs


def tiny_config(tmp_path, name: str = "tsm", **overrides) -> Config:
    """A debug model on 32 px clips, 4 batches of 2 per epoch, CPU, logging every step."""
    model = build_model(
        load_config(None, ["model.debug=true", f"model.name={name}", "model.num_classes=5"]).model
    )
    three_d = getattr(model, "layout", "NTCHW") == "NCTHW"
    items = {
        "data.device": "cpu", "data.input_size": 32, "data.batch_size": 2, "data.num_segments": 4,
        "model.num_segments": 4, "model.name": name, "model.debug": True, "model.num_classes": 5,
        "data.snippet_len": getattr(model, "snippet_len", 1), "data.clip_len": 4,
        "data.layout": "NCTHW" if three_d else "NTCHW", "data.sampling": "clip3d" if three_d else "uniform",
        "optim.lr": 0.05, "optim.lr_steps": [1], "train.epochs": 2, "train.log_every": 1,
        "train.out_dir": str(tmp_path / "run"), "train.progress": False, "train.threads": 1,
    }  # fmt: skip
    items.update(overrides)
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in items.items()])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_training_step_for_every_model(memory_data, tmp_path, name):
    """Default AMP (bf16 autocast on CPU) and channels-last: one optimizer step, validation, checkpoint."""
    # 8 segments: MSN's motion module needs a multiple of 8
    cfg = tiny_config(tmp_path, name, **{"train.epochs": 1, "data.batch_size": 4, "data.num_segments": 8,
                                         "model.num_segments": 8, "data.clip_len": 8})  # fmt: skip
    memory_data["videos"] = 4  # one training batch -> one step
    torch.manual_seed(cfg.train.seed)
    init = build_model(cfg.model).state_dict()
    out = train.train(cfg)
    assert out["step"] == 1 and out["batches_per_rank"] == [[1]]
    assert out["val"]["val"]["videos"] == 4
    assert (Path(out["out_dir"]) / "curves.png").read_bytes()[:4] == b"\x89PNG"  # drawn at the end
    state = load_checkpoint(out["checkpoint"])
    assert state["step"] == 1 and state["epoch"] == 1
    trained = state["model"]
    assert set(trained) == set(init)
    assert all(torch.isfinite(v).all() for v in trained.values() if v.is_floating_point())
    assert not torch.equal(trained["fc.weight"], init["fc.weight"]), "the optimizer step changed nothing"


def _final_state(out: dict) -> dict:
    return load_checkpoint(out["checkpoint"])


@pytest.mark.parametrize("stop_at", [3, 4])  # mid-epoch 1 (data position restored) and an epoch boundary
def test_stop_and_resume_is_bitwise_identical(memory_data, tmp_path, stop_at):
    """fp32 on CPU, dropout, momentum, a step LR decay and EMA: stopping and resuming changes nothing."""
    common = {"train.amp": "fp32", "train.ema": 0.9, "train.epochs": 3, "model.dropout": 0.5}
    full = train.train(tiny_config(tmp_path / "a", **common))
    first = train.train(tiny_config(tmp_path / "b", **common, **{"train.stop_at_step": stop_at}))
    assert first["stopped_early"] and first["step"] == stop_at
    resumed = train.train(tiny_config(tmp_path / "b", **common), resume="auto")
    assert resumed["step"] == full["step"] == 12
    a, b = _final_state(full), _final_state(resumed)
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs after resume"
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 12


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(memory_data, tmp_path):
    memory_data["nan_at"] = {(1, 1)}  # epoch 2, second batch = step 6
    cfg = tiny_config(tmp_path, **{"train.eval_every": 0})
    with pytest.raises(train.NonFiniteLossError, match="at step 6") as err:
        train.train(cfg)
    good = latest_checkpoint(cfg.train.out_dir)
    assert [p.name for p in list_checkpoints(cfg.train.out_dir)] == [good.name]
    assert good.name.startswith("ckpt_e0001_s000000004") and good.name in str(err.value)
    state = load_checkpoint(good)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nonfinite_loss_skip_mode_skips_the_update(memory_data, tmp_path):
    memory_data["nan_at"] = {(0, 1), (1, 2)}
    cfg = tiny_config(tmp_path, **{"train.nonfinite": "skip", "train.eval_every": 0})
    out = train.train(cfg)
    assert out["step"] == 8 and out["skipped_steps"] == 2
    state = load_checkpoint(out["checkpoint"])  # BN running stats restored too: everything finite
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    losses = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in losses if r["kind"] == "train")  # no NaN logged


def test_fresh_start_refuses_existing_checkpoints_and_resume_auto_continues(memory_data, tmp_path, capsys):
    cfg = tiny_config(tmp_path, **{"train.epochs": 1, "train.eval_every": 0})
    train.train(cfg)
    with pytest.raises(train.RunDirError, match="--resume auto"):
        train.train(cfg)
    cfg2 = tiny_config(tmp_path, **{"train.epochs": 2, "train.eval_every": 0})
    out = train.train(cfg2, resume="auto")
    assert out["step"] == 8 and out["batches_per_rank"] == [[4]]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records].count("start") == 2
    assert records[0]["provenance"]["torch"] == torch.__version__ and "git_sha" in records[0]["provenance"]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == sorted(steps) and len(steps) == 8


def test_epochs_shorter_than_log_every_still_log_a_loss_each_epoch(memory_data, tmp_path, capsys):
    out = train.train(tiny_config(tmp_path, **{"train.log_every": 100, "train.eval_every": 0}))  # 4 steps
    assert out["step"] == 8
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["epoch"]) for r in records if r["kind"] == "train"]
    assert logged == [(4, 1), (8, 2)]  # at each epoch's end
    err = capsys.readouterr().err
    assert "step 4 (epoch 1, 4/4)  loss " in err and "step 8 (epoch 2, 4/4)  loss " in err
    cfg = tiny_config(tmp_path / "b", **{"train.log_every": 3, "train.eval_every": 0, "train.epochs": 1})
    assert train.train(cfg)["step"] == 4
    metrics = (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in metrics]
    assert [r["step"] for r in records if r["kind"] == "train"] == [3]  # the epoch had a line: none extra


def test_cli_print_config_and_errors(tmp_path, capsys):
    assert train.main(["configs/demo.yaml", "--print-config", "--optim.lr=0.123"]) == 0
    assert "lr: 0.123" in capsys.readouterr().out
    assert train.main(["configs/demo.yaml", "--print-config", "--optim.lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    assert (
        train.main(["configs/demo.yaml", f"--train.out_dir={tmp_path}", "--resume", str(tmp_path / "x.pt")])
        == 2
    )
    assert "checkpoint not found" in capsys.readouterr().err


def test_dataset_fingerprint_goes_to_metrics_checkpoint_and_console(memory_data, tmp_path, capsys,
                                                                    ffmpeg_available):  # fmt: skip
    from conftest import write_clip

    from dali_pipes.fingerprint import list_fingerprint

    write_clip(tmp_path / "data" / "a.webm", num_frames=8, width=32, height=32)
    listed = tmp_path / "data" / "train.txt"
    listed.write_text("a.webm 8 0\n")
    cfg = tiny_config(tmp_path, **{"train.epochs": 1, "train.eval_every": 0, "data.train_list": str(listed)})
    out = train.train(cfg)
    fp = list_fingerprint(listed, cfg.data, cfg.eval).as_dict()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["kind"] == "start" and records[0]["dataset"] == {"train": fp}
    assert load_checkpoint(out["checkpoint"])["dataset"] == {"train": fp}
    assert f"train: data {fp['digest']}: 1 videos, 1 classes, 0 bad | sampler uniform T=4" in (
        capsys.readouterr().err
    )
