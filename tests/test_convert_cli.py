"""models.convert as a user meets it: checkpoint containers, refusals that name the key, the CLI's
`error: ...` / exit 2 contract, and the converted file in evaluate.py's and train.py's loaders."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_convert_layouts import model_cfg, official_layout, randomised

from engine.checkpoint import load_checkpoint
from models import build_model
from models.convert import ConvertError, convert_file, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tsm_state() -> dict[str, torch.Tensor]:
    """A debug TSM's weights (random, so misplaced tensors would show)."""
    torch.manual_seed(0)
    return randomised(build_model(model_cfg("tsm"))).state_dict()


@pytest.fixture
def tsm_official(tsm_state) -> dict[str, torch.Tensor]:
    return official_layout("tsm", "tsm", tsm_state)


def assert_equal_to(state: dict, ours: dict[str, torch.Tensor]) -> None:
    assert set(state["model"]) == set(ours)
    for key, value in ours.items():
        assert torch.equal(state["model"][key], value), key


CONTAINERS = {
    # official TSM/TAM/CT-Net trainers: DataParallel keys inside {'state_dict', 'epoch', ...}, .pth.tar
    "official_pth_tar": lambda sd: {"epoch": 50, "arch": "resnet50", "state_dict": sd, "best_prec1": 71.2},
    # the same saved without DataParallel
    "no_module_prefix": lambda sd: {"state_dict": {k.removeprefix("module."): v for k, v in sd.items()}},
    # a bare state dict
    "bare": lambda sd: dict(sd),
    # our own container
    "model_key": lambda sd: {"model": sd, "meta": {"source": "tsm"}},
}


@pytest.mark.parametrize("container", sorted(CONTAINERS))
def test_containers(tmp_path: Path, tsm_official, tsm_state, container: str) -> None:
    src = tmp_path / "ckpt.pth.tar"
    torch.save(CONTAINERS[container](tsm_official), src)
    assert_equal_to(convert_file(src, tmp_path / "out.pt", "tsm", "tsm", debug=True), tsm_state)


def test_legacy_serialization(tmp_path: Path, tsm_official, tsm_state) -> None:
    """Files written by PyTorch < 1.6 (not zip archives) load too."""
    src = tmp_path / "old.pth.tar"
    torch.save({"state_dict": tsm_official}, src, _use_new_zipfile_serialization=False)
    assert_equal_to(convert_file(src, tmp_path / "out.pt", "tsm", "tsm", debug=True), tsm_state)


def test_missing_num_batches_tracked(tmp_path: Path, tsm_official, tsm_state) -> None:
    """Checkpoints from PyTorch < 0.4.1 have no BN step counters: accepted, ours start at 0."""
    old = {k: v for k, v in tsm_official.items() if not k.endswith("num_batches_tracked")}
    src = tmp_path / "old.pth"
    torch.save({"state_dict": old}, src)
    state = convert_file(src, tmp_path / "out.pt", "tsm", "tsm", debug=True)
    assert set(state["model"]) == set(tsm_state)
    assert int(state["model"]["backbone.bn1.num_batches_tracked"]) == 0


def test_unmatched_keys_are_refused_and_named(tmp_path: Path, tsm_official) -> None:
    """An extra official key and a missing one: both listed, with their names; nothing written."""
    sd = dict(tsm_official)
    sd["module.base_model.layer1.0.nl.weight"] = torch.zeros(3)
    del sd["module.base_model.layer2.1.bn2.running_var"]
    src, dst = tmp_path / "bad.pth.tar", tmp_path / "out.pt"
    torch.save({"state_dict": sd}, src)
    with pytest.raises(ConvertError) as err:
        convert_file(src, dst, "tsm", "tsm", debug=True)
    msg = str(err.value)
    assert str(src) in msg
    assert "module.base_model.layer1.0.nl.weight -> backbone.layer1.0.nl.weight" in msg
    assert "backbone.layer2.1.bn2.running_var" in msg
    assert not dst.exists()


def test_shape_mismatch_is_refused_and_named(tmp_path: Path, tsm_official) -> None:
    sd = dict(tsm_official)
    sd["module.base_model.layer3.0.conv2.weight"] = torch.zeros(5, 5, 3, 3)
    src, dst = tmp_path / "bad.pth", tmp_path / "out.pt"
    torch.save({"state_dict": sd}, src)
    with pytest.raises(ConvertError, match=r"layer3\.0\.conv2\.weight \(5, 5, 3, 3\) -> backbone\.layer3"):
        convert_file(src, dst, "tsm", "tsm", debug=True)
    assert not dst.exists()


def test_num_classes_mismatch_names_the_classifier(tmp_path: Path, tsm_official) -> None:
    src = tmp_path / "tsm.pth"
    torch.save({"state_dict": tsm_official}, src)
    with pytest.raises(ConvertError, match=r"module\.new_fc\.weight \(7, \d+\) -> fc\.weight \(400, \d+\)"):
        convert_file(src, tmp_path / "out.pt", "tsm", "tsm", num_classes=400, debug=True)


def test_shift_placement_must_match_the_model(tmp_path: Path, tsm_official) -> None:
    """The shift has no weights: a TSM file must not load as TSN, nor the reverse, nor a whole-block shift."""
    src = tmp_path / "tsm.pth.tar"
    torch.save({"state_dict": tsm_official}, src)
    with pytest.raises(ConvertError, match="use --model tsm"):
        convert_file(src, tmp_path / "out.pt", "tsm", "tsn", debug=True)
    tsn = {k.replace(".conv1.net.", ".conv1."): v for k, v in tsm_official.items()}
    torch.save({"state_dict": tsn}, src)
    with pytest.raises(ConvertError, match="use --model tsn"):
        convert_file(src, tmp_path / "out.pt", "tsm", "tsm", debug=True)
    block = {re.sub(r"(layer\d\.\d)\.", r"\1.net.", k): v for k, v in tsn.items()}  # shift_place='block'
    torch.save({"state_dict": block}, src)
    with pytest.raises(ConvertError, match="shift_place='block'"):
        convert_file(src, tmp_path / "out.pt", "tsm", "tsm", debug=True)
    assert not (tmp_path / "out.pt").exists()


def test_python_objects_beside_the_weights_load_as_stand_ins(tmp_path: Path, tsm_official, tsm_state) -> None:
    """Official trainers may store argparse args in the file: read as an inert stand-in (no --trust)."""
    src = tmp_path / "with_args.pth.tar"
    torch.save({"state_dict": tsm_official, "args": argparse.Namespace(lr=0.01)}, src)
    state = convert_file(src, tmp_path / "out.pt", "tsm", "tsm", debug=True)
    assert_equal_to(state, tsm_state)
    assert state["meta"]["stand_ins"] == ["argparse.Namespace"]


def test_cli_success_and_user_errors(tmp_path: Path, tsm_official, capsys) -> None:
    src, dst = tmp_path / "tsm.pth.tar", tmp_path / "out.pt"
    torch.save({"state_dict": tsm_official}, src)
    assert main([str(src), str(dst), "--from", "tsm", "--model", "tsm", "--debug"]) == 0
    assert "wrote" in capsys.readouterr().out and dst.is_file()

    cases = {
        "no such file": [str(tmp_path / "nope.pth"), str(dst), "--from", "tsm", "--model", "tsm"],
        "publishes weights for --model": [str(src), str(dst), "--from", "tam", "--model", "tsm"],
        "refusing to overwrite": [str(src), str(src), "--from", "tsm", "--model", "tsm", "--debug"],
        "model.depth": [str(src), str(dst), "--from", "tsm", "--model", "tsm", "--depth", "42"],
    }
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    cases["not a PyTorch checkpoint"] = [
        str(tmp_path / "notes.txt"),
        str(dst),
        "--from",
        "tsm",
        "--model",
        "tsm",
    ]
    for expected, argv in cases.items():
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and "Traceback" not in err, err


def test_cli_module_entry_point(tmp_path: Path) -> None:
    """`python -m models.convert` is the documented command: bad input -> one `error:` line, exit 2."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "models.convert",
            str(tmp_path / "missing.pth"),
            str(tmp_path / "o.pt"),
            "--from",
            "mmaction",
            "--model",
            "ir_csn",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and "missing.pth" in out.stderr and "Traceback" not in out.stderr


def test_converted_file_in_evaluate_and_train_loaders(tmp_path: Path, tsm_official, tsm_state) -> None:
    """evaluate.py --checkpoint reads the 'model' key strictly; train.py goes through model.pretrained."""
    from engine.checkpoint import load_model_weights

    src, dst = tmp_path / "tsm.pth.tar", tmp_path / "tsm_converted.pt"
    torch.save({"state_dict": tsm_official}, src)
    convert_file(src, dst, "tsm", "tsm", debug=True)

    ckpt = load_checkpoint(dst)  # the restricted reader train.py/evaluate.py share
    model = build_model(model_cfg("tsm"))
    load_model_weights(model, ckpt, str(dst), "model")
    for key, value in model.state_dict().items():
        assert torch.equal(value, tsm_state[key]), key

    pretrained = build_model(model_cfg("tsm", pretrained=str(dst)))  # what train.py does
    for key, value in pretrained.state_dict().items():
        assert torch.equal(value, tsm_state[key]), key
