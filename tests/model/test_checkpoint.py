"""Checkpoints: metadata round trip, identical outputs after save -> load (fp32 and fp16), strict
loading, and initialisation from the research checkpoints' key layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.checkpoint import (
    load_checkpoint,
    load_mobilefacenet_weights,
    load_research_weights,
    read_metadata,
    save_checkpoint,
    save_module,
)
from model.config import RAFDB_CLASSES, FERMamConfig
from model.fermam import FERMam
from model.mobilefacenet import MobileFaceNet
from model.weights import default_weights_path


@pytest.fixture(scope="module")
def model() -> FERMam:
    torch.manual_seed(0)
    return FERMam(FERMamConfig(class_names=RAFDB_CLASSES)).eval()


@pytest.fixture(scope="module")
def face() -> torch.Tensor:
    return torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))


def test_save_then_load_gives_identical_outputs_and_metadata(model, face, tmp_path: Path):
    provenance = {"training_data": "FER+ train (FER2013 Training)", "val_accuracy": 0.8123, "epochs": 3}
    path = save_checkpoint(tmp_path / "fermam.safetensors", model, metadata=provenance)
    loaded, metadata = load_checkpoint(path)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(face), model(face))
    assert metadata["config"] == model.config
    assert metadata["class_names"] == list(RAFDB_CLASSES)
    assert metadata["contract"]["input_size"] == 112
    assert {k: metadata[k] for k in provenance} == provenance  # types preserved (float, int, str)
    assert read_metadata(path)["val_accuracy"] == 0.8123


def test_the_scoring_rule_survives_save_and_load(model, face, tmp_path: Path):
    from dataclasses import replace

    prior = (0.3, 0.1, 0.05, 0.25, 0.1, 0.1, 0.1)
    ruled = FERMam(replace(model.config, temperature=1.04, class_prior=prior, prior_exponent=0.5))
    ruled.load_state_dict(model.state_dict())
    path = save_checkpoint(tmp_path / "ruled.safetensors", ruled)
    loaded, metadata = load_checkpoint(path)
    assert loaded.config == ruled.config
    assert (loaded.config.temperature, loaded.config.class_prior, loaded.config.prior_exponent) == (
        1.04,
        prior,
        0.5,
    )
    assert metadata["config"].class_prior == prior


def test_checkpoints_from_before_the_scoring_rule_load_unchanged(model, face, tmp_path: Path):
    """A file whose config JSON predates the temperature and the prior (as every checkpoint did
    before them) loads with the rule that changes nothing: T = 1, no prior, exponent 0."""
    import json

    path = save_checkpoint(tmp_path / "new.safetensors", model)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (not a dict)
    config = json.loads(metadata["fermam_config"])
    for key in ("temperature", "class_prior", "prior_exponent"):
        del config[key]
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=metadata | {"fermam_config": json.dumps(config)})
    loaded, _ = load_checkpoint(old)
    assert loaded.config == model.config
    assert (loaded.config.temperature, loaded.config.class_prior, loaded.config.prior_exponent) == (
        1.0,
        None,
        0.0,
    )
    with torch.no_grad():
        assert torch.equal(loaded(face), model(face))


def test_fp16_checkpoint_loads_into_fp32_modules(model, face, tmp_path: Path):
    path = save_checkpoint(tmp_path / "half.safetensors", model, dtype=torch.float16)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.get_tensor("head.weight").dtype == torch.float16
        assert handle.get_tensor("ir50.units.0.bn_out.num_batches_tracked").dtype == torch.int64
    loaded, _ = load_checkpoint(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    with torch.no_grad():
        expected, actual = model(face), loaded(face)
    assert torch.allclose(actual, expected, rtol=0.02, atol=0.02 * expected.abs().max().item())


def test_strict_loading_names_missing_and_unexpected_keys(model, tmp_path: Path):
    path = save_checkpoint(tmp_path / "ok.safetensors", model)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (not a dict)
    del tensors["fusion.scales.0.D"]
    tensors["extra.weight"] = torch.zeros(3)
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=metadata)
    with pytest.raises(ValueError, match="missing") as error:
        load_checkpoint(broken)
    assert "fusion.scales.0.D" in str(error.value) and "extra.weight" in str(error.value)


def test_reserved_metadata_keys_are_refused(model, tmp_path: Path):
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "x.safetensors", model, metadata={"fermam_config": "{}"})


def test_landmark_branch_saved_alone_loads_into_fermam(tmp_path: Path):
    torch.manual_seed(3)
    pretrained = MobileFaceNet().eval()
    path = save_module(
        tmp_path / "landmarks.safetensors", pretrained, {"task": "68-point landmarks", "nme": 0.05}
    )
    target = FERMam()
    load_mobilefacenet_weights(target.landmark_branch, path)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(target.landmark_branch(x), pretrained(x))
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["task"] == "68-point landmarks"


def test_default_weights_path_points_into_the_package():
    path = default_weights_path()
    assert path.name == "fermam-ferplus.safetensors"
    assert path.parent.name == "weights" and path.parent.parent.name == "model"


# --- research checkpoints, built key by key from the published layouts ----------------------------


def _bn(state: dict, prefix: str, channels: int, gen: torch.Generator) -> None:
    state[f"{prefix}.weight"] = torch.rand(channels, generator=gen) + 0.5
    state[f"{prefix}.bias"] = torch.randn(channels, generator=gen)
    state[f"{prefix}.running_mean"] = torch.randn(channels, generator=gen)
    state[f"{prefix}.running_var"] = torch.rand(channels, generator=gen) + 0.5
    state[f"{prefix}.num_batches_tracked"] = torch.tensor(1000)


def evolve_ir50_state() -> dict[str, torch.Tensor]:
    """face.evoLVe IR-50 (112x112): input_layer = (conv, BN, PReLU); body.N = bottleneck_IR with
    res_layer = (BN, conv3x3, PReLU, conv3x3, BN) and, where widths change, shortcut_layer =
    (conv1x1, BN); stages of 3, 4, 14, 3 units of 64, 128, 256, 512; output_layer = (BN2d,
    Dropout, Flatten, Linear, BN1d)."""
    gen = torch.Generator().manual_seed(7)
    state: dict[str, torch.Tensor] = {"input_layer.0.weight": torch.randn(64, 3, 3, 3, generator=gen)}
    _bn(state, "input_layer.1", 64, gen)
    state["input_layer.2.weight"] = torch.rand(64, generator=gen)
    index, in_channels = 0, 64
    for depth, units in zip((64, 128, 256, 512), (3, 4, 14, 3), strict=True):
        for unit in range(units):
            unit_in = in_channels if unit == 0 else depth
            p = f"body.{index}"
            if unit_in != depth:
                state[f"{p}.shortcut_layer.0.weight"] = torch.randn(depth, unit_in, 1, 1, generator=gen)
                _bn(state, f"{p}.shortcut_layer.1", depth, gen)
            _bn(state, f"{p}.res_layer.0", unit_in, gen)
            # Stage 4 is never used by FERMam: zeros are enough there and much cheaper to make.
            fill = torch.randn if depth < 512 else (lambda *shape, generator: torch.zeros(*shape))
            state[f"{p}.res_layer.1.weight"] = fill(depth, unit_in, 3, 3, generator=gen)
            state[f"{p}.res_layer.2.weight"] = torch.rand(depth, generator=gen)
            state[f"{p}.res_layer.3.weight"] = fill(depth, depth, 3, 3, generator=gen)
            _bn(state, f"{p}.res_layer.4", depth, gen)
            index += 1
        in_channels = depth
    _bn(state, "output_layer.0", 512, gen)
    state["output_layer.3.weight"] = torch.zeros(512, 512 * 7 * 7)
    state["output_layer.3.bias"] = torch.zeros(512)
    _bn(state, "output_layer.4", 512, gen)
    return state


def landmark_mobilefacenet_state(outputs: int) -> dict[str, torch.Tensor]:
    """The MobileFaceNet landmark network's layout: Conv_block = conv/bn/prelu, Linear_block =
    conv/bn, Depth_Wise = conv (1x1 expand) / conv_dw / project, Residual = model.i, GDC head."""
    gen = torch.Generator().manual_seed(11)
    state: dict[str, torch.Tensor] = {}

    def block(prefix, cin, cout, kernel=1, groups=1, prelu=True):
        state[f"{prefix}.conv.weight"] = torch.randn(cout, cin // groups, kernel, kernel, generator=gen)
        _bn(state, f"{prefix}.bn", cout, gen)
        if prelu:
            state[f"{prefix}.prelu.weight"] = torch.rand(cout, generator=gen)

    def depth_wise(prefix, cin, cout, expanded):
        block(f"{prefix}.conv", cin, expanded)
        block(f"{prefix}.conv_dw", expanded, expanded, 3, groups=expanded)
        block(f"{prefix}.project", expanded, cout, prelu=False)

    block("conv1", 3, 64, 3)
    block("conv2_dw", 64, 64, 3, groups=64)
    depth_wise("conv_23", 64, 64, 128)
    for i in range(4):
        depth_wise(f"conv_3.model.{i}", 64, 64, 128)
    depth_wise("conv_34", 64, 128, 256)
    for i in range(6):
        depth_wise(f"conv_4.model.{i}", 128, 128, 256)
    depth_wise("conv_45", 128, 128, 512)
    for i in range(2):
        depth_wise(f"conv_5.model.{i}", 128, 128, 256)
    block("conv_6_sep", 128, 512)
    block("output_layer.conv_6_dw", 512, 512, 7, groups=512, prelu=False)
    state["output_layer.linear.weight"] = torch.randn(outputs, 512, generator=gen)
    _bn(state, "output_layer.bn", outputs, gen)
    return state


def test_ir50_research_checkpoint_initialises_the_trunk():
    research = evolve_ir50_state()
    model = FERMam()
    report = load_research_weights(model, ir50_state={"module." + k: v for k, v in research.items()})
    ours = model.ir50.state_dict()
    pairs = {
        "stem.0.weight": "input_layer.0.weight",
        "stem.1.running_var": "input_layer.1.running_var",
        "stem.2.weight": "input_layer.2.weight",
        "units.0.bn_in.weight": "body.0.res_layer.0.weight",
        "units.3.shortcut.0.weight": "body.3.shortcut_layer.0.weight",
        "units.3.shortcut.1.running_mean": "body.3.shortcut_layer.1.running_mean",
        "units.7.conv1.weight": "body.7.res_layer.1.weight",
        "units.12.act.weight": "body.12.res_layer.2.weight",
        "units.20.conv2.weight": "body.20.res_layer.3.weight",
        "units.20.bn_out.bias": "body.20.res_layer.4.bias",
    }
    for our_key, research_key in pairs.items():
        assert torch.equal(ours[our_key], research[research_key]), our_key
    # Our trunk has exactly the stem and the first 21 units of the checkpoint.
    assert len(ours) == sum(
        1 for k in research if not k.startswith(("body.21", "body.22", "body.23", "output"))
    )
    unused = set(report["ir50_unused"])
    assert "output_layer.3.weight" in unused and "body.21.res_layer.1.weight" in unused
    assert not any(k.startswith("body.20.") for k in unused)


def test_ir50_checkpoint_with_a_missing_key_is_refused():
    research = evolve_ir50_state()
    del research["body.5.res_layer.3.weight"]
    with pytest.raises(ValueError, match=r"units\.5\.conv2\.weight"):
        load_research_weights(FERMam(), ir50_state=research)


def test_mobilefacenet_research_checkpoint_initialises_the_landmark_branch(tmp_path: Path):
    research = landmark_mobilefacenet_state(outputs=136)
    wrapped = {
        "epoch": 120,
        "state_dict": {"module." + k: v for k, v in research.items()}
        | {"module.heatmap_weight": torch.ones(68)},
    }
    path = tmp_path / "mobilefacenet_model_best.pth.tar"
    torch.save(wrapped, path)
    model = FERMam()
    report = load_research_weights(model, mobilefacenet_path=path)
    branch = model.landmark_branch.state_dict()
    assert set(branch) == set(research)
    for key, value in research.items():
        assert torch.equal(branch[key], value), key
    assert report["mobilefacenet_unused"] == ["heatmap_weight"]
    assert report["mobilefacenet_head_kept"] == []


def test_mobilefacenet_checkpoint_with_another_head_keeps_ours():
    research = landmark_mobilefacenet_state(outputs=512)  # the 512-d GDC head FERMam's release loads
    model = FERMam()
    head_before = model.landmark_branch.output_layer.linear.weight.clone()
    report = load_research_weights(model, mobilefacenet_state={"state_dict": research})
    assert torch.equal(model.landmark_branch.output_layer.linear.weight, head_before)
    assert torch.equal(model.landmark_branch.conv_6_sep.conv.weight, research["conv_6_sep.conv.weight"])
    assert "output_layer.linear.weight" in report["mobilefacenet_head_kept"]
    assert "output_layer.linear.weight" in report["mobilefacenet_unused"]
