"""Two "nodes" on this machine: two torchrun launchers, one process each, meeting through the c10d
rendezvous (gloo, CPU), as `torchrun --nnodes=2` runs on a cluster. One node is lost mid-epoch (its
launcher and everything under it SIGKILLed), both are started again with `--resume auto`, and training
ends on the same weights, bit for bit, as an uninterrupted two-node run. Every subprocess has a timeout."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dali_pipes.packet_index import PacketIndex, file_stamp, index_path_for
from engine.checkpoint import latest_checkpoint, load_checkpoint
from prep.synth import ALL_CLASSES
from tests.test_train_faults_dist import REPO, _alive, _assert_same_weights, _children, _env

pytestmark = pytest.mark.slow
STEPS_PER_EPOCH = 4  # 16 clips (8 classes x 2), 2 ranks, batch 2
EPOCHS = 3


@pytest.fixture(scope="module")
def clips(tmp_path_factory, ffmpeg_available) -> Path:
    out = tmp_path_factory.mktemp("multinode") / "demo"
    cmd = [sys.executable, "-m", "prep.synth", str(out), "--classes", *ALL_CLASSES, "--per-class", "2",
           "--val-per-class", "1", "--size", "32", "--frames", "8", "--quiet"]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True, timeout=120)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_cmd(clips: Path, out: Path, port: int, *extra: str) -> list[str]:
    """One node's launcher: the same command on every node, as on a cluster."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
        "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=job{port}",
        "--local-addr=127.0.0.1", "train.py", "configs/demo.yaml",
        f"--data.train_list={clips / 'train.txt'}", f"--data.val_list={clips / 'val.txt'}",
        f"--data.flip_pairs={clips / 'flip_pairs.txt'}", "--data.batch_size=2", "--data.input_size=32",
        "--data.scale_size=32", f"--train.epochs={EPOCHS}", "--train.eval_every=0", "--train.log_every=1",
        f"--train.out_dir={out}", "--train.threads=1", "--train.progress=false", "--train.dist_timeout_s=60",
        "--model.num_classes=8", *extra,
    ]  # fmt: skip


def _start_nodes(clips: Path, out: Path, *extra: str) -> list[subprocess.Popen]:
    """Two launchers, each in its own session (a node: killing one signals nothing of the other)."""
    port = _free_port()
    out.mkdir(parents=True, exist_ok=True)
    nodes = []
    for n in range(2):
        log = open(out.parent / f"{out.name}.node{n}.log", "ab")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(_node_cmd(clips, out, port, *extra), cwd=REPO, env=_env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        proc.log = log  # type: ignore[attr-defined]
        nodes.append(proc)
    return nodes


def _wait(nodes: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.log.close()  # type: ignore[attr-defined]


def _logs(out: Path) -> str:
    logs = sorted(out.parent.glob(f"{out.name}.node*.log"))
    return "".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs)


def _tree(pid: int) -> list[int]:
    """`pid` and every process under it."""
    found = [pid]
    for child in _children(pid):
        found += _tree(child)
    return found


def _logged_step(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines() if x.endswith("}")]
    return max(steps, default=0)


@pytest.fixture(scope="module")
def uninterrupted(clips, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("full") / "run"
    codes = _wait(_start_nodes(clips, out), timeout=240)
    assert codes == [0, 0], _logs(out)
    # prep.synth writes no packet index: each rank built half of it (a segment of 8 each, no video twice)
    # and rank 0 sealed it for the list (an empty segment)
    train_list = clips / "train.txt"
    index = PacketIndex(index_path_for(train_list))
    assert index.sealed(file_stamp(str(train_list)))
    assert sorted(len(segment.hashes) for segment in index.reader().segments) == [0, 8, 8]
    return load_checkpoint(latest_checkpoint(out))


def test_a_node_lost_mid_epoch_then_both_resume_bitwise(clips, uninterrupted, tmp_path):
    out = tmp_path / "run"
    nodes = _start_nodes(clips, out)
    deadline = time.monotonic() + 180
    while _logged_step(out) <= STEPS_PER_EPOCH and time.monotonic() < deadline:  # into epoch 2
        assert all(p.poll() is None for p in nodes), _logs(out)
        time.sleep(0.02)
    lost = _tree(nodes[1].pid)  # the whole node: launcher, its rank, the rank's DALI workers
    assert len(lost) >= 3, f"node 1 runs no rank with a DALI worker: {lost}"
    for pid in lost:
        os.kill(pid, signal.SIGKILL)
    codes = _wait(nodes, timeout=120)  # the surviving node notices and ends
    assert codes[0] != 0 and codes[1] == -signal.SIGKILL, _logs(out)
    assert not any(_alive(pid) for pid in lost[1:])
    assert latest_checkpoint(out).name == f"ckpt_e0001_s{STEPS_PER_EPOCH:09d}.pt", "killed too late"

    codes = _wait(_start_nodes(clips, out, "--resume", "auto"), timeout=240)
    assert codes == [0, 0], _logs(out)
    _assert_same_weights(uninterrupted, load_checkpoint(latest_checkpoint(out)), EPOCHS * STEPS_PER_EPOCH)
