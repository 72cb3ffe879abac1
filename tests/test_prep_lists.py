"""prep.lists: each builder on tiny fixtures in the official annotation formats."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import write_clip

from prep.common import UserError
from prep.lists import main


def read_list(path: Path) -> list[tuple[str, int, int]]:
    rows = []
    for line in path.read_text().splitlines():
        p, n, label = line.rsplit(maxsplit=2)
        rows.append((p, int(n), int(label)))
    return rows


def clip(path: Path, frames: int) -> Path:
    return write_clip(path, num_frames=frames, width=64, height=48, codec="mjpeg")


def write_jpeg_folder(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(1, count + 1):
        with av.open(str(folder / f"{i:05d}.jpg"), "w", format="image2") as c:
            s = c.add_stream("mjpeg", rate=1)
            s.width, s.height, s.pix_fmt = 16, 16, "yuvj420p"
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.full((16, 16, 3), i, np.uint8), format="rgb24")))
            c.mux(s.encode())
    return folder


def test_kinetics(ffmpeg_available, tmp_path: Path) -> None:
    ann, videos, out = tmp_path / "ann", tmp_path / "videos", tmp_path / "lists"
    ann.mkdir()
    (ann / "train.csv").write_text(
        "label,youtube_id,time_start,time_end,split,is_cc\n"
        "air drumming,abc-DEF_123,10,20,train,0\n"
        "abseiling,zzzzzzzzzzz,0,10,train,0\n"
        '"passing American football (in game)",gone_video_,5,15,train,0\n'
    )
    (ann / "validate.csv").write_text(
        "label,youtube_id,time_start,time_end,split\nabseiling,vvvvvvvvvvv,30,40,val\n"
    )
    clip(videos / "train" / "air_drumming" / "abc-DEF_123_000010_000020.avi", 9)
    clip(videos / "train" / "abseiling" / "zzzzzzzzzzz_000000_000010.avi", 7)
    write_clip(videos / "val" / "vvvvvvvvvvv_000030_000040.webm", num_frames=11, width=64, height=48)
    argv = ["kinetics", "--csv", str(ann / "train.csv"), str(ann / "validate.csv"), "--videos", str(videos)]
    assert main([*argv, "--out", str(out), "--jobs", "2", "--quiet"]) == 0

    classes = ["abseiling", "air drumming", "passing American football (in game)"]  # sorted names
    assert (out / "classes.txt").read_text().splitlines() == classes
    assert read_list(out / "train.txt") == [
        ("../videos/train/air_drumming/abc-DEF_123_000010_000020.avi", 9, 1),
        ("../videos/train/abseiling/zzzzzzzzzzz_000000_000010.avi", 7, 0),
    ]
    assert read_list(out / "val.txt") == [("../videos/val/vvvvvvvvvvv_000030_000040.webm", 11, 0)]
    with open(out / "missing.csv", newline="") as f:
        missing = list(csv.DictReader(f))
    assert [(r["label"], r["youtube_id"], r["time_start"]) for r in missing] == [
        ("passing American football (in game)", "gone_video_", "5")
    ]

    (ann / "test.csv").write_text("youtube_id,time_start,time_end,split\nabc,0,10,test\n")
    with pytest.raises(UserError, match=r"test\.csv:1: missing column\(s\) label"):
        main(["kinetics", "--csv", str(ann / "test.csv"), "--videos", str(videos), "--out", str(out)])


def test_kinetics_classes_file_fixes_the_ids_of_a_val_only_run(ffmpeg_available, tmp_path, capsys) -> None:
    videos, out = tmp_path / "videos", tmp_path / "lists"
    val = tmp_path / "validate.csv"
    val.write_text("label,youtube_id,time_start,time_end,split\nair drumming,vvvvvvvvvvv,30,40,val\n")
    clip(videos / "vvvvvvvvvvv_000030_000040.avi", 5)
    argv = ["kinetics", "--csv", str(val), "--videos", str(videos), "--out", str(out), "--quiet",
            "--jobs", "1"]  # fmt: skip
    assert main(argv) == 0  # alone, the only class gets id 0, whatever the full run gave it
    assert "warning: class ids are the positions of the 1 label names" in capsys.readouterr().err
    assert read_list(out / "val.txt")[0][2] == 0

    classes = tmp_path / "classes.txt"  # as the full run wrote it
    classes.write_text("abseiling\nair drumming\npassing American football (in game)\n")
    assert main([*argv, "--classes", str(classes)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert read_list(out / "val.txt")[0][2] == 1
    assert (out / "classes.txt").read_text() == classes.read_text()

    classes.write_text("abseiling\nair drums\n")
    with pytest.raises(UserError, match=r"csv:2: label 'air drumming' is not in .*did you mean 'air drums'"):
        main([*argv, "--classes", str(classes)])
    classes.write_text("a\nb\na\n")
    with pytest.raises(UserError, match=r"classes.txt: class 'a' appears more than once"):
        main([*argv, "--classes", str(classes)])


def test_sthv2(ffmpeg_available, tmp_path: Path) -> None:
    ann, videos, out = tmp_path / "ann", tmp_path / "20bn-something-something-v2", tmp_path / "lists"
    ann.mkdir()
    labels = {"Pushing something from left to right": "1", "Holding something next to something": "0"}
    (ann / "something-something-v2-labels.json").write_text(json.dumps(labels))

    def entry(vid: str, template: str) -> dict:
        return {"id": vid, "label": template.replace("[something]", "a cup"), "template": template,
                "placeholders": ["a cup"]}  # fmt: skip

    train = [entry("101", "Pushing [something] from left to right"),
             entry("102", "Holding [something] next to [something]"),
             entry("103", "Holding [something] next to [something]")]  # fmt: skip
    (ann / "something-something-v2-train.json").write_text(json.dumps(train))
    (ann / "something-something-v2-validation.json").write_text(
        json.dumps([entry("201", "Pushing [something] from left to right")])
    )
    for vid, frames in (("101", 6), ("102", 8), ("201", 5)):  # 103 was never downloaded
        write_clip(videos / f"{vid}.webm", num_frames=frames, width=64, height=48)
    argv = ["sthv2", "--annotations", str(ann), "--videos", str(videos), "--out", str(out), "--quiet"]
    assert main([*argv, "--jobs", "1"]) == 0
    assert (out / "classes.txt").read_text().splitlines() == [
        "Holding something next to something", "Pushing something from left to right"]  # fmt: skip
    prefix = "../20bn-something-something-v2"
    assert read_list(out / "train.txt") == [(f"{prefix}/101.webm", 6, 1), (f"{prefix}/102.webm", 8, 0)]
    assert read_list(out / "val.txt") == [(f"{prefix}/201.webm", 5, 1)]
    report = (out / "lists-report.tsv").read_text()
    assert "entry 2" in report and "103" in report

    train.append(entry("104", "Pushing [something] from left to rigth"))
    (ann / "something-something-v2-train.json").write_text(json.dumps(train))
    with pytest.raises(UserError, match="entry 3.*did you mean 'Pushing something from left to right'"):
        main(argv)


def test_sthv1_frame_folders(tmp_path: Path) -> None:
    ann, frames, out = tmp_path / "ann", tmp_path / "20bn-something-something-v1", tmp_path / "lists"
    ann.mkdir()
    (ann / "something-something-v1-labels.csv").write_text("Tearing something\nDropping something\n")
    (ann / "something-something-v1-train.csv").write_text("11;Tearing something\n12;Dropping something\n")
    (ann / "something-something-v1-validation.csv").write_text(
        "21;Dropping something\n22;Tearing something\n"
    )
    write_jpeg_folder(frames / "11", 4)
    write_jpeg_folder(frames / "12", 3)
    write_jpeg_folder(frames / "21", 5)
    (frames / "22").mkdir()  # an empty folder: zero frames, reported
    argv = ["sthv1", "--annotations", str(ann), "--frames", str(frames), "--out", str(out), "--quiet"]
    assert main([*argv, "--jobs", "2"]) == 0
    assert (out / "classes.txt").read_text().splitlines() == ["Dropping something", "Tearing something"]
    prefix = "../20bn-something-something-v1"
    assert read_list(out / "train.txt") == [(f"{prefix}/11", 4, 1), (f"{prefix}/12", 3, 0)]
    assert read_list(out / "val.txt") == [(f"{prefix}/21", 5, 0)]
    assert "zero frames" in (out / "lists-report.tsv").read_text()

    (ann / "something-something-v1-train.csv").write_text("11;Tearing something\n12,Dropping something\n")
    with pytest.raises(UserError, match=r"train\.csv:2: expected 'id;label'"):
        main(argv)


def test_folders_layouts(ffmpeg_available, tmp_path: Path) -> None:
    root, out = tmp_path / "ucf", tmp_path / "lists"
    for cls, n in (("Biking", 4), ("Archery", 2)):
        for i in range(n):
            clip(root / cls / f"v_{cls}_g{i:02d}.avi", 5 + i)
    write_jpeg_folder(root / "Archery" / "frames_clip", 3)
    (root / "Archery" / "readme.txt").write_text("not a video")
    assert main(["folders", "--root", str(root), "--out", str(out), "--quiet", "--jobs", "2"]) == 0
    assert (out / "classes.txt").read_text().splitlines() == ["Archery", "Biking"]
    rows = read_list(out / "all.txt")
    assert ("../ucf/Archery/frames_clip", 3, 0) in rows and ("../ucf/Biking/v_Biking_g03.avi", 8, 1) in rows
    assert len(rows) == 7

    split_out = tmp_path / "split"
    argv = ["folders", "--root", str(root), "--out", str(split_out), "--val-fraction", "0.5", "--quiet"]
    assert main(argv) == 0
    train, val = read_list(split_out / "train.txt"), read_list(split_out / "val.txt")
    assert sorted(train + val) == sorted(rows) and not set(train) & set(val)
    assert [sum(r[2] == label for r in val) for label in (0, 1)] == [2, 2]  # half of 3 (rounded) and of 4
    first = (split_out / "val.txt").read_text()
    assert main(argv) == 0 and (split_out / "val.txt").read_text() == first  # same seed, same split


def test_folders_split_dirs(ffmpeg_available, tmp_path: Path) -> None:
    root, out = tmp_path / "data", tmp_path / "lists"
    clip(root / "train" / "a" / "x.avi", 4)
    clip(root / "train" / "b" / "y.avi", 5)
    clip(root / "val" / "b" / "z.avi", 6)
    assert (
        main(["folders", "--root", str(root), "--splits", "train", "val", "--out", str(out), "--quiet"]) == 0
    )
    assert read_list(out / "train.txt") == [("../data/train/a/x.avi", 4, 0), ("../data/train/b/y.avi", 5, 1)]
    assert read_list(out / "val.txt") == [("../data/val/b/z.avi", 6, 1)]
    with pytest.raises(UserError, match="split folder not found"):
        main(["folders", "--root", str(root), "--splits", "train", "test", "--out", str(out)])


def test_folders_odd_names_empty_classes_and_fifos_are_reported(ffmpeg_available, tmp_path, capsys) -> None:
    """A frame folder "take 2" would give the line `.../take 2 3 0`, which the loader's parser refuses (too
    many fields): it is left out and reported naming the folder. An empty class folder keeps its id (the
    later ids do not shift) with one warning line. A FIFO is reported, not dropped without a word."""
    import os

    from dali_pipes.listfile import read_list as loader_read_list

    root, out = tmp_path / "ucf", tmp_path / "lists"
    clip(root / "a_walk" / "v1.avi", 4)
    write_jpeg_folder(root / "a_walk" / "take 2", 3)
    (root / "b_empty").mkdir(parents=True)
    clip(root / "c_run" / "v2.avi", 5)
    os.mkfifo(root / "c_run" / "stream.mp4")
    assert main(["folders", "--root", str(root), "--out", str(out), "--quiet", "--jobs", "1"]) == 0
    err = capsys.readouterr().err
    assert (out / "classes.txt").read_text().splitlines() == ["a_walk", "b_empty", "c_run"]
    assert read_list(out / "all.txt") == [("../ucf/a_walk/v1.avi", 4, 0), ("../ucf/c_run/v2.avi", 5, 2)]
    assert len(loader_read_list(out / "all.txt")) == 2  # every written line reads back
    assert err.count("\n") == 1 and "b_empty holds no videos" in err and "keeps class id 1" in err
    report = (out / "lists-report.tsv").read_text()
    assert "take 2" in report and "would not read back (too many fields" in report
    assert f"{root / 'c_run' / 'stream.mp4'}\ta FIFO" in report


def test_format_line_refuses_what_the_parser_would_misread() -> None:
    from dali_pipes.listfile import format_line

    assert format_line("a b/c d.webm", 8, 0) == "a b/c d.webm 8 0"
    for rel in ("frames/take 2", "x.webm ", "#x.webm", "a\nb.webm"):
        with pytest.raises(ValueError, match="would not read back"):
            format_line(rel, 8, 0)


def test_folders_link_to_a_listed_file_is_written_once(ffmpeg_available, tmp_path: Path) -> None:
    """A class folder holding a.avi and link.avi -> a.avi: the list holds the file once (the loader would
    refuse the second line as a duplicate), and the link is reported."""
    from dali_pipes.listfile import read_list as loader_read_list

    root, out = tmp_path / "ucf", tmp_path / "lists"
    clip(root / "walk" / "a.avi", 4)
    (root / "walk" / "link.avi").symlink_to(root / "walk" / "a.avi")
    assert main(["folders", "--root", str(root), "--out", str(out), "--quiet", "--jobs", "1"]) == 0
    assert read_list(out / "all.txt") == [("../ucf/walk/a.avi", 4, 0)]
    assert len(loader_read_list(out / "all.txt")) == 1
    assert "link.avi" in (out / "lists-report.tsv").read_text()
