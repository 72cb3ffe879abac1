import re

import pytest
import yaml

from engine.config import (
    Config,
    ConfigError,
    dump_yaml,
    from_dict,
    load_config,
    print_config_text,
    split_cli,
    to_dict,
)


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_sections(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  name: tam\n  num_classes: 174\n"))
    assert isinstance(cfg, Config)
    assert cfg.model.name == "tam" and cfg.model.num_classes == 174
    assert cfg.optim.lr == 0.01


def test_unknown_key_named_with_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr'.*did you mean 'lr'"):
        load_config(write(tmp_path, "optim:\n  lrr: 0.1\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'modle'.*did you mean 'model'"):
        load_config(write(tmp_path, "modle:\n  name: tsm\n"))


def test_wrong_type_named(tmp_path):
    with pytest.raises(ConfigError, match=r"optim.lr: expected a number"):
        load_config(write(tmp_path, "optim:\n  lr: fast\n"))
    with pytest.raises(ConfigError, match=r"train.epochs: expected an integer"):
        load_config(write(tmp_path, "train:\n  epochs: 2.5\n"))
    with pytest.raises(ConfigError, match=r"data.mean\[1\]: expected a number"):
        load_config(write(tmp_path, "data:\n  mean: [0.1, x, 0.2]\n"))


def test_bad_choice_named(tmp_path):
    with pytest.raises(ConfigError, match=r"data.sampling: 'dens'.*did you mean 'dense'"):
        load_config(write(tmp_path, "data:\n  sampling: dens\n"))


def test_missing_file_named(tmp_path):
    (tmp_path / "demo.yaml").write_text("")
    with pytest.raises(ConfigError, match=r"config file not found: .*dmeo.yaml.*did you mean 'demo.yaml'"):
        load_config(tmp_path / "dmeo.yaml")


def test_overrides(tmp_path):
    p = write(tmp_path, "optim:\n  lr: 0.1\n")
    cfg = load_config(p, ["--optim.lr=0.02", "--optim.lr_steps=[3, 4]", "--train.amp=fp16"])
    assert cfg.optim.lr == 0.02 and cfg.optim.lr_steps == [3, 4] and cfg.train.amp == "fp16"
    with pytest.raises(ConfigError, match="unknown key 'optim.rate'"):
        load_config(p, ["--optim.rate=1"])
    with pytest.raises(ConfigError, match="must look like"):
        load_config(p, ["--optim.lr"])


def test_override_errors_name_the_command_line_not_the_file(tmp_path):
    p = write(tmp_path, "optim:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"^command line: --optim.lrr=1: unknown key 'optim.lrr'") as e:
        load_config(p, ["--train.epochs=3", "--optim.lrr=1"])
    assert str(p) not in str(e.value)
    with pytest.raises(ConfigError, match=r"^command line: --train.epochs=x: train.epochs: expected an int"):
        load_config(p, ["--train.epochs=x"])
    with pytest.raises(ConfigError, match=r"^command line: --data.sampling=dens: data.sampling: 'dens'"):
        load_config(p, ["--optim.lr=1", "--data.sampling=dens"])
    with pytest.raises(ConfigError, match=r"^command line: --optim.lr: an override must look like"):
        load_config(p, ["--optim.lr"])
    bad = write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: unknown key 'optim.lrr'"):
        load_config(bad, ["--optim.lr=1"])
    mismatch = write(tmp_path, "data:\n  num_segments: 16\n")  # the file alone fails a value check
    with pytest.raises(ConfigError, match=rf"^{mismatch}: model.num_segments \(8\) differs"):
        load_config(mismatch, ["--optim.lr=1"])
    assert load_config(mismatch, ["--model.num_segments=16"]).model.num_segments == 16  # fixed by an override
    with pytest.raises(ConfigError, match=r"^command line: --model.num_segments=4: model.num_segments \(4\)"):
        load_config(None, ["--optim.lr=1", "--model.num_segments=4"])


@pytest.mark.parametrize("value", ["", '""', "''", "null", "~"])
def test_override_clears_a_string_key(tmp_path, value):
    p = write(tmp_path, "model:\n  pretrained: weights/resnet50.pth\n")
    assert load_config(p).model.pretrained == "weights/resnet50.pth"
    assert load_config(p, [f"--model.pretrained={value}"]).model.pretrained == ""


def test_string_override_keeps_the_text_as_written(tmp_path):
    cfg = load_config(None, ["--train.out_dir=2024", "--data.root=1e3"])
    assert cfg.train.out_dir == "2024" and cfg.data.root == "1e3"
    with pytest.raises(ConfigError, match=r"pretrained: expected a string, got null \(write .. for none\)"):
        load_config(write(tmp_path, "model:\n  pretrained:\n"))


def test_round_trip_and_cli_split():
    cfg = load_config(None, ["--model.depth=18"])
    assert from_dict(to_dict(cfg)) == cfg
    assert "depth: 18" in dump_yaml(cfg)
    ov, rest = split_cli(["c.yaml", "--optim.lr=1", "--resume", "auto", "--print-config"])
    assert ov == ["--optim.lr=1"] and rest == ["c.yaml", "--resume", "auto", "--print-config"]


def test_yaml_on_off_are_strings(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  flip: off\ntrain:\n  compile: true\n"), ["--data.flip=on"])
    assert cfg.data.flip == "on" and cfg.train.compile is True
    assert load_config(write(tmp_path, "data:\n  flip: off\n")).data.flip == "off"


def test_readme_config_reference_lists_every_key():
    """README's config reference is generated from engine/config.py; a new field without a row fails here."""
    import dataclasses
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    cfg = Config()
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            key = f"{section.name}.{f.name}"
            assert f"`{key}`" in readme, f"README.md lacks a row for {key}"


def test_readme_config_reference_names_every_choice():
    """Each choice of a choice-valued key is named in that key's README row (and in DATA.md for sampling)."""
    from pathlib import Path

    from engine.config import _CHOICES

    root = Path(__file__).resolve().parents[1]
    rows = {
        line.split("|")[1].strip().strip("`"): line
        for line in (root / "README.md").read_text().splitlines()
        if line.startswith("| `")
    }
    for key, allowed in _CHOICES.items():
        assert key in rows, f"README.md lacks a row for {key}"
        for choice in allowed:
            assert str(choice) in rows[key], f"README.md's row for {key} does not name '{choice}'"
    data_md = (root / "docs" / "DATA.md").read_text()
    for key in ("data.sampling", "data.val_sampling", "data.dense_span", "eval.temporal_mode"):
        for choice in _CHOICES[key]:
            assert f"`{choice}`" in data_md, f"docs/DATA.md does not explain {key}: {choice}"


# ---- base: inheritance, --print-config origins, problems reported together --------------------------


def test_base_chain_merges_section_by_section(tmp_path):
    (tmp_path / "a.yaml").write_text("data:\n  batch_size: 4\n  num_workers: 3\noptim:\n  lr: 0.5\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ndata:\n  batch_size: 6\nmodel:\n  name: tam\n")
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "c.yaml"
    child.write_text("base: ../b.yaml  # relative to this file\noptim:\n  momentum: 0.5\n")
    cfg = load_config(child, ["--data.num_workers=1"])
    assert (cfg.data.batch_size, cfg.data.num_workers) == (6, 1)  # b over a, the command line over both
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.model.name) == (0.5, 0.5, "tam")  # keys, not sections
    assert cfg.optim.weight_decay == 5e-4  # untouched keys keep their defaults


def test_base_cycle_and_missing_base_are_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: c.yaml\n")
    (tmp_path / "c.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "a.yaml")
    a, b, c = (tmp_path / f"{n}.yaml" for n in "abc")
    assert str(e.value) == f"{c}: base: a cycle: {a} -> {b} -> {c} -> {a}"
    (tmp_path / "d.yaml").write_text("base: nope.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "d.yaml")
    assert str(e.value).startswith(f"{tmp_path / 'd.yaml'}: base: {tmp_path / 'nope.yaml'} not found")


def test_print_config_is_block_yaml_naming_each_values_origin(tmp_path):
    (tmp_path / "a.yaml").write_text("optim:\n  lr_steps: [3, 4]\n  lr: 0.01\n")  # lr as the default
    (tmp_path / "b.yaml").write_text("base: a.yaml\nmodel:\n  num_classes: 174\n")
    text = print_config_text(tmp_path / "b.yaml", ["--train.epochs=3"])
    lines = text.splitlines()
    assert "  num_classes: 174  # " + str(tmp_path / "b.yaml") in lines
    assert "  lr_steps:  # " + str(tmp_path / "a.yaml") in lines and "  - 3" in lines  # block lists
    assert "  epochs: 3  # command line" in lines
    assert "  lr: 0.01" in lines  # a default value: no comment
    assert "[" not in text.replace("'[", "")  # no flow-style lists
    assert from_dict(yaml.safe_load(text)) == load_config(tmp_path / "b.yaml", ["--train.epochs=3"])


def test_all_config_problems_are_reported_together(tmp_path):
    (tmp_path / "a.yaml").write_text("data:\n  sampling: dens\noptim:\n  lrr: 1\n")
    p = write(tmp_path, "base: a.yaml\ntrain:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["--model.depth=x", "--optim.lr=0.1"])
    lines = str(e.value).splitlines()
    assert lines[0] == "4 config problems:"
    assert sorted(lines[1:]) == sorted([
        f"  {tmp_path / 'a.yaml'}: unknown key 'optim.lrr' (did you mean 'lr'?)",
        f"  {p}: unknown key 'train.epoch' (did you mean 'epochs'?)",
        "  command line: --model.depth=x: model.depth: expected an integer, got str 'x'",
        f"  {tmp_path / 'a.yaml'}: data.sampling: 'dens' is not one of uniform, dense, clip3d (did you mean "
        "'dense'?)",
    ])  # fmt: skip
    assert e.value.partial is not None and e.value.partial.optim.lr == 0.1  # the good override applied


def test_recipes_use_base_and_resolve_as_before():
    """tsm_sthv2 / tam_sthv2 inherit from their V1 files; the merged recipes are the published ones."""
    tsm = load_config("configs/tsm_sthv2.yaml")
    assert (tsm.data.source, tsm.data.flip, tsm.optim.lr, tsm.optim.ref_batch) == ("video", "pairs", 0.01, 64)
    assert (tsm.eval.spatial_crops, tsm.eval.temporal_mode) == (3, "twice")
    assert tsm.train.out_dir == "runs/tsm_sthv2"
    tam = load_config("configs/tam_sthv2.yaml")
    assert (tam.model.dropout, tam.optim.lr, tam.optim.weight_decay, tam.optim.lr_steps) == (
        0.5, 0.02, 5e-4, [30, 40, 45],
    )  # fmt: skip
    assert (tam.data.batch_size, tam.eval.temporal_mode, tam.model.num_classes) == (16, "uniform", 174)


def test_exponent_floats_without_dot_or_sign_are_numbers(tmp_path):
    """`1e30`, `1.0e30`, `1e-3`: YAML 1.2 floats that PyYAML (YAML 1.1) reads as text, for float fields."""
    assert load_config(None, ["--optim.lr=1e30"]).optim.lr == 1e30
    assert load_config(None, ["--optim.lr=1.0e30"]).optim.lr == 1e30
    assert load_config(None, ["--optim.weight_decay=5E-4"]).optim.weight_decay == 5e-4
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1e-3\ndata:\n  mean: [4e-1, 0.5, 5e-1]\n"))
    assert cfg.optim.lr == 1e-3 and cfg.data.mean == [0.4, 0.5, 0.5]
    with pytest.raises(ConfigError, match=r"train.epochs: expected an integer, got str '1e3'"):
        load_config(None, ["--train.epochs=1e3"])  # an int field takes no exponent
    assert load_config(None, ["--data.root=1e3"]).data.root == "1e3"  # a string field keeps the text


@pytest.mark.parametrize(
    "override, message",
    [
        ("--optim.lr=-0.1", "optim.lr: must be > 0, got -0.1"),
        ("--optim.lr=0", "optim.lr: must be > 0, got 0"),
        ("--optim.lr=.nan", "optim.lr: must be a finite number, got nan"),
        ("--optim.lr=-.inf", "optim.lr: must be a finite number, got -inf"),
        ("--optim.lr=1e400", "optim.lr: must be a finite number, got inf"),
        ("--optim.weight_decay=-1e-4", "optim.weight_decay: must be >= 0, got -0.0001"),
        ("--optim.momentum=1.0", r"optim.momentum: must be in \[0, 1\), got 1"),
        ("--optim.momentum=-0.5", r"optim.momentum: must be in \[0, 1\), got -0.5"),
        ("--optim.label_smoothing=1", r"optim.label_smoothing: must be in \[0, 1\), got 1"),
        ("--model.dropout=1.5", r"model.dropout: must be in \[0, 1\), got 1.5"),
        ("--train.ema=1", r"train.ema: must be in \[0, 1\), got 1"),
        ("--data.mean=[0.4, .nan, 0.4]", r"data.mean\[1\]: must be a finite number, got nan"),
        ("--data.batch_size=0", "data.batch_size: must be >= 1, got 0"),
        ("--train.epochs=-1", "train.epochs: must be >= 1, got -1"),
        ("--eval.batch_size=0", "eval.batch_size: must be >= 1, got 0"),
    ],
)
def test_invalid_numbers_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=rf"^command line: {re.escape(override)}: {message}$"):
        load_config(None, [override])


def test_invalid_number_in_a_file_names_the_file(tmp_path):
    p = write(tmp_path, "optim:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(p))}: optim.lr: must be > 0, got -1$"):
        load_config(p)
