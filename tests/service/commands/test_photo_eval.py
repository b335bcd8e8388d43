"""`fermam eval --photos`: the whole pipeline on real labelled photos, scored by the dev set's rules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.commands.photo_eval import evaluate_photos, read_manifest

DEV = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "realfaces-dev"


@pytest.fixture(scope="module")
def dev() -> Path:
    if not (DEV / "manifest.csv").is_file():
        pytest.fail(f"realfaces-dev not found at {DEV}")
    return DEV


def test_scores_follow_the_scoring_convention(dev: Path, engine_factory) -> None:
    result = evaluate_photos(engine_factory(), dev, limit=12)
    rows = read_manifest(dev)[:12]
    assert len(result.predictions) == 12
    assert [p["image"] for p in result.predictions] == [name for name, _ in rows]
    hits = sum(p["prediction"] == p["label"] for p in result.predictions)
    assert result.report.accuracy == pytest.approx(hits / 12)
    found = sum(p["prediction"] is not None for p in result.predictions)
    assert result.face_found_rate == pytest.approx(found / 12)
    assert result.report.confusion.sum() == found  # photos without a face are not in the matrix
    # The shipped model is right on more than a third of real photos (0.6 on the whole dev set).
    assert result.report.accuracy > 0.34
    for p in result.predictions:
        if p["prediction"] is not None:
            assert sum(p["scores"].values()) == pytest.approx(1.0, abs=1e-4)


class _AlwaysNeutral:
    """An engine stand-in that finds one face in every photo and calls it neutral."""

    class_names = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def infer(self, images, options, **kwargs):
        from types import SimpleNamespace

        face = SimpleNamespace(
            expression="neutral", scores={c: float(c == "neutral") for c in self.class_names}
        )
        return SimpleNamespace(images=[SimpleNamespace(faces=[face])])


def test_macro_recall_is_also_given_over_the_classes_with_enough_photos(dev: Path) -> None:
    """Disgust, fear and contempt have 5-7 photos each: the mean over the five classes with at
    least 20 photos is reported beside the 8-class one."""
    result = evaluate_photos(_AlwaysNeutral(), dev)
    assert result.common_classes == ("neutral", "happiness", "surprise", "sadness", "anger")
    assert result.macro_recall == pytest.approx(1 / 8)
    assert result.macro_recall_common == pytest.approx(1 / 5)
    summary = result.to_dict()
    assert summary["macro_recall_common"] == pytest.approx(1 / 5) and summary["common_class_min_photos"] == 20


def test_cli_prints_json_and_confusion_png(dev: Path, tmp_path: Path) -> None:
    png = tmp_path / "confusion.png"
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "eval", "--photos", str(dev), "--limit", "4", "--device", "cpu",
         "--json", "--confusion", str(png)],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"accuracy", "macro_recall", "macro_recall_common", "face_found_rate", "per_class_recall"} <= set(
        summary
    )
    assert summary["macro_recall_common"] is None  # four photos: no class has 20
    assert summary["n"] == 4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_a_folder_without_manifest(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "eval", "--photos", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1
    assert "manifest.csv" in out.stderr
