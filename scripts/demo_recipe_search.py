"""The demo recipe search loop: train.py's model, optimizer and LR schedule on frames decoded once.

    python scripts/demo_recipe_search.py --data DIR [--model tsm] [--seed 0] [--epochs 6] [--lr 1e-3]
        [--warmup 0.5] [--classes 6] [--mkldnn 1] [--threads 1] [--precision highest]

What docs/TRAINING.md's recipe search ran: every clip of a `prep.synth` set is decoded once into memory
(8-frame clips: the 8 TSN segments take every frame, as the demo's loader does with whole frames and no
flip), then a plain loop trains `build_model` with `build_optimizer` / `build_scheduler` of configs/demo.yaml
(with the overrides given) and prints one JSON line: val top-1, direction (class vs its time-reversed
twin), per-class top-1 and the loss per epoch. It skips the DALI loader, so a setting costs a fraction of
a demo run; the verdict on a recipe is the demo's own (scripts/learning_proof_table.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import av
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.channels_last import model_channels_last  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.optim import build_optimizer, build_scheduler  # noqa: E402
from models import build_model  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 1, 3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 1, 3, 1, 1) * 255


def load_split(data: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 8, H, W, 3) uint8 frames and (N,) labels of one list of a prep.synth set."""
    clips, labels = [], []
    for line in (data / name).read_text().splitlines():
        path, _, label = line.split()
        with av.open(str(data / path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        clips.append(np.stack(frames[:8]))
        labels.append(int(label))
    return torch.from_numpy(np.stack(clips)), torch.tensor(labels)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """N T H W C uint8 -> N T C H W float, ImageNet mean/std (the loader's defaults)."""
    return (x.permute(0, 1, 4, 2, 3).float() - MEAN) / STD


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="a prep.synth output folder")
    p.add_argument("--model", default="tsm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=float, default=0.5, help="warm-up epochs")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--classes", type=int, default=6, help="model.num_classes")
    p.add_argument("--mkldnn", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", default="highest", help="float32 matmul precision")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.backends.mkldnn.enabled = bool(a.mkldnn)
    torch.set_float32_matmul_precision(a.precision)
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"model.name={a.model}", f"model.num_classes={a.classes}", f"optim.lr={a.lr}",
        f"optim.warmup_epochs={a.warmup}", f"train.epochs={a.epochs}"])  # fmt: skip
    x_train, y_train = load_split(a.data, "train.txt")
    x_val, y_val = load_split(a.data, "val.txt")
    torch.manual_seed(a.seed)
    model = model_channels_last(build_model(cfg.model))
    optimizer = build_optimizer(model, cfg.optim, a.lr)
    steps = len(x_train) // a.batch
    scheduler = build_scheduler(optimizer, cfg.optim, steps, a.epochs)
    order = torch.Generator().manual_seed(a.seed)
    start, losses = time.perf_counter(), []
    for _ in range(a.epochs):
        model.train()
        perm, total = torch.randperm(len(x_train), generator=order), 0.0
        for i in range(steps):
            idx = perm[i * a.batch : (i + 1) * a.batch]
            loss = torch.nn.functional.cross_entropy(model(normalise(x_train[idx])), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item()
        losses.append(round(total / steps, 3))
    model.eval()
    with torch.no_grad():
        scores = torch.cat([model(normalise(x_val[i : i + 32])) for i in range(0, len(x_val), 32)])
    pred = scores.argmax(1)
    twin = {c: c ^ 1 for c in range(a.classes)}  # prep.synth orders each class beside its reverse
    direction = np.mean([float(scores[i, y] > scores[i, twin[int(y)]]) for i, y in enumerate(y_val)])
    print(json.dumps({
        "model": a.model, "seed": a.seed, "lr": a.lr, "epochs": a.epochs, "mkldnn": a.mkldnn,
        "threads": a.threads, "precision": a.precision,
        "top1": round(100 * float((pred == y_val).float().mean()), 1), "direction": round(100 * direction, 1),
        "per_class": [round(100 * float((pred[y_val == c] == c).float().mean())) for c in range(a.classes)],
        "loss": losses, "seconds": round(time.perf_counter() - start)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
