"""`fermam calibrate`: the scoring rule fitted on real photos through the engine, written into a
checkpoint whose tensors are untouched, and shown by `fermam contract`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.calibration import PRIOR_EXPONENTS
from model.checkpoint import load_checkpoint
from model.contract_edit import main as contract_main
from service.commands.calibrate import main as calibrate_main

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"
DEV = SHARED / "realfaces-dev"
TRAIN = SHARED / "ferplus" / "train.npz"
PER_CLASS = 5  # photos of each of the five large classes: 25 real photos, a minute on two cores


@pytest.fixture(scope="module")
def small_dev(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few photos of each large class of realfaces-dev (its manifest is sorted by label, so its
    first rows are one class): a manifest of their names, the images linked, not copied."""
    if not (DEV / "manifest.csv").is_file() or not TRAIN.is_file():
        pytest.fail(f"realfaces-dev or FER+ train not found under {SHARED}")
    with (DEV / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    kept = []
    for label in ("neutral", "happiness", "surprise", "sadness", "anger"):
        kept += [row for row in rows if row["label"] == label][:PER_CLASS]
    folder = tmp_path_factory.mktemp("dev")
    (folder / "images").symlink_to((DEV / "images").resolve())
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "label"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)
    return folder


def test_calibrate_fits_the_rule_on_photos_and_writes_it_into_the_contract(
    small_dev: Path, weights_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ruled.safetensors"
    argv = ["--photos", str(small_dev), "--prior-from", str(TRAIN), "--cv-repeats", "1", "--device", "cpu"]
    argv += ["--dtype", "float32", "--out", str(out), "--version", "t-30"]
    assert calibrate_main(argv) == 0
    summary = json.loads(capsys.readouterr().out)

    assert summary["photos_n"] == 5 * PER_CLASS and summary["engine_dtype"] == "float32"
    labels = np.load(TRAIN)["labels"]
    expected_prior = np.bincount(labels, minlength=8) / len(labels)
    assert list(summary["prior"].values()) == pytest.approx(list(expected_prior))
    assert summary["prior_exponent"] in PRIOR_EXPONENTS and summary["temperature"] > 0
    # The reported figures are the scan's at the chosen exponent: one computation, not two.
    row = next(r for r in summary["scan"] if r["exponent"] == summary["prior_exponent"])
    assert summary["photos_after"]["accuracy"] == pytest.approx(row["accuracy"])
    assert summary["photos_after"]["macro_recall"] == pytest.approx(row["macro_recall"])
    assert 0 <= summary["photos_after"]["ece"] <= 1 and "cross_validation" in summary

    before, _ = load_checkpoint(weights_path)
    after, metadata = load_checkpoint(out)
    assert after.config.prior_exponent == summary["prior_exponent"]
    assert after.config.temperature == pytest.approx(summary["temperature"])
    assert after.config.class_prior == pytest.approx(tuple(expected_prior))
    assert after.config.contract == before.config.contract
    assert metadata["version"] == "t-30" and small_dev.name in metadata["calibration"]
    for (name, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    assert contract_main(["--weights", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)["scoring"]
    assert shown["prior_exponent"] == summary["prior_exponent"]
    assert shown["class_prior"]["neutral"] == pytest.approx(expected_prior[0])


def test_calibrate_without_a_prior_anywhere_says_what_is_missing(
    small_dev: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dataclasses import replace

    from model.checkpoint import provenance_of, save_checkpoint
    from model.weights import default_weights_path

    model, metadata = load_checkpoint(default_weights_path())
    model.config = replace(model.config, class_prior=None, prior_exponent=0.0)
    bare = save_checkpoint(tmp_path / "bare.safetensors", model, metadata=provenance_of(metadata))
    assert calibrate_main(["--photos", str(small_dev), "--weights", str(bare)]) == 2
    assert "--prior-from" in capsys.readouterr().err
