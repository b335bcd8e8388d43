"""Smoke training on real FER+ faces: both stages run end to end and their losses fall.

The full runs need a GPU (docs/training.md); these check the machinery on the CPU: data on the
device, augmentation, schedule, EMA, JSON-lines log, best-epoch checkpoint, resume. FERMam is
built shallower (one IR unit per stage) so one epoch over a few hundred faces fits CI.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.checkpoint import load_checkpoint
from model.data import load_npz, save_npz
from model.train import template_from_pseudo_labels
from model.train_cli import main as train_main
from service.commands.pseudo_landmarks import label_faces

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
VAL = SHARED / "data" / "ferplus" / "val.npz"

pytestmark = pytest.mark.slow


def _epochs(log: Path) -> list[dict]:
    return [r for r in map(json.loads, log.read_text().splitlines()) if r.get("event") == "epoch"]


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """192 real faces and the pseudo-landmarks the dlib face stage places on them."""
    root = tmp_path_factory.mktemp("smoke")
    data = load_npz(VAL).subset(slice(0, 192))
    save_npz(root / "faces.npz", data)
    labels = label_faces(data.images)
    np.savez(root / "labels.npz", **labels)
    return root / "faces.npz", root / "labels.npz"


def test_landmark_stage_loss_falls_and_weights_are_written(faces: tuple[Path, Path], tmp_path: Path) -> None:
    data, labels = faces
    out = tmp_path / "lm"
    args = ["landmarks", "--data", str(data), "--labels", str(labels), "--val-data", str(data)]
    args += ["--val-labels", str(labels), "--val-limit", "48", "--out", str(out), "--epochs", "1"]
    args += ["--batch-size", "16", "--warmup-epochs", "0.1", "--device", "cpu", "--no-progress"]
    assert train_main(args) == 0
    (epoch,) = _epochs(out / "log.jsonl")
    assert epoch["train_loss_last_quarter"] < epoch["train_loss_first_quarter"]
    assert np.isfinite(epoch["val_nme"])
    assert (out / "landmarks.safetensors").stat().st_size > 1_000_000


def test_fermam_stage_loss_falls_resumes_and_saves_a_loadable_checkpoint(
    faces: tuple[Path, Path], tmp_path: Path
) -> None:
    data, labels = faces
    out = tmp_path / "fermam"
    args = ["fermam", "--train", str(data), "--val", str(data), "--template-from", str(labels)]
    args += ["--out", str(out), "--batch-size", "16", "--warmup-epochs", "0.1", "--lr", "2e-3"]
    args += ["--ema-decay", "0.5", "--ir-units", "1", "1", "1", "--device", "cpu", "--no-progress"]
    assert train_main([*args, "--epochs", "1", "--limit", "128"]) == 0
    (first,) = _epochs(out / "log.jsonl")
    assert first["train_loss_last_quarter"] < first["train_loss_first_quarter"]

    # Resume continues at epoch 2 instead of starting over.
    assert train_main([*args, "--epochs", "2", "--limit", "128", "--resume"]) == 0
    assert [r["epoch"] for r in _epochs(out / "log.jsonl")] == [1, 2]

    model, metadata = load_checkpoint(out / "best.safetensors")
    contract = model.config.contract
    assert model.config.ir_units == (1, 1, 1)
    assert contract.template == template_from_pseudo_labels(labels)
    assert metadata["val_rows"] == 128 and 0.0 <= metadata["val_accuracy"] <= 1.0
    assert metadata["recipe"]["seed"] == 0


def _small_run(data: Path) -> list[str]:
    """`fermam train fermam` on 32 faces, one epoch, a shallow trunk: seconds on the CPU."""
    args = ["fermam", "--train", str(data), "--val", str(data), "--batch-size", "16", "--limit", "32"]
    return [*args, "--epochs", "1", "--ir-units", "1", "1", "1", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def small_checkpoint(faces: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of a small run, for the tests that start from one."""
    data, labels = faces
    out = tmp_path_factory.mktemp("small")
    assert train_main([*_small_run(data), "--template-from", str(labels), "--out", str(out)]) == 0
    return out / "best.safetensors"


def test_fermam_stage_continues_from_an_existing_checkpoint(
    faces: tuple[Path, Path], small_checkpoint: Path, tmp_path: Path
) -> None:
    data, _ = faces
    second = tmp_path / "second"
    # Continued on a 16-face sample per epoch, batch-norm statistics re-measured before validation.
    sampled = ["--epoch-size", "16", "--bn-recalibration", "24"]
    assert (
        train_main([*_small_run(data), *sampled, "--init-from", str(small_checkpoint), "--out", str(second)])
        == 0
    )
    (epoch,) = _epochs(second / "log.jsonl")
    assert epoch["faces"] == 16
    start, first_meta = load_checkpoint(small_checkpoint)
    continued, metadata = load_checkpoint(second / "best.safetensors")
    assert metadata["weights_from"] == (
        f"continued from best.safetensors (version {first_meta['version']}, {first_meta['weights_from']})"
    )
    assert metadata["recipe"]["epoch_size"] == 16 and metadata["recipe"]["bn_recalibration"] == 24
    # Same architecture and contract as the checkpoint it came from; the weights moved on.
    assert continued.config == start.config
    assert any(
        not a.equal(b)
        for a, b in zip(start.state_dict().values(), continued.state_dict().values(), strict=True)
    )


def test_recalibrate_bn_rewrites_only_the_statistics(
    faces: tuple[Path, Path], small_checkpoint: Path, tmp_path: Path
) -> None:
    data, _ = faces
    after_path = tmp_path / "recalibrated.safetensors"
    args = ["recalibrate-bn", "--weights", str(small_checkpoint), "--data", str(data), "--faces", "40"]
    args += ["--val", str(data), "--model-version", "test-1", "--device", "cpu", "--out", str(after_path)]
    assert train_main(args) == 0

    before, old = load_checkpoint(small_checkpoint)
    after, new = load_checkpoint(after_path)
    assert new["version"] == "test-1" and new["bn_recalibration"].startswith("40 unaugmented faces")
    assert new["recipe"] == old["recipe"] and 0.0 <= new["val_accuracy"] <= 1.0
    assert after.config == before.config
    old_state, new_state = before.state_dict(), after.state_dict()
    statistics = {k for k in old_state if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    landmark = {k for k in statistics if k.startswith("landmark_branch.")}
    changed = {k for k in old_state if not old_state[k].equal(new_state[k])}
    # Trainable BN statistics moved; weights and the frozen landmark branch's statistics did not.
    assert changed and changed <= statistics - landmark
