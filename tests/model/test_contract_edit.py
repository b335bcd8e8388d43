"""The input contract's framing fields and `fermam contract`, which writes them into a checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint, read_metadata
from model.config import FERMamConfig, InputContract
from model.contract_edit import main as contract_main
from model.weights import default_weights_path


def test_template_scale_scales_the_template_about_the_crop_centre():
    plain = InputContract()
    tighter = replace(plain, template_scale=1.08)
    centre = plain.input_size / 2
    np.testing.assert_allclose(
        tighter.template_pixels() - centre, 1.08 * (plain.template_pixels() - centre), atol=1e-9
    )


@pytest.mark.parametrize("fields", [{"template_scale": 3.0}, {"padding": "reflect"}])
def test_invalid_framing_is_refused(fields):
    with pytest.raises(ValueError):
        InputContract(**fields)


def test_configs_from_before_the_framing_fields_load_with_the_old_behaviour():
    data = FERMamConfig().to_dict()
    for key in ("template_scale", "padding"):
        del data["contract"][key]
    contract = FERMamConfig.from_dict(data).contract
    assert contract.template_scale == 1.0 and contract.padding == "zeros"


def test_contract_command_writes_the_fields_and_keeps_the_weights(tmp_path, capsys):
    out = tmp_path / "framed.safetensors"
    code = contract_main(
        [
            "--set",
            "template_scale=1.1",
            "--set",
            "padding=border",
            "--out",
            str(out),
            "--version",
            "t-1",
            "--note",
            "why",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["template_scale"] == 1.1 and printed["padding"] == "border"
    original, _ = load_checkpoint(default_weights_path())
    changed, metadata = load_checkpoint(out)
    assert changed.config.contract == replace(original.config.contract, template_scale=1.1, padding="border")
    assert metadata["version"] == "t-1" and metadata["preprocessing"] == "why"
    assert read_metadata(out)["contract"]["padding"] == "border"
    for (name, a), (_, b) in zip(original.state_dict().items(), changed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_contract_command_refuses_bad_assignments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        contract_main(["--set", "template=1", "--out", str(tmp_path / "x.safetensors")])
    with pytest.raises(SystemExit):
        contract_main(["--set", "padding=border"])  # no --out: the shipped file is never changed
    assert contract_main(["--set", "template_scale=9", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert not (tmp_path / "x.safetensors").exists()
