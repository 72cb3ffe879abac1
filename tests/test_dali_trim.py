"""GOP trimming and the persistent packet index.

Trimmed bitstreams must decode, through DALI's CPU decoder, to exactly the frames the whole file
gives (VP9, MJPEG; every sampling mode and test views); H.264 with B-frames is checked with PyAV
(DALI's CPU decoder has no H.264); bad indexes name the file (and the list line in the loader); the
list's index file is reused while current and rebuilt when a video changes. H.264, HEVC and VP9 run
through the loader on the GPU route (NVDEC-legal clips, see conftest) and on their CPU twins, trim on
and off.
"""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import assert_sampled_frames, clip_size, write_clip
from nvidia.dali import fn, pipeline_def

from dali_pipes.loader import build_loader, sampling_options
from dali_pipes.packet_index import PacketIndex, build_video_index, index_path_for
from dali_pipes.sampling import clip_indices
from dali_pipes.source import ClipLoadError
from dali_pipes.trim import TrimError, trim
from dali_pipes.video_io import VideoReadError, decode_all
from engine.config import DataConfig, EvalConfig
from prep.common import write_packet_index

W, H = 64, 48

# (data fields, eval fields): every sampling mode, snippets, several clips and crops in test
MODES = {
    "uniform": ({}, {"temporal_clips": 2}),
    "uniform_snippets": ({"num_segments": 4, "snippet_len": 5}, {"temporal_clips": 3}),
    "dense": ({"sampling": "dense", "dense_window": 32}, {"temporal_clips": 2}),
    "clip3d": ({"sampling": "clip3d", "clip_len": 8, "frame_interval": 3}, {"temporal_clips": 2}),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory, ffmpeg_available) -> dict[str, list[str]]:
    """Per codec: a 70-frame GOP 8 clip, a 5-frame clip (F < T) and a 33-frame GOP 16 clip."""
    root = tmp_path_factory.mktemp("trim")
    out = {}
    for codec, ext in (("vp9", "webm"), ("mjpeg", "avi")):
        out[codec] = [
            str(write_clip(root / f"{codec}_long.{ext}", 70, W, H, codec=codec, gop=8, seed=1)),
            str(write_clip(root / f"{codec}_short.{ext}", 5, W, H, codec=codec, gop=8, seed=2)),
            str(write_clip(root / f"{codec}_mid.{ext}", 33, W, H, codec=codec, gop=16, seed=3)),
        ]
    return out


def dali_decode(samples: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """DALI's CPU video decoder on (encoded bytes, frame indices) samples, one batch."""

    @pipeline_def(batch_size=len(samples), num_threads=1, device_id=None, exec_dynamic=True)
    def pipe():
        encoded = fn.external_source(name="encoded", batch=False, layout="")
        frames = fn.external_source(name="frames", batch=False, layout="")
        return fn.decoders.video(encoded, frames=frames, device="cpu")

    p = pipe()
    p.build()
    p.feed_input("encoded", [s[0] for s in samples])
    p.feed_input("frames", [s[1].astype(np.int32) for s in samples])
    (out,) = p.run()
    return [np.array(out[i]) for i in range(len(samples))]


@pytest.mark.parametrize("codec", ["vp9", "mjpeg"])
@pytest.mark.parametrize("mode", list(MODES))
def test_trimmed_equals_untrimmed_through_dali(clips, codec, mode):
    data_kw, eval_kw = MODES[mode]
    opts = sampling_options(DataConfig(**data_kw), EvalConfig(**eval_kw))
    whole, trimmed = [], []
    for path in clips[codec]:
        index = build_video_index(path)
        raw = np.fromfile(path, np.uint8)
        for split in ("train", "val", "test"):
            for sid in range(2):
                indices = clip_indices(index.num_frames, split, opts, 0, 0, sid).ravel()
                whole.append((raw, indices))
                trimmed.append(trim(path, index, indices))
    # hand-picked: repeats, unsorted, the first and last frame, one frame per GOP
    path = clips[codec][0]
    index = build_video_index(path)
    raw = np.fromfile(path, np.uint8)
    for indices in ([69, 0, 69, 3, 3, 40], [7, 8, 15, 16, 17], list(range(0, 70, 8))):
        whole.append((raw, np.array(indices)))
        trimmed.append(trim(path, index, np.array(indices)))
    for a, b in zip(dali_decode(whole), dali_decode(trimmed), strict=True):
        assert a.shape == b.shape and np.array_equal(a, b)
    # trimming really drops data on the long clip: the first frame of every GOP needs only its keyframe
    data, remapped = trim(path, index, np.arange(0, 70, 8))
    assert len(data) < 0.5 * len(raw) and remapped.tolist() == list(range(9))


def _bframe_clip(path: Path, codec: str = "h264", open_gop: bool = False) -> str:
    """60 frames, GOP 12 with 3 B-frames; closed GOPs (IDR keyframes) unless open_gop."""
    gop = "open-gop=1" if open_gop else "open-gop=0"
    encoder = {"h264": ["-c:v", "libx264", "-bf", "3", "-g", "12", "-keyint_min", "12", "-sc_threshold", "0",
                        "-x264-params", gop],
               "hevc": ["-c:v", "libx265", "-x265-params",
                        f"log-level=error:keyint=12:min-keyint=12:bframes=3:scenecut=0:{gop}"]}[codec]
    cmd = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc=size={W}x{H}:rate=25",
           "-frames:v", "60", *encoder, str(path)]  # fmt: skip
    subprocess.run(cmd, check=True)
    return str(path)


@pytest.mark.parametrize("codec,container", [("h264", "mp4"), ("h264", "mkv"), ("hevc", "mp4")])
def test_bframes_trimmed_decodes_to_the_wanted_frames(tmp_path, ffmpeg_available, codec, container):
    """H.264/HEVC with B-frames (DALI's CPU decoder has neither): FFmpeg decodes the trimmed file."""
    path = _bframe_clip(tmp_path / f"b.{container}", codec)
    index = build_video_index(path)
    packets = index.packets
    assert (packets["pts"] != packets["dts"]).any(), "the clip should have reordered (B) frames"
    ref = decode_all(path)
    assert len(ref) == index.num_frames == 60
    rng = np.random.default_rng(0)
    picks = [rng.integers(0, 60, size=8) for _ in range(6)] + [np.array([59, 1, 1, 13, 12, 11, 0])]
    for indices in picks:
        data, remapped = trim(path, index, indices)
        with av.open(io.BytesIO(data.tobytes())) as c:
            got = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        assert np.array_equal(got[remapped], ref[indices])
        assert len(got) < len(ref) or indices.max() >= 48  # only the needed GOPs were kept


def test_hevc_open_gop_is_refused_naming_prep_resize(tmp_path, ffmpeg_available):
    """CRA keyframes with leading pictures that reference the previous GOP cannot start a range."""
    path = _bframe_clip(tmp_path / "open.mkv", "hevc", open_gop=True)
    index = build_video_index(path)
    assert len(index.keyframes) > 1  # CRA pictures are IRAP: real keyframes
    with pytest.raises(TrimError, match=r"open GOP.*python -m prep.resize"):
        trim(path, index, np.arange(20, 28))


def test_h264_recovery_point_keyframes_are_not_trusted(tmp_path, ffmpeg_available):
    """x264's open GOPs flag non-IDR I-frames as keyframes in the container; as in DALI's own index,
    only IDR pictures count, so trimming goes back to the IDR and stays exact."""
    path = _bframe_clip(tmp_path / "open.mp4", "h264", open_gop=True)
    with av.open(path) as c:
        assert sum(p.is_keyframe for p in c.demux(video=0) if p.size) > 1
    index = build_video_index(path)
    assert index.keyframes == [0]
    ref = decode_all(path)
    indices = np.array([50, 20, 21, 33])
    data, remapped = trim(path, index, indices)
    with av.open(io.BytesIO(data.tobytes())) as c:
        got = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert np.array_equal(got[remapped], ref[indices])


def test_no_timestamps_and_empty_index_are_named(tmp_path, ffmpeg_available):
    raw = tmp_path / "raw.h264"  # an Annex B elementary stream: packets carry no timestamps
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"testsrc=size={W}x{H}:rate=25",
                    "-frames:v", "10", "-c:v", "libx264", "-bf", "2", "-f", "h264", str(raw)],
                   check=True)  # fmt: skip
    with pytest.raises(VideoReadError, match=r"raw.h264: packet 0 has no timestamp"):
        build_video_index(str(raw))
    empty = tmp_path / "empty.avi"  # a valid container whose video stream has no packets
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"testsrc=size={W}x{H}:rate=25",
                    "-frames:v", "0", "-c:v", "mjpeg", str(empty)], check=True)  # fmt: skip
    with pytest.raises(VideoReadError, match=r"empty.avi: no decodable video frames \(empty packet index\)"):
        build_video_index(str(empty))
    ok = write_clip(tmp_path / "ok.webm", 20, W, H)
    (tmp_path / "list.txt").write_text("ok.webm 20 0\nempty.avi 10 1\n")
    data = DataConfig(val_list=str(tmp_path / "list.txt"), device="cpu", cpu_decoder="dali", batch_size=2,
                      num_threads=1, num_workers=1, prefetch=1, input_size=32, scale_size=32)  # fmt: skip
    why = r"no decodable video frames \(empty packet index\)"
    with pytest.raises(ClipLoadError, match=rf"list.txt:2: bad sample .*empty.avi: {why}"):
        list(build_loader(data, "val"))
    assert ok.exists()


def test_index_file_is_reused_and_rebuilt_when_a_video_changes(tmp_path, ffmpeg_available):
    paths = [str(write_clip(tmp_path / f"v{i}.webm", 20 + i, W, H, seed=i)) for i in range(3)]
    (tmp_path / "list.txt").write_text("".join(f"v{i}.webm {20 + i} 0\n" for i in range(3)))
    list_path = tmp_path / "list.txt"
    write_packet_index(list_path, paths, jobs=1, quiet=True)
    stored = index_path_for(list_path)
    assert stored.is_file()
    first = stored.stat().st_mtime_ns
    fresh = PacketIndex(stored)
    for p in paths:
        idx = fresh.get(p)
        assert idx.pts == build_video_index(p).pts and idx.num_frames == 20 + paths.index(p)
    assert fresh.builds == 0  # everything came from the file
    assert fresh.update(paths) == 0 and stored.stat().st_mtime_ns == first  # nothing to rewrite

    write_clip(Path(paths[1]), 30, W, H, seed=9)  # the video changes: size and mtime differ
    os.utime(paths[1], ns=(first + 10**9, first + 10**9))
    again = PacketIndex(stored)
    assert again.update(paths) == 1 and again.builds == 1
    reread = PacketIndex(stored)
    assert reread.get(paths[1]).num_frames == 30 and reread.get(paths[0]).num_frames == 20
    assert reread.builds == 0


def loader_cfg(list_path: Path, **kw) -> DataConfig:
    base = dict(train_list=str(list_path), val_list=str(list_path), device="cpu", cpu_decoder="dali",
                input_size=32, scale_size=40, batch_size=2, num_threads=1, num_workers=1, prefetch=1,
                mean=[0.0, 0.0, 0.0], std=[1 / 255] * 3)  # fmt: skip
    base.update(kw)
    return DataConfig(**base)


def test_workers_read_the_index_file_without_demuxing(tmp_path, ffmpeg_available, monkeypatch):
    for i in range(3):
        write_clip(tmp_path / f"v{i}.webm", 30, W, H, seed=i)
    list_path = tmp_path / "list.txt"
    list_path.write_text("".join(f"v{i}.webm 30 0\n" for i in range(3)))
    write_packet_index(list_path, [str(tmp_path / f"v{i}.webm") for i in range(3)], jobs=1, quiet=True)

    def no_demux(path: str):
        raise AssertionError(f"demuxed {path} although its index is stored")

    monkeypatch.setattr("dali_pipes.packet_index.build_video_index", no_demux)  # forked workers inherit it
    for decoder in ("dali", "pyav"):
        loader = build_loader(loader_cfg(list_path, cpu_decoder=decoder, num_workers=2), "val")
        assert sum(len(b["ids"]) for b in loader) == 3
        loader.close()


@pytest.mark.parametrize("mode", ["train", "test"])
def test_loader_batches_identical_with_trim_on_and_off(tmp_path, ffmpeg_available, mode):
    lines = []
    for i in range(4):
        n = (5, 40, 57, 33)[i]  # one shorter than T (F < T)
        write_clip(tmp_path / f"v{i}.webm", n, W, H, gop=8, seed=i)
        lines.append(f"v{i}.webm {n} {i % 2}")
    list_path = tmp_path / "list.txt"
    list_path.write_text("\n".join(lines) + "\n")
    views = EvalConfig(temporal_clips=2, spatial_crops=3, batch_size=2)
    batches = {}
    for trim_on in ("on", "off"):
        loader = build_loader(loader_cfg(list_path, trim=trim_on), mode, views=views)
        batches[trim_on] = [b["clips"].clone() for b in loader]
        loader.close()
    assert index_path_for(list_path).is_file()  # the loader's main process wrote the index
    assert len(batches["on"]) == len(batches["off"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(batches["on"], batches["off"], strict=True))


# codec -> (container, B-frames): H.264/HEVC as x264/x265 with 3 forced B-frames (reordered frames and an
# mp4 edit list, as in real Kinetics files); VP9 has no B-frames (libvpx realtime: no hidden alt-refs)
CODEC_CASES = {"h264": ("mp4", 3), "hevc": ("mp4", 3), "vp9": ("webm", None)}


def _codec_cases() -> list:
    """Each codec on the GPU route (NVDEC; skipped without CUDA) and as its CPU twin (runs in CI)."""
    gpu = [pytest.mark.gpu]
    return [pytest.param(device, codec, id=f"{device}-{codec}", marks=gpu if device == "gpu" else [])
            for codec in CODEC_CASES for device in ("gpu", "cpu")]  # fmt: skip


@pytest.mark.parametrize("device,codec", _codec_cases())
def test_codec_routes_decode_sampled_frames_with_trim_on_and_off(tmp_path, ffmpeg_available, device, codec):
    """One body for the GPU route and its CPU twin: 3 clips (GOP 12, B-frames for H.264/HEVC) give, with
    data.trim on and off, the same val clips, whose every frame is the sampled index's frame. gpu: NVDEC
    gets the (trimmed) Matroska or the whole file, clips of clip_size("gpu") (NVDEC's minimum); cpu:
    DALI's CPU decoder for VP9, the PyAV route (`cpu_decoder: pyav`, where data.trim does not apply) for
    H.264/HEVC, which DALI's CPU decoder lacks; small clips (clip_size("cpu"))."""
    width, height = clip_size(device)
    ext, bframes = CODEC_CASES[codec]
    lines, paths = [], []
    for i, n in enumerate((40, 29, 52)):
        paths.append(write_clip(tmp_path / f"v{i}.{ext}", n, width, height, codec=codec, gop=12, seed=i,
                                bframes=bframes))  # fmt: skip
        lines.append(f"v{i}.{ext} {n} {i % 2}")
    if bframes:
        packets = build_video_index(str(paths[0])).packets
        assert (packets["pts"] != packets["dts"]).any(), "the clip should have reordered (B) frames"
    list_path = tmp_path / "list.txt"
    list_path.write_text("\n".join(lines) + "\n")
    route = dict(device=device, cpu_decoder="dali" if codec == "vp9" else "pyav", num_segments=4,
                 input_size=height, scale_size=height)  # val: identity resize, centre crop of the frame
    tol = {"gpu": 8.0, "dali": 5.0, "pyav": 0.5}["gpu" if device == "gpu" else route["cpu_decoder"]]
    clips = {}
    for trim_on in ("on", "off"):
        data = loader_cfg(list_path, trim=trim_on, batch_size=3, **route)
        loader = build_loader(data, "val", device_id=0 if device == "gpu" else None)
        (batch,) = list(loader)
        loader.close()
        assert batch["ids"].tolist() == [0, 1, 2]
        clips[trim_on] = batch["clips"][:, 0].cpu()
        for sid, (clip, path) in enumerate(zip(clips[trim_on].numpy(), paths, strict=True)):
            ref = decode_all(str(path))
            want = clip_indices(len(ref), "val", loader.sampling, sample_id=sid)[0]
            assert_sampled_frames(clip, ref, want, x0=(width - height) // 2, tol=tol)
    assert torch.equal(clips["on"], clips["off"])


def test_prep_lists_and_validate_write_the_index(tmp_path, ffmpeg_available):
    from prep.lists import main as lists_main
    from prep.validate import main as validate_main

    root, out = tmp_path / "videos", tmp_path / "lists"
    for cls in ("a", "b"):
        for i in range(2):
            write_clip(root / cls / f"{cls}{i}.webm", 12 + i, W, H, seed=i)
    assert lists_main(["folders", "--root", str(root), "--out", str(out), "--quiet", "--jobs", "1"]) == 0
    videos = sorted(str(p) for p in root.rglob("*.webm"))
    index = PacketIndex(index_path_for(out / "all.txt"))
    assert [index.get(p).num_frames for p in videos] == [12, 13, 12, 13] and index.builds == 0

    (out / "all.txt").write_text((out / "all.txt").read_text() + "../videos/a/missing.webm 5 0\n")
    assert validate_main([str(out / "all.txt"), "--quiet", "--jobs", "1"]) == 1  # one bad line
    clean = PacketIndex(index_path_for(out / "all.clean.txt"))
    assert all(clean.get(p).num_frames > 0 for p in videos) and clean.builds == 0


def test_read_only_list_folder_puts_the_index_in_the_cache(tmp_path, ffmpeg_available, monkeypatch):
    import dali_pipes.packet_index as packet_index

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    paths = [str(write_clip(tmp_path / f"v{i}.webm", 20, W, H, seed=i)) for i in range(2)]
    list_path = tmp_path / "list.txt"
    save = packet_index._save

    def read_only_folder(path, items):
        if Path(path).parent == tmp_path:
            raise PermissionError(13, "Permission denied", str(path))
        save(path, items)

    monkeypatch.setattr(packet_index, "_save", read_only_folder)
    assert PacketIndex(index_path_for(list_path)).update(paths) == 2
    assert not index_path_for(list_path).exists()
    assert packet_index.cache_path_for(index_path_for(list_path)).is_file()
    again = PacketIndex(index_path_for(list_path))
    assert again.update(paths) == 0 and again.get(paths[1]).num_frames == 20 and again.builds == 0


def test_parallel_index_build_matches_serial(tmp_path, ffmpeg_available, monkeypatch):
    monkeypatch.setattr("dali_pipes.packet_index.PARALLEL_FROM", 2)
    paths = [str(write_clip(tmp_path / f"v{i}.webm", 10 + i, W, H, seed=i)) for i in range(3)]
    (tmp_path / "bad.webm").write_bytes(b"not a video")  # skipped here, reported per sample later
    index = PacketIndex(tmp_path / "list.txt.index")
    assert index.update([*paths, str(tmp_path / "bad.webm")], jobs=2) == 4
    stored = PacketIndex(tmp_path / "list.txt.index")
    for p in paths:
        a, b = stored.get(p), build_video_index(p)
        assert a.pts == b.pts and a.keyframes == b.keyframes and np.array_equal(a.packets, b.packets)
    assert stored.builds == 0
