"""prep.audit and the dataset fingerprint on small generated clips (64x48, 48 frames).

The cost the audit predicts from the packet index must be what the routes really decode: the PyAV
route's decoder count (decode_frames' stats, and the profiler's replay) and the DALI figure the profiler
computes.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import write_clip

from dali_pipes.fingerprint import list_fingerprint
from dali_pipes.packet_index import PacketIndex, index_path_for
from dali_pipes.profile import decoded_per_kept
from dali_pipes.sampling import clip_indices
from dali_pipes.video_io import decode_frames
from engine.config import DataConfig, load_config
from prep import audit, resize

FRAMES = 48
X264 = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]


def x264(path: Path, *opts: str, vf: str = "") -> str:
    """testsrc through libx264 with the given options (vf: a filter such as setpts for VFR)."""
    cmd = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=25",
           "-frames:v", str(FRAMES), *(["-vf", vf, "-fps_mode", "passthrough"] if vf else []), *X264, *opts,
           str(path)]  # fmt: skip
    subprocess.run(cmd, check=True)
    return path.name


@pytest.fixture(scope="module")
def clips(tmp_path_factory, ffmpeg_available) -> Path:
    root = tmp_path_factory.mktemp("audit")
    names = [
        x264(root / "intra.mp4", "-g", "1"),  # every frame an IDR
        x264(root / "bframes.mp4", "-g", "12", "-keyint_min", "12", "-sc_threshold", "0", "-bf", "2"),
        x264(root / "open.mp4", "-g", "12", "-bf", "3", "-x264-params", "open-gop=1"),
        x264(root / "vfr.mp4", "-g", "12", vf="setpts='if(lt(N,24),N*0.04/TB,(0.96+(N-24)*0.1)/TB)'"),
        write_clip(root / "vp9.webm", FRAMES, 64, 48, gop=8).name,
        write_clip(root / "mjpeg.avi", FRAMES, 64, 48, codec="mjpeg", gop=1).name,
    ]
    (root / "list.txt").write_text("".join(f"{n} {FRAMES} {i % 3}\n" for i, n in enumerate(names)))
    return root


def table(root: Path, *overrides: str, draws: int = 0):
    cfg = load_config(None, ["data.device=cpu", *overrides])
    return audit.audit_table(str(root / "list.txt"), cfg, jobs=1, draws=draws, quiet=True).set_index("path")


def test_gop1_costs_exactly_one_and_stream_facts(clips):
    t = table(clips)
    for name in ("intra.mp4", "mjpeg.avi"):
        assert (t.loc[name, list(audit.COST_COLUMNS)] == 1.0).all(), t.loc[name]
        assert t.loc[name, "keyint_max"] == 1 and t.loc[name, "b_frames"] == 0
    b = t.loc["bframes.mp4"]
    assert b["b_frames"] > 0 and not b["open_gop"] and b["keyint_max"] == 12 and b["codec"] == "h264"
    assert 1.0 < b["pyav_train"] < b["dali_train"]  # PyAV skips the unreferenced B-frames, DALI cannot
    o = t.loc["open.mp4"]
    assert o["open_gop"] and o["b_frames"] > 0
    assert o["keyint_max"] == FRAMES  # decoding can start only at the one IDR: recovery I-frames do not count
    assert t.loc["vfr.mp4", "vfr"] and not t[t.index != "vfr.mp4"]["vfr"].any()
    assert t.loc["vp9.webm", "keyint_max"] == 8 and t.loc["vp9.webm", "fps"] == 25.0
    assert (t["problem"] == "").all() and (t[["width", "height"]] == [64, 48]).all().all()


@pytest.mark.parametrize("split", ["train", "test"])
def test_predicted_cost_is_what_the_pyav_route_decodes(clips, split):
    """Same draws (epochs 0..3): the audit's prediction equals the decoder's own count, per video."""
    t = table(clips, "eval.temporal_clips=2", draws=4)
    opts_cfg = load_config(None, ["data.device=cpu", "eval.temporal_clips=2"])
    from dali_pipes.loader import sampling_options

    opts = sampling_options(opts_cfg.data, opts_cfg.eval)
    index = PacketIndex(index_path_for(clips / "list.txt"))
    for sid, line in enumerate((clips / "list.txt").read_text().splitlines()):
        name = line.rsplit(maxsplit=2)[0]
        path = str(clips / name)
        stats: dict = {}
        for epoch in range(4):
            idx = clip_indices(FRAMES, split, opts, 0, epoch, sid).ravel()
            decode_frames(path, idx, index.get(path), stats=stats)
        assert t.loc[name, f"pyav_{split}"] == pytest.approx(stats["decoded"] / stats["kept"], rel=1e-9), name


def test_audit_matches_the_profiler_within_2_percent(clips):
    """The profiler's counts over one epoch of the list (PyAV: decoded by the route; DALI: computed)."""
    data = DataConfig(train_list=str(clips / "list.txt"), device="cpu", batch_size=2, num_workers=1)
    t = table(clips, draws=1)  # the profiler replays epoch 0
    pyav, _ = decoded_per_kept(data, "route:pyav", 6)
    dali, _ = decoded_per_kept(data, "route:bytes", 6)
    assert t["pyav_train"].mean() == pytest.approx(pyav, rel=0.02)
    assert t["dali_train"].mean() == pytest.approx(dali, rel=0.02)


def test_cli_writes_csv_plot_and_an_expensive_list_resize_accepts(clips, tmp_path, capsys):
    listed = str(clips / "list.txt")
    out = tmp_path / "expensive.txt"
    assert audit.main([listed, "--data.device=cpu", "--jobs", "1", "--quiet", "--expensive-list", str(out),
                       "--above", "1.5"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "most expensive videos" in text and "wrote" in text
    csv = Path(f"{listed}.audit.csv").read_text().splitlines()
    assert len(csv) == 7 and csv[0].startswith("line,path,")
    assert Path(f"{listed}.audit.png").read_bytes()[:4] == b"\x89PNG"
    chosen = sorted(Path(p).name for p in out.read_text().splitlines())
    assert chosen and "intra.mp4" not in chosen and "mjpeg.avi" not in chosen
    dst = tmp_path / "dst"
    args = [str(clips), str(dst), "--only", str(out), "--jobs", "1", "--quiet", "--gop", "4"]
    assert resize.main(args) == 0
    assert sorted(p.stem for p in dst.glob("*.mp4")) == sorted(Path(c).stem for c in chosen)
    (tmp_path / "bad.txt").write_text("nowhere.mp4\n")
    with pytest.raises(resize.UserError, match=r"bad.txt:1: nowhere.mp4 is not a video under"):
        resize.main([str(clips), str(tmp_path / "dst2"), "--only", str(tmp_path / "bad.txt")])


def test_fingerprint_is_stable_and_changes_with_one_byte_or_one_line(clips, tmp_path, capsys):
    work = tmp_path / "copy"
    work.mkdir()
    for p in clips.iterdir():
        if p.suffix in (".mp4", ".webm", ".avi"):
            (work / p.name).write_bytes(p.read_bytes())
    lines = (clips / "list.txt").read_text()
    (work / "list.txt").write_text(lines)
    first = list_fingerprint(work / "list.txt")
    Path(index_path_for(work / "list.txt")).unlink()  # rebuilt from scratch: the same
    assert list_fingerprint(work / "list.txt") == first
    assert audit.main([str(work / "list.txt"), "--fingerprint"]) == 0
    assert capsys.readouterr().out.strip() == first.line()
    assert first.videos == 6 and first.classes == 3 and first.bad == 0
    # one list line: a label changed
    (work / "list.txt").write_text(lines.replace(f"intra.mp4 {FRAMES} 0", f"intra.mp4 {FRAMES} 2"))
    assert list_fingerprint(work / "list.txt").digest != first.digest
    (work / "list.txt").write_text(lines)
    assert list_fingerprint(work / "list.txt").digest == first.digest
    # one byte inside one packet's payload (same size: only the payload CRC sees it)
    video = work / "bframes.mp4"
    packets = PacketIndex(index_path_for(work / "list.txt")).get(str(video)).packets
    at = int(packets["offset"][5] + packets["size"][5] // 2)
    data = bytearray(video.read_bytes())
    data[at] ^= 0xFF
    video.write_bytes(bytes(data))
    changed = list_fingerprint(work / "list.txt")
    assert changed.digest != first.digest and changed.videos == 6
    # the sampler and eval protocol are part of the line, not of the data digest
    other = list_fingerprint(work / "list.txt", DataConfig(num_segments=16))
    assert other.digest == changed.digest and "T=16" in other.line()


def test_bad_input_is_one_line_and_rc_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        audit.run_cli(audit.main, [str(tmp_path / "none.txt"), "--fingerprint"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none.txt: list file not found" in err[0]
