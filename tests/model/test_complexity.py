"""`fermam complexity`: totals near the released model's, per-module rows that add up, options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.checkpoint import save_checkpoint
from model.complexity import REFERENCE_MACS, REFERENCE_PARAMS, main
from model.config import RAFDB_CLASSES, FERMamConfig
from model.fermam import FERMam


def run_json(capsys, *argv: str) -> dict:
    assert main(["--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_eight_classes_land_within_3_percent_of_the_released_model(capsys):
    result = run_json(capsys)
    assert abs(result["params"] / REFERENCE_PARAMS - 1) < 0.03
    assert abs(result["macs"] / REFERENCE_MACS - 1) < 0.03
    modules = result["modules"]
    assert sum(row["params"] for row in modules.values()) == result["params"]
    assert sum(row["macs"] for row in modules.values()) == result["macs"]
    # IR-50 stages 1-3 carry about 95% of the compute, as the design notes say.
    assert 0.9 < modules["ir50"]["macs"] / result["macs"] < 0.97
    assert modules["landmark_branch"]["macs"] > 0
    assert modules["head"]["params"] == 512 * 8 + 8


def test_class_count_and_table(capsys):
    assert run_json(capsys, "--classes", "7")["modules"]["head"]["params"] == 512 * 7 + 7
    assert main([]) == 0
    table = capsys.readouterr().out
    assert "ir50" in table and "total" in table and "G MACs" in table


def test_weights_option_reads_the_checkpoint_config(capsys, tmp_path: Path):
    path = save_checkpoint(tmp_path / "raf.safetensors", FERMam(FERMamConfig(class_names=RAFDB_CLASSES)))
    assert run_json(capsys, "--weights", str(path))["modules"]["head"]["params"] == 512 * 7 + 7


def test_bad_class_count_is_an_error():
    with pytest.raises(SystemExit):
        main(["--classes", "0"])
