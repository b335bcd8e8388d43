"""`fermam predict` as a user runs it: a real process, real weights, the shipped sample photo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO / "samples" / "grace_hopper.jpg"
GROUP = REPO / ".." / "shared" / "data" / "photos" / "2008_001322.jpg"  # three faces


def predict(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "service.cli", "predict", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_json_and_annotation_of_two_photos(tmp_path) -> None:
    result = predict(str(SAMPLE), str(GROUP), "--json", "--top-k", "2", "--annotate", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    sample, group = (json.loads(line) for line in result.stdout.splitlines())
    assert [len(sample["images"][0]["faces"]), len(group["images"][0]["faces"])] == [1, 3]
    face = sample["images"][0]["faces"][0]
    assert len(face["top"]) == 2 and face["expression"] == face["top"][0]["label"]
    assert face["pose"] is not None and face["quality"] is not None
    drawn = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in drawn] == ["0-grace_hopper.png", "1-2008_001322.png"]
    # The drawing is the photo plus the box outline in the first face's colour (#00e676).
    original = np.asarray(Image.open(SAMPLE).convert("RGB"), dtype=np.int16)
    annotated = np.asarray(Image.open(drawn[0]).convert("RGB"), dtype=np.int16)
    assert annotated.shape == original.shape
    box = face["box"]
    left, top, bottom = round(box["x"]), round(box["y"]), round(box["y"] + box["height"])
    edge = annotated[top + 5 : bottom - 5, left]
    assert (np.abs(edge - (0x00, 0xE6, 0x76)).sum(axis=1) < 40).mean() > 0.9
    far = (slice(0, 20), slice(0, 20))  # a corner no drawing reaches is unchanged
    assert np.array_equal(annotated[far], original[far])


def test_text_output_and_a_file_that_is_not_an_image(tmp_path) -> None:
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    result = predict(str(SAMPLE), str(bad))
    assert result.returncode == 1
    assert "grace_hopper.jpg: 517x606, 1 face(s)" in result.stdout and "pose yaw" in result.stdout
    assert "notes.jpg" in result.stderr


def test_missing_file_is_a_usage_error() -> None:
    result = predict("/nonexistent/photo.jpg")
    assert result.returncode == 2 and "no such file" in result.stderr
