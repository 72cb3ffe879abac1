"""Core models (TSN, TSM, TAM, CT-Net on the shared ResNet): shapes, gradients, temporal behaviour,
full-size parameter counts and GMACs from reference/models.md, and checkpoint loading."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from models import MODELS, PretrainedMismatchError, build_model, load_pretrained
from models.resnet import REPLACES_CONV2, BasicBlock, Bottleneck, ResNet, resnet
from models.summary import REFERENCE, count_macs, example_input, main
from models.temporal.ctnet import CTInteraction, ctnet_factory
from models.temporal.tam import TAM, tam_factory
from models.temporal.tsm import TemporalShift, temporal_shift, tsm_factory
from models.video import VideoClassifier

CORE = ["tsn", "tsm", "tam", "ctnet"]
T = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Debug models are tiny: one intra-op thread is fastest and leaves the other core to the rest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def debug_model(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    kw = {"debug": True, "num_classes": 5, "num_segments": T, **kw}
    return build_model(ModelConfig(name=name, **kw))


def clip(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, T, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", CORE)
def test_shape_layout_and_every_trainable_parameter_gets_a_gradient(name: str) -> None:
    model = debug_model(name).train()
    assert model.layout == "NTCHW" and model.snippet_len == 1
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 5
    out = model(clip(size=48))
    assert out.shape == (2, 5)
    out.square().sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


@pytest.mark.parametrize("options", [{"ctnet_freeze": True}, {"partial_bn": True}])
def test_frozen_parameters_get_no_gradient_and_the_rest_do(options: dict) -> None:
    model = debug_model("ctnet", **options).train()
    model(clip()).square().sum().backward()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "backbone.layer1.1.temporal.fusion.1.weight" not in frozen  # CT norms train in both cases
    assert frozen and all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_basic_block_resnets_take_tsm_and_tam_but_not_ct() -> None:
    torch.manual_seed(0)
    x = torch.randn(2 * T, 3, 32, 32)
    for factory in (tsm_factory(T), tam_factory(T)):
        net = ResNet(BasicBlock, (2, 2, 2, 2), base_width=16, temporal=factory).eval()  # R18 at 1/4 width
        assert len([b for b in net.blocks() if hasattr(b, "temporal")]) == 8
        with torch.no_grad():
            out = net(x)
            swapped = net(x.view(2, T, 3, 32, 32).flip(1).reshape(2 * T, 3, 32, 32))
        assert out.shape == (2 * T, 128) and not torch.allclose(
            out, swapped.view(2, T, -1).flip(1).view(out.shape)
        )
    with pytest.raises(ValueError, match="needs a Bottleneck"):
        ResNet(BasicBlock, (2, 2, 2, 2), base_width=16, temporal=ctnet_factory(T))


@pytest.mark.parametrize("name", CORE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_finite_under_autocast_and_channels_last(name: str, dtype: torch.dtype) -> None:
    model = debug_model(name).to(memory_format=torch.channels_last).train()
    with torch.autocast("cpu", dtype=dtype):
        out = model(clip())
    assert out.shape == (2, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", CORE)
def test_channels_last_matches_contiguous(name: str) -> None:
    model = debug_model(name).eval()
    x = clip()
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", CORE)
def test_temporal_sensitivity(name: str) -> None:
    """Reversing the frames changes every temporal model; TSN's average consensus does not notice."""
    model = debug_model(name).eval()
    x = clip()
    with torch.no_grad():
        out, out_rev = model(x), model(x.flip(1))
    assert out.abs().max() > 0
    if name == "tsn":
        torch.testing.assert_close(out_rev, out, rtol=1e-5, atol=1e-7)
    else:
        assert not torch.allclose(out_rev, out, rtol=1e-3, atol=1e-6)


def test_wrong_number_of_frames_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="expected 4 segments"):
        debug_model("tsm")(torch.randn(1, 3, 3, 32, 32))


# ---- faithfulness: full-size structure, parameter counts and MACs (meta device: no memory, no math) ----


def full_size(name: str, num_classes: int = 400, **kw) -> nn.Module:
    with torch.device("meta"):
        return MODELS[name](ModelConfig(name=name, num_classes=num_classes, **kw))


@pytest.mark.parametrize("name", CORE)
def test_full_size_parameter_counts_match_the_official_models(name: str) -> None:
    ref400, ref174, _ = REFERENCE[(name, 50)]
    assert sum(p.numel() for p in full_size(name, 400).parameters()) == ref400
    assert sum(p.numel() for p in full_size(name, 174).parameters()) == ref174


@pytest.mark.parametrize("name", CORE)
def test_full_size_gmacs_match_the_reference(name: str) -> None:
    model = full_size(name)
    gmacs = count_macs(model, example_input(model, ModelConfig(name=name))) / 1e9
    assert gmacs == pytest.approx(REFERENCE[(name, 50)][2], rel=0.02)


def test_summary_prints_every_requested_model(capsys) -> None:
    assert main(["--models", "tsm", "ctnet"]) == 0
    out = capsys.readouterr().out
    assert "24,327,632" in out and "20,959,150" in out and "28.36" in out
    with pytest.raises(SystemExit):
        main(["--models", "nope"])


def test_resnet_matches_torchvision_layout() -> None:
    """torchvision's ResNet sizes (minus its fc) and key names, without importing torchvision."""
    with torch.device("meta"):
        counts = {d: sum(p.numel() for p in resnet(d).parameters()) for d in (18, 34, 50, 101, 152)}
        keys = list(resnet(50).state_dict())
    fc = {18: 513_000, 34: 513_000, 50: 2_049_000, 101: 2_049_000, 152: 2_049_000}
    torchvision = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160, 152: 60_192_808}
    assert {d: counts[d] + fc[d] for d in counts} == torchvision
    assert keys[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    for key in ("layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_var", "layer4.2.bn3.bias"):
        assert key in keys
    assert not any(k.startswith("fc.") for k in keys)


def test_tsm_shifts_every_block_of_r50_and_every_other_block_of_r101() -> None:
    def shifted(depth: int) -> list[str]:
        bb = full_size("tsm", depth=depth).backbone
        return [n for n, m in bb.named_modules() if isinstance(m, TemporalShift)]

    assert len(shifted(50)) == 16
    r101 = shifted(101)
    assert len(r101) == 2 + 2 + 12 + 2
    assert "layer3.0.temporal" in r101 and "layer3.1.temporal" not in r101 and "layer3.22.temporal" in r101


def test_tam_sits_after_conv1_of_every_bottleneck_with_width_channels() -> None:
    bb = full_size("tam").backbone
    tams = [(b.temporal.L[0].in_channels, b.conv1.out_channels) for b in bb.blocks()]
    assert len(tams) == 16 and all(c == w for c, w in tams)


def test_ctnet_replaces_the_odd_blocks_conv2_and_keeps_the_rest() -> None:
    model = full_size("ctnet")
    replaced = {n: m for n, m in model.backbone.named_modules() if isinstance(m, CTInteraction)}
    assert list(replaced) == [
        f"{layer}.temporal"
        for layer in ("layer1.1", "layer2.1", "layer2.3", "layer3.1", "layer3.3", "layer3.5", "layer4.1")
    ]
    assert [(m.gx, m.gy) for m in replaced.values()] == [(8, 8), (8, 16), (8, 16), *[(16, 16)] * 3, (16, 32)]
    block = model.backbone.layer2[1]
    assert block.position == REPLACES_CONV2 and not hasattr(block, "conv2") and hasattr(block, "conv3")


def test_ctnet_freeze_trains_only_ct_blocks_and_fc() -> None:
    model = full_size("ctnet", ctnet_freeze=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 6_358_864
    assert "fc.weight" in trainable and "backbone.layer1.1.conv1.weight" in trainable
    assert "backbone.layer1.1.temporal.fusion.0.weight" in trainable
    assert "backbone.conv1.weight" not in trainable and "backbone.layer1.0.conv2.weight" not in trainable
    with pytest.raises(ValueError, match="ctnet_freeze"):
        build_model(ModelConfig(name="tsm", debug=True, ctnet_freeze=True))


def test_fc_init_and_partial_and_frozen_bn() -> None:
    model = debug_model("tsn", partial_bn=True)
    assert model.fc.bias.abs().max() == 0 and model.fc.weight.std() < 0.01
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    model.train()
    assert bns[0].training and bns[0].weight.requires_grad
    assert all(not m.training and not m.weight.requires_grad for m in bns[1:])
    frozen = debug_model("tam", freeze_bn=True).train()
    norms = [m for m in frozen.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(not m.training and not m.weight.requires_grad for m in norms)


# ---- the temporal operators against straightforward references ----


def test_temporal_shift_moves_one_eighth_each_way_with_zero_ends() -> None:
    x = torch.randn(2 * T, 16, 3, 3)
    out = temporal_shift(x, T, 8).view(2, T, 16, 3, 3)
    v = x.view(2, T, 16, 3, 3)
    torch.testing.assert_close(out[:, :-1, :2], v[:, 1:, :2])  # from the next frame
    torch.testing.assert_close(out[:, 1:, 2:4], v[:, :-1, 2:4])  # from the previous frame
    assert out[:, -1, :2].abs().max() == 0 and out[:, 0, 2:4].abs().max() == 0
    torch.testing.assert_close(out[:, :, 4:], v[:, :, 4:])


def test_tam_equals_the_grouped_conv_formulation() -> None:
    """TAM's shifted-add temporal conv equals one depthwise conv per (clip, channel), as in the paper."""
    torch.manual_seed(0)
    n, c, h, w = 2, 16, 5, 5
    tam = TAM(c, T).eval()
    x = torch.randn(n * T, c, h, w)
    v = x.view(n, T, c, h, w).permute(0, 2, 1, 3, 4)  # (N, C, T, H, W)
    theta = v.mean(dim=(3, 4))
    kernel = tam.G(theta.reshape(n * c, T)).view(n * c, 1, 3, 1)
    scaled = v * tam.L(theta).view(n, c, T, 1, 1)
    ref = F.conv2d(scaled.reshape(1, n * c, T, h * w), kernel, padding=(1, 0), groups=n * c)
    ref = ref.view(n, c, T, h, w).permute(0, 2, 1, 3, 4).reshape(n * T, c, h, w)
    with torch.no_grad():
        torch.testing.assert_close(tam(x), ref)


# ---- checkpoints ----


def imagenet_checkpoint(path, with_fc: bool = True) -> dict[str, torch.Tensor]:
    """A torchvision-layout checkpoint of the debug trunk (random weights), 1000-way fc included."""
    torch.manual_seed(3)
    state = resnet(debug=True).state_dict()
    for v in state.values():
        if v.is_floating_point():
            v.normal_()
    if with_fc:
        state["fc.weight"], state["fc.bias"] = torch.randn(1000, 16 * 8 * 4), torch.randn(1000)
    torch.save(state, path)
    return state


@pytest.mark.parametrize("name", CORE)
def test_imagenet_checkpoint_loads_into_the_backbone(name: str, tmp_path, caplog) -> None:
    state = imagenet_checkpoint(tmp_path / "imagenet.pth")
    model = debug_model(name)
    with caplog.at_level(logging.INFO, logger="models"):
        report = load_pretrained(model, tmp_path / "imagenet.pth")
    own = model.backbone.state_dict()
    assert report.target == "backbone"
    for key, value in own.items():
        if key in state:
            assert torch.equal(value, state[key]), key
    if name in ("tsn", "tsm"):
        assert report.new == [] and report.ignored == []
    else:
        assert report.new and all(".temporal." in k for k in report.new)
        assert "tensors of new modules keep their init" in caplog.text and "layer2.1.temporal" in caplog.text
    if name == "ctnet":
        assert "layer1.1.conv2.weight" in report.ignored and "layer1.1.bn2.running_mean" in report.ignored
        assert not any(k.startswith("layer1.0.") for k in report.ignored)


def test_whole_model_checkpoints_round_trip_in_every_wrapper(tmp_path) -> None:
    src = debug_model("tam")
    for p in src.parameters():
        p.data.normal_()
    state = src.state_dict()
    for i, obj in enumerate([state, {"state_dict": state}, {"model": state, "meta": {"epoch": 3}}]):
        torch.save(obj, tmp_path / f"{i}.pth")
        dst = debug_model("tam")
        report = load_pretrained(dst, tmp_path / f"{i}.pth")
        assert report.target == "model" and report.new == []
        assert all(torch.equal(v, state[k]) for k, v in dst.state_dict().items())
    headless = {k: v for k, v in state.items() if not k.startswith("fc.")}  # e.g. a converted trunk
    torch.save({"model": headless}, tmp_path / "headless.pth")
    assert load_pretrained(debug_model("tam"), tmp_path / "headless.pth").new == ["fc.weight", "fc.bias"]
    other_head = debug_model("tam", num_classes=7)  # fine-tuning on another label set: fc starts anew
    before_fc = other_head.fc.weight.clone()
    report = load_pretrained(other_head, tmp_path / "0.pth")
    assert report.new == ["fc.weight", "fc.bias"] and torch.equal(other_head.fc.weight, before_fc)
    assert torch.equal(other_head.backbone.conv1.weight, state["backbone.conv1.weight"])
    ddp = {f"module.{k}": v for k, v in state.items()}
    torch.save(ddp, tmp_path / "ddp.pth")
    assert load_pretrained(debug_model("tam"), tmp_path / "ddp.pth").target == "model"


def test_whole_model_checkpoint_leaving_modules_at_init_is_a_warning(tmp_path, caplog) -> None:
    """A whole model loads strictly except for new modules; when their tensors are absent it is most
    likely a checkpoint of another model (TSN into TAM) or a headless one: a WARNING names the modules."""
    tam = debug_model("tam").state_dict()
    files = {
        "tsn.pth": debug_model("tsn", num_classes=7).state_dict(),  # no TAMs, another head
        "tam.pth": tam,
        "tam_headless.pth": {k: v for k, v in tam.items() if not k.startswith("fc.")},
    }
    for name, state in files.items():
        torch.save({"model": state}, tmp_path / name)
    imagenet_checkpoint(tmp_path / "imagenet.pth")
    tams = [n for n, _ in debug_model("tam").named_modules() if n.endswith(".temporal")]
    assert len(tams) == 8  # every bottleneck of the debug ResNet-50

    def warnings(file: str, num_classes: int = 5) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="models"):
            load_pretrained(debug_model("tam", num_classes=num_classes), tmp_path / file)
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    (tsn_into_tam,) = warnings("tsn.pth", num_classes=7)
    assert "tsn.pth: the whole-model checkpoint has no tensors for 8 module(s)" in tsn_into_tam
    assert tsn_into_tam.endswith(f"modules (8): {', '.join(tams)}")
    (headless,) = warnings("tam_headless.pth")
    assert headless.endswith("modules (1): fc")
    # fine-tuning to another class count keeps a fresh fc on purpose: said at INFO, no WARNING about it
    (tsn_tuned,) = warnings("tsn.pth", num_classes=5)
    assert tsn_tuned.endswith(f"modules (8): {', '.join(tams)}")
    assert "fc has 7 classes in the checkpoint, 5 in the model" in caplog.text
    assert warnings("tam.pth", num_classes=3) == []
    assert "fc has 5 classes in the checkpoint, 3 in the model" in caplog.text
    assert warnings("tam.pth") == []  # complete
    # an ImageNet trunk never has temporal modules or our fc: INFO only
    assert warnings("imagenet.pth") == [] and "tensors of new modules keep their init" in caplog.text


def test_mismatched_checkpoints_name_the_keys_and_load_nothing(tmp_path) -> None:
    state = imagenet_checkpoint(tmp_path / "ok.pth", with_fc=False)
    broken = dict(state)
    del broken["layer2.0.conv1.weight"]
    broken["layer9.0.conv1.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    model = debug_model("tsm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PretrainedMismatchError) as err:
        load_pretrained(model, tmp_path / "broken.pth")
    msg = str(err.value)
    assert "broken.pth" in msg and "missing keys (1): layer2.0.conv1.weight" in msg
    assert "unexpected keys (1): layer9.0.conv1.weight" in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    reshaped = dict(state)
    reshaped["conv1.weight"] = torch.zeros(16, 3, 3, 3)
    torch.save(reshaped, tmp_path / "reshaped.pth")
    with pytest.raises(PretrainedMismatchError, match=r"conv1.weight \(16, 3, 3, 3\) vs \(16, 3, 7, 7\)"):
        load_pretrained(model, tmp_path / "reshaped.pth")

    other = debug_model("ctnet").state_dict()  # a whole CT-Net: its CT modules are foreign to TSM
    torch.save(other, tmp_path / "ctnet.pth")
    with pytest.raises(PretrainedMismatchError, match=r"missing keys \(20\): backbone.layer1.1.conv2.weight"):
        load_pretrained(model, tmp_path / "ctnet.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(model, tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_pretrained(model, tmp_path / "junk.pth")


def test_build_model_loads_pretrained_and_rejects_unknown_names(tmp_path) -> None:
    state = imagenet_checkpoint(tmp_path / "imagenet.pth")
    model = debug_model("tsm", pretrained=str(tmp_path / "imagenet.pth"))
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])
    with pytest.raises(ValueError, match="model.name: 'tsx' is not one of tsn, tsm"):
        build_model(ModelConfig(name="tsx"))


# ---- torch.compile ----

FACTORIES = {"tsm": tsm_factory, "tam": tam_factory, "ctnet": ctnet_factory}


def shallow_model(name: str, layers: tuple[int, ...] = (2, 1, 1, 1)) -> VideoClassifier:
    """The debug model with fewer blocks (compile time grows with the graph; layer1.1 is a CT block)."""
    torch.manual_seed(0)
    backbone = ResNet(Bottleneck, layers, base_width=16, temporal=FACTORIES[name](T))
    return VideoClassifier(backbone, num_classes=5, num_segments=T)


@pytest.mark.parametrize(
    "name",
    ["tsm", pytest.param("tam", marks=pytest.mark.slow), pytest.param("ctnet", marks=pytest.mark.slow)],
)
def test_traces_as_one_graph(name: str) -> None:
    """Dynamo captures the whole forward without graph breaks (eager backend: no code generation)."""
    model = shallow_model(name).to(memory_format=torch.channels_last).train()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    compiled(clip()).sum().backward()
    assert model.backbone.conv1.weight.grad is not None
    torch._dynamo.reset()


@pytest.mark.slow
def test_tsm_compiled_with_inductor_matches_eager() -> None:
    model = shallow_model("tsm", (1, 1, 1, 1)).eval()
    x = clip()
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model)(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_ct_interaction_equals_the_official_3d_formulation() -> None:
    """The 2D-conv CT block equals CT-Net's Conv3d/BatchNorm3d block on (N, C, T, H, W), weights shared."""

    def conv3d(x, conv, kernel):
        weight = conv.weight.view(conv.out_channels, conv.in_channels // conv.groups, *kernel)
        return F.conv3d(x, weight, padding=tuple(k // 2 for k in kernel), groups=conv.groups)

    def cbr(x, seq, kernel):  # conv, BatchNorm3d with batch statistics, ReLU
        y = conv3d(x, seq[0], kernel)
        return F.relu(F.batch_norm(y, None, None, seq[1].weight, seq[1].bias, training=True, eps=seq[1].eps))

    def gate(x, g, kernel, dims):
        pooled = x.mean(dim=dims, keepdim=True)
        return x * torch.sigmoid(conv3d(cbr(pooled, g.fc1, kernel), g.fc2, kernel))

    def stage(v, st):
        s = gate(cbr(v, st.spatial, (1, 3, 3)), st.spatial_attention, (1, 3, 3), (2,))
        z = gate(cbr(v, st.temporal, (3, 1, 1)), st.temporal_attention, (3, 1, 1), (3, 4))
        return gate(s + z, st.channel_attention, (1, 1, 1), (3, 4))

    torch.manual_seed(0)
    n, c, h, w = 2, 32, 6, 5
    ct = CTInteraction(c, T).train()
    for m in ct.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial affine parameters
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
    x = torch.randn(n * T, c, h, w)
    v = x.view(n, T, c, h, w).transpose(1, 2)
    v = cbr(stage(v, ct.stage1), ct.fusion, (1, 1, 1))
    v = v.reshape(n, ct.gx, ct.gy, T, h, w).transpose(1, 2).reshape(n, c, T, h, w)
    v = stage(v, ct.stage2)
    v = v.reshape(n, ct.gy, ct.gx, T, h, w).transpose(1, 2).reshape(n, c, T, h, w)
    ref = v.transpose(1, 2).reshape(n * T, c, h, w)
    with torch.no_grad():
        torch.testing.assert_close(ct(x), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            ct(x.contiguous(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-5
        )
