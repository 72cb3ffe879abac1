"""build_loader on CPU (device_id=None): frames, layouts, flips, sharding, determinism, resume, bad input.

Tiny VP9 clips (64x48, 32-48 frames); pipelines use batch 2-3, 1 thread, 1-2 workers. The gpu-marked
tests use NVDEC-legal clips (conftest.clip_size("gpu"), 160x144).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import assert_sampled_frames, clip_size, frame_content, write_clip
from PIL import Image

from dali_pipes.loader import build_loader
from dali_pipes.sampling import clip_indices
from dali_pipes.source import ClipLoadError
from dali_pipes.video_io import decode_all, decode_frames, index_video
from engine.config import DataConfig, EvalConfig

W, H = 64, 48
RAW = dict(mean=[0.0, 0.0, 0.0], std=[1 / 255] * 3)  # normalisation off: outputs are pixel values


def write_dataset(root: Path, count: int, width: int, height: int) -> Path:
    """`count` VP9 clips of 32-48 frames, GOP 8, listed in root/list.txt (labels i % 3)."""
    lines = []
    for i in range(count):
        nf = 32 + (i * 5) % 17
        write_clip(root / f"videos/v {i}.webm", num_frames=nf, width=width, height=height, gop=8, seed=i)
        lines.append(f"videos/v {i}.webm {nf} {i % 3}")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    (root / "pairs.txt").write_text("0 1\n")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ffmpeg_available) -> Path:
    return write_dataset(tmp_path_factory.mktemp("clips"), 7, W, H)


@pytest.fixture(scope="module")
def nvdec_dataset(tmp_path_factory, ffmpeg_available) -> Path:
    """The gpu tests' dataset: 4 clips NVDEC accepts (made only when a gpu test runs)."""
    return write_dataset(tmp_path_factory.mktemp("nvdec"), 4, *clip_size("gpu"))


def cfg(root: Path, **kw) -> DataConfig:
    listed = str(root / "list.txt")
    base = dict(train_list=listed, val_list=listed, device="cpu", input_size=32, scale_size=40,
                batch_size=2, num_threads=1, num_workers=1, prefetch=1)  # fmt: skip
    base.update(kw)
    return DataConfig(**base)


def collect(loader, epochs: int = 1) -> list[dict]:
    out = []
    for _ in range(epochs):
        out += [{k: v.clone() for k, v in b.items()} for b in loader]
    return out


def same_batches(a: list[dict], b: list[dict]) -> bool:
    if len(a) != len(b):
        return False
    return all(all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True))


def entry_frames(root: Path, i: int) -> np.ndarray:
    return decode_all(str(root / f"videos/v {i}.webm"))


def encode_test_clip(tmp_path: Path, codec: str, frames: int = 40, gop: int = 8) -> str:
    """A small clip; h264_bframes: x264 with 3 B-frames (b-pyramid: some B-frames are references)."""
    name = tmp_path / f"c.{'mp4' if codec.startswith('h264') else 'mkv'}"
    if codec == "h264_bframes":  # reordered frames + an mp4 edit list, as in real Kinetics files
        if "libx264" not in av.codecs_available:
            pytest.skip("PyAV's FFmpeg has no libx264 encoder")
        cmd = ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"testsrc=size={W}x{H}:rate=25",
               "-frames:v", str(frames), "-c:v", "libx264", "-bf", "3", "-g", str(gop),
               str(name)]  # fmt: skip
        subprocess.run(cmd, check=True)
        return str(name)
    return str(write_clip(name, frames, W, H, codec=codec, gop=gop))


@pytest.mark.parametrize("codec", ["vp9", "vp8", "h264", "mjpeg", "h264_bframes"])
def test_pyav_seeking_is_exact(tmp_path, ffmpeg_available, codec):
    path = encode_test_clip(tmp_path, codec)
    ref = decode_all(path)
    assert index_video(path).num_frames == len(ref) == 40
    rng = np.random.default_rng(0)
    for _ in range(5):
        want = rng.integers(0, 40, size=8)
        assert np.array_equal(decode_frames(path, want), ref[want])


@pytest.mark.parametrize("codec", ["vp9", "mjpeg", "h264_bframes"])
def test_pyav_fast_path_is_exact(tmp_path, ffmpeg_available, codec):
    """Skipping unreferenced frames, the reused reformatter and one decoder thread change no pixel:
    every frame of the clip, reached alone, in pairs across GOPs, in TSN-like sets and unsorted with
    repeats, equals the straight decode (plain to_ndarray); and the skipping really skips frames."""
    path = encode_test_clip(tmp_path, codec, frames=60, gop=12)
    ref = decode_all(path)
    index = index_video(path)
    rng = np.random.default_rng(1)
    sets = [np.array([i]) for i in range(60)] + [np.array([i, i + 13]) for i in range(0, 47, 3)]
    sets += [np.sort(rng.choice(60, 8, replace=False)) for _ in range(10)]
    sets += [rng.integers(0, 60, size=8) for _ in range(5)] + [np.arange(60), np.array([59, 0, 59, 30])]
    fast, slow = {}, {}
    for want in sets:
        assert np.array_equal(decode_frames(path, want, index, stats=fast), ref[want]), want
        assert np.array_equal(decode_frames(path, want, index, skip_nonref=False, stats=slow), ref[want])
    assert fast["kept"] == slow["kept"] == sum(len(w) for w in sets)
    if codec == "h264_bframes":  # x264's non-reference B-frames are dropped between wanted frames
        assert fast["decoded"] < 0.8 * slow["decoded"], (fast, slow)
    if codec == "mjpeg":  # intra-only: only wanted frames are decoded
        assert fast["decoded"] == sum(len(set(w.tolist())) for w in sets)


def check_matches_indices(clips: np.ndarray, ref: np.ndarray, want: np.ndarray, tol: float) -> None:
    """Each output frame is nearest to its own index's frame (the val centre square of a 64x48 frame)."""
    assert_sampled_frames(clips, ref, want, x0=8, tol=tol)


@pytest.mark.parametrize("decoder", ["pyav", "dali"])
def test_decoded_frames_are_the_requested_ones(dataset, decoder):
    data = cfg(dataset, cpu_decoder=decoder, input_size=48, scale_size=48, **RAW)
    loader = build_loader(data, "val")
    batch = next(iter(loader))
    loader.close()
    for clip, sid in zip(batch["clips"][:, 0].numpy(), batch["ids"].tolist(), strict=True):
        ref = entry_frames(dataset, sid)
        want = clip_indices(len(ref), "val", loader.sampling, sample_id=sid)[0]
        # PyAV route: same conversion, identity resize -> exact up to float rounding
        check_matches_indices(clip, ref, want, tol=0.5 if decoder == "pyav" else 5.0)


def test_option_errors_are_raised_up_front(dataset):
    with pytest.raises(ValueError, match="temporal_clips"):
        build_loader(cfg(dataset), "test", views=EvalConfig(temporal_mode="centres", temporal_clips=3))
    with pytest.raises(ValueError, match="device_id"):
        build_loader(cfg(dataset, device="gpu"), "train")


def test_shapes_layouts_dtypes(dataset):
    views = EvalConfig(spatial_crops=3, temporal_clips=2, temporal_mode="uniform", batch_size=3)
    cases = [
        ("train", dict(), None, (2, 8, 3, 32, 32), torch.float32),
        ("train", dict(layout="NCTHW", sampling="clip3d", clip_len=4, frame_interval=2, dtype="float16"),
         None, (2, 3, 4, 32, 32), torch.float16),
        ("train", dict(snippet_len=5, num_segments=2, dtype="bfloat16", train_crop="random_resized"),
         None, (2, 10, 3, 32, 32), torch.bfloat16),
        ("val", dict(sampling="dense"), None, (2, 1, 8, 3, 32, 32), torch.float32),
        ("test", dict(), views, (3, 6, 8, 3, 32, 32), torch.float32),
        ("test", dict(sampling="dense"), EvalConfig(temporal_clips=2, batch_size=3), (3, 2, 8, 3, 32, 32),
         torch.float32),  # eval.temporal_mode auto -> dense-2
        ("test", dict(layout="NCTHW"), dataclasses.replace(views, full_res=True), (3, 6, 3, 8, 40, 40),
         torch.float32),
    ]  # fmt: skip
    for mode, kw, v, shape, dtype in cases:
        loader = build_loader(cfg(dataset, **kw), mode, views=v)
        batch = next(iter(loader))
        loader.close()
        assert tuple(batch["clips"].shape) == shape, (mode, kw)
        assert batch["clips"].dtype == dtype and batch["labels"].dtype == torch.int64
        assert batch["ids"].dtype == torch.int64 and batch["clips"].device.type == "cpu"
        assert torch.isfinite(batch["clips"].float()).all()


def test_test_views_order(dataset):
    """View v = clip * crops + crop: the 3 crops of one clip are left/centre/right of the same frames."""
    views = EvalConfig(spatial_crops=3, temporal_clips=2, temporal_mode="twice", batch_size=1)
    loader = build_loader(cfg(dataset, input_size=48, scale_size=48, **RAW), "test", views=views)
    batch = next(iter(loader))
    loader.close()
    ref = entry_frames(dataset, 0).astype(np.float32)
    want = clip_indices(len(ref), "test", loader.sampling, sample_id=0)
    clips = batch["clips"][0].numpy()  # (6, T, C, H, W)
    for v in range(6):
        clip, crop = divmod(v, 3)
        x0 = (0, 8, 16)[crop]
        img = clips[v, 3].transpose(1, 2, 0)
        assert np.abs(img - ref[want[clip, 3], :, x0 : x0 + 48]).max() < 1.0


def test_uniform_random_views_are_seeded_training_draws(dataset):
    """eval.temporal_mode uniform_random (MSN Kinetics test): every clip is a uniform draw from data.seed."""
    views = EvalConfig(temporal_clips=3, temporal_mode="uniform_random", batch_size=1)
    data = cfg(dataset, input_size=48, scale_size=48, num_segments=4, snippet_len=5, seed=5, **RAW)
    loader = build_loader(data, "test", views=views)
    batch = next(iter(loader))
    loader.close()
    ref = entry_frames(dataset, 0).astype(np.float32)
    want = clip_indices(len(ref), "test", loader.sampling, seed=5, sample_id=0)
    assert want.shape == (3, 20) and len({tuple(c) for c in want.tolist()}) == 3
    clips = batch["clips"][0].numpy()  # (3 clips, 4 x 5 frames, C, H, W)
    for v in range(3):
        for t in (0, 7, 19):
            img = clips[v, t].transpose(1, 2, 0)
            assert np.abs(img - ref[want[v, t], :, 8:56]).max() < 1.0


def test_flip_and_label_swap(dataset):
    on = build_loader(cfg(dataset, flip="pairs", flip_pairs=str(dataset / "pairs.txt"), seed=3), "train")
    off = build_loader(cfg(dataset, flip="off", seed=3), "train")
    a, b = collect(on), collect(off)
    on.close()
    off.close()
    flipped = 0
    for x, y in zip(a, b, strict=True):
        for k in range(len(x["ids"])):
            sid = int(x["ids"][k])
            assert sid == int(y["ids"][k])
            same = torch.equal(x["clips"][k], y["clips"][k])
            if torch.equal(x["clips"][k], y["clips"][k].flip(-1)) and not same:
                flipped += 1
                true = sid % 3
                assert int(x["labels"][k]) == {0: 1, 1: 0}.get(true, true)
            else:
                assert torch.equal(x["clips"][k], y["clips"][k]) and int(x["labels"][k]) == sid % 3
    assert 0 < flipped < 8


def test_two_ranks_cover_eval_once(dataset):
    ids = []
    for rank in range(2):
        loader = build_loader(cfg(dataset, batch_size=3), "val", rank=rank, world_size=2)
        got = collect(loader)
        loader.close()
        assert len(got) == len(loader)
        ids += [i for b in got for i in b["ids"].tolist()]
    assert sorted(ids) == list(range(7))
    one = dataset / "one.txt"
    one.write_text((dataset / "list.txt").read_text().splitlines()[0] + "\n")
    idle = build_loader(cfg(dataset, val_list=str(one)), "val", rank=1, world_size=2)
    assert len(idle) == 0 and collect(idle) == []  # more ranks than videos: nothing, no error
    lens = [len(build_loader(cfg(dataset, uneven=u), "train", rank=r, world_size=2)) for u in ("pad", "drop")
            for r in range(2)]  # fmt: skip
    assert lens[0] == lens[1] == 2 and lens[2] == lens[3] == 1


def test_same_seed_same_batches_and_resume(dataset):
    data = cfg(dataset, seed=5, num_workers=2)
    full = build_loader(data, "train")
    ref = collect(full, epochs=2)  # epoch 0 then epoch 1 (the loader moves on by itself)
    full.close()
    other = build_loader(dataclasses.replace(data, seed=6), "train")
    assert not same_batches(ref[:4], collect(other))
    other.close()
    serial = build_loader(dataclasses.replace(data, num_workers=0), "train")  # no worker processes
    assert same_batches(ref[:4], collect(serial))
    serial.close()
    first = build_loader(data, "train")
    got = []
    for batch in first:
        got.append({k: v.clone() for k, v in batch.items()})
        if len(got) == 3:
            break
    state = first.state_dict()
    first.close()
    assert state["epoch"] == 0 and state["position"] == 3
    resumed = build_loader(data, "train")
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # what a trainer does at the top of the epoch: keeps the position
    got += collect(resumed, epochs=2)
    resumed.close()
    assert same_batches(got, ref)


@pytest.mark.parametrize("decoder", ["dali", "pyav"])
def test_spawned_workers_give_the_forked_batches(dataset, decoder, monkeypatch):
    """The GPU route starts its workers with spawn (CUDA is initialised in the parent); CI has no GPU, so
    the CPU route runs with spawn here: the source is pickled into fresh interpreters and must give the
    fork route's batches bit for bit (dali: the encoded-bytes source NVDEC gets on the GPU route)."""
    data = cfg(dataset, cpu_decoder=decoder, seed=2, num_workers=2)

    def run(method: str) -> list[dict]:
        loader = build_loader(data, "train", start_method=method)
        assert loader.start_method == method
        got = collect(loader)
        loader.close()
        return got

    fork = run("fork")
    assert len(fork) == 4 and same_batches(run("spawn"), fork)
    # the workers really are fresh interpreters: a patch in this process reaches forked workers only
    reader = {"dali": "trim", "pyav": "decode_frames"}[decoder]

    def broken(*args, **kw):
        raise OSError("patched in the parent process")

    monkeypatch.setattr(f"dali_pipes.source.{reader}", broken)
    assert same_batches(run("spawn"), fork)
    with pytest.raises(ClipLoadError, match="patched in the parent"):
        run("fork")
    assert build_loader(data, "train").start_method == "fork"  # the CPU route's default
    with pytest.raises(ValueError, match="start_method"):
        build_loader(data, "train", start_method="forkserver")
    with pytest.raises(ValueError, match="must be spawned"):
        build_loader(cfg(dataset, device="gpu"), "train", device_id=0, start_method="fork")


def test_frame_folders(tmp_path, ffmpeg_available):
    lines = []
    for v in range(3):
        folder = tmp_path / f"f{v}"
        folder.mkdir()
        for k in range(20):
            Image.fromarray(frame_content(k, W, H, v)).save(folder / f"{k + 1:05d}.jpg", quality=95)
        lines.append(f"f{v} 20 {v}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    data = cfg(tmp_path, source="frames", input_size=48, scale_size=48, num_segments=4, **RAW)
    loader = build_loader(data, "val")
    batch = next(iter(loader))
    assert tuple(batch["clips"].shape) == (2, 1, 4, 3, 48, 48)
    for clip, sid in zip(batch["clips"][:, 0].numpy(), batch["ids"].tolist(), strict=True):
        ref = np.stack([frame_content(k, W, H, sid) for k in range(20)])
        check_matches_indices(clip, ref, clip_indices(20, "val", loader.sampling)[0], tol=6.0)
    loader.close()
    train = build_loader(dataclasses.replace(data, layout="NCTHW"), "train")
    assert tuple(next(iter(train))["clips"].shape) == (2, 3, 4, 48, 48)
    train.close()
    for k in range(1, 21):  # headers intact, no image data: only the JPEG decoder notices
        name = tmp_path / f"f2/{k:05d}.jpg"
        jpeg = name.read_bytes()
        name.write_bytes(jpeg[: jpeg.find(b"\xff\xda")] + b"\xff\xd9")
    with pytest.raises(ClipLoadError, match=r"list.txt:3: .*f2.*after DALI failed"):
        collect(build_loader(data, "val"))
    shutil.rmtree(tmp_path / "f1")
    with pytest.raises(ClipLoadError, match=r"list.txt:2: .*f1"):
        collect(build_loader(data, "val"))


def bad_dataset(root: Path, dataset: Path, kind: str) -> Path:
    """The good list with line 3 made bad in one way."""
    lines = (dataset / "list.txt").read_text().splitlines()
    target = root / "bad.webm"
    if kind == "missing":
        lines[2] = f"{root}/nothere.webm 40 0"
    elif kind == "empty":
        target.write_bytes(b"")
        lines[2] = f"{target} 40 0"
    elif kind == "garbage":
        target.write_bytes(np.random.default_rng(0).bytes(5000))
        lines[2] = f"{target} 40 0"
    else:  # shorter than listed
        lines[2] = lines[2].rsplit(maxsplit=2)[0] + " 60 0"
    (root / "list.txt").write_text("\n".join(f"{dataset}/{ln}" if not ln.startswith("/") else ln
                                             for ln in lines) + "\n")  # fmt: skip
    return root


@pytest.mark.parametrize("kind", ["missing", "empty", "garbage", "short"])
def test_bad_input_names_file_and_line(tmp_path, dataset, kind):
    root = bad_dataset(tmp_path, dataset, kind)
    with pytest.raises(ClipLoadError, match=r"list.txt:3: bad sample .*(nothere|bad|v 2)"):
        collect(build_loader(cfg(root), "val"))


def test_bad_input_dali_decoder_and_skip(tmp_path, dataset):
    root = bad_dataset(tmp_path, dataset, "garbage")
    with pytest.raises(ClipLoadError, match=r"list.txt:3: .*bad.webm"):
        collect(build_loader(cfg(root, cpu_decoder="dali"), "val"))
    train = build_loader(cfg(root, skip_bad=True), "train")
    batches = collect(train)
    assert train.skipped >= 1 and 2 not in [i for b in batches for i in b["ids"].tolist()]
    train.close()
    val = build_loader(cfg(root, skip_bad=True), "val")
    ids = [i for b in collect(val) for i in b["ids"].tolist()]
    assert sorted(ids) == [0, 1, 3, 4, 5, 6] and val.skipped == 1
    val.close()


def test_frame_folder_clip_reads_each_jpeg_once(tmp_path, monkeypatch):
    """All T frame samples of a clip: each sampled JPEG opened once (not T times), the folder's size
    read from the JPEG header (no image open per sample)."""
    import dali_pipes.source as source_mod

    folder = tmp_path / "f0"
    folder.mkdir()
    for k in range(20):
        Image.fromarray(frame_content(k, W, H, 0)).save(folder / f"{k + 1:05d}.jpg", quality=95)
    (tmp_path / "list.txt").write_text("f0 20 0\n")
    data = cfg(tmp_path, source="frames", input_size=48, scale_size=48, num_segments=8, batch_size=1)
    loader = build_loader(data, "train")
    src = loader.source
    loader.close()
    reads: list[str] = []
    real = source_mod.read_jpeg
    monkeypatch.setattr(source_mod, "read_jpeg", lambda name: reads.append(name) or real(name))
    monkeypatch.setattr("PIL.Image.open", lambda *a, **k: pytest.fail("opened an image with PIL"))
    for epoch in (0, 1):
        reads.clear()
        outs = [src.load(0, epoch, k) for k in range(src.group)]
        indices = clip_indices(20, "train", src.sampling, src.seed, epoch, 0).ravel()
        assert len(reads) == len(set(reads)) <= len(set(indices.tolist())) + 1  # + the first frame
        for k, out in enumerate(outs):
            assert bytes(out[0]) == (folder / f"{int(indices[k]) + 1:05d}.jpg").read_bytes()


def test_jpeg_size_matches_pil(tmp_path):
    from dali_pipes.source import jpeg_size

    rgb = frame_content(0, 70, 30)
    exif = Image.Exif()
    exif[0x010E] = "a description long enough for a real APP1 segment " * 8
    cases = {"baseline": {}, "progressive": {"progressive": True}, "exif": {"exif": exif},
             "subsampled": {"subsampling": 2, "quality": 50}}  # fmt: skip
    for name, kw in cases.items():
        Image.fromarray(rgb).save(tmp_path / f"{name}.jpg", **kw)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.jpg")
    for path in tmp_path.glob("*.jpg"):
        with Image.open(path) as im:
            assert jpeg_size(path.read_bytes()) == im.size == (70, 30), path.name
    assert jpeg_size(b"\xff\xd8not a jpeg") is None


@pytest.mark.gpu
@pytest.mark.parametrize("source", ["video", "frames"])
def test_gpu_route_matches_cpu(nvdec_dataset, source, tmp_path):
    """NVDEC / nvJPEG + GPU ops give the CPU route's clips (up to colour conversion)."""
    root = nvdec_dataset
    if source == "frames":
        for v in range(2):
            (tmp_path / f"f{v}").mkdir()
            for k in range(20):
                image = Image.fromarray(frame_content(k, *clip_size("gpu"), v))
                image.save(tmp_path / f"f{v}/{k + 1:05d}.jpg", quality=95)
        (tmp_path / "list.txt").write_text("f0 20 0\nf1 20 1\n")
        root = tmp_path
    data = cfg(root, source=source, num_segments=4)
    gpu = build_loader(dataclasses.replace(data, device="gpu"), "val", device_id=0)
    cpu = build_loader(data, "val")
    a, b = next(iter(gpu)), next(iter(cpu))
    assert a["clips"].device.type == "cuda" and a["labels"].device.type == "cuda"
    assert (a["clips"].cpu() - b["clips"]).abs().median() < 0.1


def test_profiler_table(dataset, tmp_path, capsys):
    import json

    from dali_pipes.profile import main, pin

    config = tmp_path / "p.yaml"
    config.write_text(f"data:\n  train_list: {dataset / 'list.txt'}\n  device: cpu\n  input_size: 32\n"
                      "  batch_size: 2\n  num_workers: 1\n  num_threads: 1\n")  # fmt: skip
    out_json = tmp_path / "bench.json"
    cores = os.sched_getaffinity(0)
    try:
        rc = main([str(config), "--batches", "2", "--warmup", "1", "--decoders", "pyav,dali", "--cores", "0",
                   "--baseline", "pyav", "--baseline", "pyav-seq", "--baseline", "decord",
                   "--json", str(out_json), "--data.num_segments=4", "--model.num_segments=4"])  # fmt: skip
    finally:
        pin(cores)  # main pinned this process (pytest) to core 0
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "DALI cpu (pyav decode)" in out and "DALI cpu (dali decode)" in out and "CPU-ms/clip" in out
    assert "clips/s" in out and ("decord is not importable" in out or "DataLoader + decord" in out)
    doc = json.loads(out_json.read_text())
    assert doc["cores"] == [0] and doc["thread_budget"] == 1
    rows = {r["name"].split(" (")[0] if r["kind"] == "baseline" else r["name"]: r for r in doc["results"]}
    route, dali = rows["DALI cpu (pyav decode)"], rows["DALI cpu (dali decode)"]
    seek, seq = rows["DataLoader + pyav-seek"], rows["DataLoader + pyav-seq"]
    for r in (route, dali, seek, seq):
        assert r["clips"] == 4 and r["cpu_ms_per_clip"] > 0 and r["clips_per_s"] > 0, r
    # GOP 8, 4 segments over 32-48 frames: sequential decodes most, the route (NONREF skip) least
    assert 1 <= route["decoded_per_kept"] <= seek["decoded_per_kept"] < seq["decoded_per_kept"]
    # DALI's decoder gets the trimmed GOPs (data.trim on): never more than a sequential decode
    assert dali["decoded_note"] == "computed" and 1 <= dali["decoded_per_kept"] < seq["decoded_per_kept"]
    names = [r["name"] for r in doc["results"] if r["kind"] == "baseline" and not r["error"]]
    assert doc["best_baseline_cpu_ms"] in names and doc["best_baseline_clips_per_s"] in names


def test_profiler_frame_folders_against_pil(dataset, tmp_path, capsys):
    """The frame-folder route against the plain PIL DataLoader; a video baseline on frames is rc 2."""
    from dali_pipes.profile import main, pin

    for v in range(2):
        (tmp_path / f"f{v}").mkdir()
        for k in range(12):
            Image.fromarray(frame_content(k, W, H, v)).save(tmp_path / f"f{v}/{k + 1:05d}.jpg")
    (tmp_path / "list.txt").write_text("f0 12 0\nf1 12 1\n")
    config = tmp_path / "p.yaml"
    config.write_text(f"data:\n  train_list: {tmp_path / 'list.txt'}\n  source: frames\n  device: cpu\n"
                      "  input_size: 32\n  batch_size: 2\n  num_workers: 1\n  num_threads: 1\n")  # fmt: skip
    out_json = tmp_path / "bench.json"
    cores = os.sched_getaffinity(0)
    try:
        args = [str(config), "--batches", "2", "--warmup", "1", "--cores", "0", "--data.num_segments=4",
                "--model.num_segments=4", "--json", str(out_json)]  # fmt: skip
        rc = main([*args, "--baseline", "pil"])
        assert main([*args, "--baseline", "pyav"]) == 2
    finally:
        pin(cores)
    captured = capsys.readouterr()
    assert rc == 0, captured.out
    assert "--baseline pyav-seek: not for data.source: frames" in captured.err
    rows = {r["name"]: r for r in json.loads(out_json.read_text())["results"]}
    for name in ("DALI cpu (JPEG folders)", "DataLoader + pil (1 workers)"):  # tiny: CPU time may read 0
        assert rows[name]["clips"] == 4 and rows[name]["cpu_ms_per_clip"] >= 0 and not rows[name]["error"]


def test_dali_cpu_decoder_rejects_h264_by_name(tmp_path, ffmpeg_available):
    write_clip(tmp_path / "a.mp4", 32, W, H, codec="h264")
    (tmp_path / "list.txt").write_text("a.mp4 32 0\n")
    with pytest.raises(ClipLoadError, match=r"list.txt:1: .*a.mp4: codec h264 .*cpu_decoder: pyav"):
        collect(build_loader(cfg(tmp_path, cpu_decoder="dali", batch_size=1), "val"))
    loader = build_loader(cfg(tmp_path, batch_size=1), "val")  # the PyAV route decodes H.264
    assert len(collect(loader)) == 1
    loader.close()


@pytest.mark.gpu
def test_gpu_shapes_and_devices(nvdec_dataset):
    views = EvalConfig(spatial_crops=3, temporal_clips=2, temporal_mode="uniform", batch_size=3)
    for mode, kw, v, shape in [("train", dict(layout="NCTHW", dtype="bfloat16"), None, (2, 3, 8, 32, 32)),
                               ("test", dict(), views, (3, 6, 8, 3, 32, 32))]:  # fmt: skip
        loader = build_loader(cfg(nvdec_dataset, device="gpu", **kw), mode, views=v, device_id=0)
        batch = next(iter(loader))
        loader.close()
        assert tuple(batch["clips"].shape) == shape and batch["clips"].is_cuda and batch["labels"].is_cuda


def test_held_batches_are_never_overwritten(dataset):
    """The CPU route hands out DALI's own output memory (no copy): batches kept by the caller stay as
    they were while the loader runs two more epochs (a reuse of that memory would change them)."""
    loader = build_loader(cfg(dataset, seed=3, num_workers=2, prefetch=2), "train")
    held = list(loader)  # the batches themselves, not copies
    snapshot = [{k: v.clone() for k, v in b.items()} for b in held]
    later = collect(loader, epochs=2)
    loader.close()
    assert same_batches(held, snapshot)
    assert not same_batches(later[: len(held)], snapshot)  # epoch 1 differs: the memory was live


def test_worker_resize_matches_the_graphs_resize(dataset, monkeypatch):
    """The PyAV route crops and resizes training clips in its workers (augment.crop_resize, torch's
    antialiased bilinear); the same batches with DALI's fn.resize in the graph differ by at most one
    pixel value inside the crop (multi-scale crops of 64x48 frames resized to 32 px, so the filter really
    works). Only the outer two rows and columns differ more: DALI's filter reads pixels beyond the crop
    there, crop_resize (as the official TSN/TSM code: crop, then resize) does not."""
    from dali_pipes.source import ClipSource

    data = cfg(dataset, seed=4, num_workers=2, **RAW)
    loader = build_loader(data, "train")
    assert loader.source.resizes
    ours = collect(loader)
    loader.close()
    monkeypatch.setattr(ClipSource, "resizes", property(lambda self: False))
    graph = build_loader(data, "train")
    assert not graph.source.resizes
    theirs = collect(graph)
    graph.close()
    assert len(ours) == len(theirs) == 4
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["ids"], b["ids"])
        diff = (a["clips"] - b["clips"]).abs()
        assert float(diff[..., 2:-2, 2:-2].max()) <= 1.0 + 1e-4 and float(diff.mean()) < 0.1


def test_crop_resize_is_dalis_resize_within_one():
    """augment.crop_resize against fn.resize on natural-looking content (smooth gradients plus noise),
    several whole-pixel crops down- and upscaled: within one pixel value inside the crop (see above for
    the border); identity crops are copied exactly."""
    from nvidia.dali import fn, pipeline_def

    from dali_pipes.augment import crop_resize

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:90, 0:120]
    base = np.stack([xx * 2, yy * 2, (xx + yy)], axis=-1) % 256
    frames = np.clip(base[None] + rng.normal(0, 20, (3, 90, 120, 3)), 0, 255).astype(np.uint8)
    boxes = [(0, 0, 90, 90), (13, 7, 70, 61), (30, 0, 90, 90), (5, 5, 40, 40)]  # x0, y0, w, h
    for size in (32, 64):
        rois = [np.array([y0 / 90, x0 / 120, (y0 + h) / 90, (x0 + w) / 120], np.float32)
                for x0, y0, w, h in boxes]  # fmt: skip

        @pipeline_def(enable_conditionals=False)
        def graph(rois: list, size: int):
            f = fn.external_source(source=lambda: [frames] * len(rois), batch=True, layout="FHWC")
            r = fn.external_source(source=lambda: rois, batch=True)
            return fn.resize(f, size=[size, size], roi_start=r[0:2], roi_end=r[2:4], roi_relative=True)

        pipe = graph(rois, size, batch_size=len(rois), num_threads=1, device_id=None)
        pipe.build()
        (out,) = pipe.run()
        for k, roi in enumerate(rois):
            ours = crop_resize(frames, roi, size)
            assert ours.shape == (3, size, size, 3) and ours.dtype == np.uint8
            diff = np.abs(ours.astype(int) - np.array(out[k]).astype(int))[:, 2:-2, 2:-2]
            assert diff.max() <= 1 and diff.mean() < 0.3, (size, boxes[k], diff.max(), diff.mean())
    x0, y0 = 10, 20
    exact = crop_resize(frames, np.array([y0 / 90, x0 / 120, (y0 + 32) / 90, (x0 + 32) / 120]), 32)
    assert np.array_equal(exact, frames[:, y0 : y0 + 32, x0 : x0 + 32])


@pytest.mark.parametrize("kind", ["h264_yuv444_bframes", "vp9_10bit", "h264_audio_first"])
def test_open_without_probe_decode_keeps_the_real_format(tmp_path, ffmpeg_available, kind):
    """decode_frames opens H.264/HEVC/VP8/VP9 telling FFmpeg's stream probe a pixel format, so the probe
    does not decode a frame; the decoder still takes the real one from the bitstream: 4:4:4, 10-bit and
    an audio stream before the video give the straight decode's pixels."""
    from dali_pipes.packet_index import build_video_index
    from dali_pipes.video_io import PROBE_WITHOUT_DECODING, _open

    src = ["-f", "lavfi", "-i", f"testsrc=size={W}x{H}:rate=25:duration=1.44"]  # 36 frames
    if kind == "h264_yuv444_bframes":
        if "libx264" not in av.codecs_available:
            pytest.skip("PyAV's FFmpeg has no libx264 encoder")
        path, out = tmp_path / "a.mp4", ["-c:v", "libx264", "-pix_fmt", "yuv444p", "-bf", "3", "-g", "12"]
    elif kind == "vp9_10bit":
        path = tmp_path / "a.webm"
        out = ["-c:v", "libvpx-vp9", "-pix_fmt", "yuv420p10le", "-deadline", "realtime", "-cpu-used", "8",
               "-g", "12"]  # fmt: skip
    else:
        path = tmp_path / "a.mkv"
        src = ["-f", "lavfi", "-i", "sine=duration=2", *src]
        out = ["-map", "0:a", "-map", "1:v", "-c:a", "flac", "-c:v", "libx264", "-pix_fmt", "yuv420p",
               "-bf", "2", "-g", "12"]  # fmt: skip
    subprocess.run(["ffmpeg", "-v", "error", *src, *out, str(path)], check=True, timeout=120)
    index = build_video_index(str(path))
    assert index.codec in PROBE_WITHOUT_DECODING
    with _open(str(path), index.codec) as container:  # the probe was told yuv420p ...
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"
        real = next(container.decode(video=0)).format.name  # ... the frames carry their own format
    assert real == {"h264_yuv444_bframes": "yuv444p", "vp9_10bit": "yuv420p10le"}.get(kind, "yuv420p")
    ref = decode_all(str(path))
    rng = np.random.default_rng(2)
    for want in [np.arange(len(ref))] + [rng.integers(0, len(ref), 8) for _ in range(4)]:
        assert np.array_equal(decode_frames(str(path), want, index), ref[want]), want
