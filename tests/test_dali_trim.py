"""GOP trimming and the persistent packet index.

Trimmed bitstreams must decode, through DALI's CPU decoder, to exactly the frames the whole file
gives (VP9, MJPEG; every sampling mode and test views); H.264 with B-frames is checked with PyAV
(DALI's CPU decoder has no H.264); bad indexes name the file (and the list line in the loader); the
list's index file is reused while current and rebuilt when a video changes.
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
from conftest import write_clip
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


@pytest.mark.gpu
@pytest.mark.parametrize("codec", ["h264_bframes", "vp9"])
def test_gpu_batches_identical_with_trim_on_and_off(tmp_path, ffmpeg_available, codec):
    """NVDEC (`data.device: gpu`) decodes the trimmed Matroska to the same clips as the whole file."""
    lines = []
    for i in range(4):
        if codec == "vp9":
            write_clip(tmp_path / f"v{i}.webm", 60, W * 2, H * 2, gop=12, seed=i)
            name = f"v{i}.webm"
        else:
            name = Path(_bframe_clip(tmp_path / f"v{i}.mp4")).name
        lines.append(f"{name} 60 {i % 2}")
    list_path = tmp_path / "list.txt"
    list_path.write_text("\n".join(lines) + "\n")
    batches = {}
    for trim_on in ("on", "off"):
        loader = build_loader(loader_cfg(list_path, device="gpu", trim=trim_on), "train", device_id=0)
        batches[trim_on] = [b["clips"].cpu().clone() for b in loader]
        loader.close()
    assert len(batches["on"]) == 2
    assert all(torch.equal(a, b) for a, b in zip(batches["on"], batches["off"], strict=True))


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
    append = packet_index._append

    def read_only_folder(path, records, seal):
        if Path(path).parent == tmp_path:
            raise PermissionError(13, "Permission denied", str(path))
        append(path, records, seal)

    monkeypatch.setattr(packet_index, "_append", read_only_folder)
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
