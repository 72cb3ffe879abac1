"""evaluate.py across ranks (gloo, CPU): every video counted exactly once, whatever each rank holds."""

from __future__ import annotations

import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_evaluate_scoring import NUM_CLASSES, FlatNet, fake_loader

from engine import scoring


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cases: dict, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for name, shards in cases.items():
            torch.manual_seed(0)
            result = scoring.evaluate_model(FlatNet(), shards[rank], NUM_CLASSES, fuse="softmax", amp="fp32")
            np.savez(f"{out_dir}/{name}_{rank}.npz", ids=result.ids, labels=result.labels,
                     view_logits=result.view_logits, scores=result.scores)  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_two_ranks_uneven_empty_and_duplicated_shards_give_the_single_process_result(tmp_path):
    batches = fake_loader(videos=7, views=2, batch=2)  # 7 videos: [0, 1] [2, 3] [4, 5] [6]
    cases = {
        "uneven": [[batches[1], batches[3]], [batches[0], batches[2]]],  # 3 and 4 videos (id 0 on rank 1)
        "one_empty": [batches, []],  # a rank with no batch at all
        "padded": [batches[:2], batches[2:] + [batches[0]]],  # a sampler that repeats videos to pad
    }
    mp.spawn(_worker, args=(2, _free_port(), cases, str(tmp_path)), nprocs=2, join=True)

    torch.manual_seed(0)
    single = scoring.evaluate_model(FlatNet(), batches, NUM_CLASSES, fuse="softmax", amp="fp32")
    assert single.ids.tolist() == list(range(7))
    for name in cases:
        for rank in (0, 1):
            got = np.load(tmp_path / f"{name}_{rank}.npz")
            assert got["ids"].tolist() == list(range(7)), (name, rank)
            assert got["labels"].tolist() == single.labels.tolist()
            np.testing.assert_allclose(got["view_logits"], single.view_logits, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got["scores"], single.scores, rtol=1e-5, atol=1e-6)
