"""Ground truth for the face tests: the real photos, their 68-point annotations, IoU and error."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared"
PHOTOS = SHARED / "data" / "photos"
FERPLUS = SHARED / "data" / "ferplus"
ANNOTATION_FILES = ("dlib_training_with_face_landmarks.xml", "dlib_testing_with_face_landmarks.xml")


@dataclass
class DetectQuery:
    """A stage-1 item as run_detect_batch takes it (the FaceQuery protocol), for calling the stage
    directly."""

    image: np.ndarray
    min_face_size: int = 0
    boxes: tuple[tuple[float, float, float, float], ...] | None = None
    deadline: float | None = None
    refit: bool = False
    retry: bool = True


@dataclass(frozen=True)
class AnnotatedFace:
    box: tuple[float, float, float, float]
    landmarks: np.ndarray  # (68, 2) float64


def load_photo(name: str) -> np.ndarray:
    """A photo as an HxWx3 uint8 RGB array."""
    with Image.open(PHOTOS / name) as im:
        return np.asarray(im.convert("RGB"))


def read_annotations() -> dict[str, list[AnnotatedFace]]:
    """The 43 annotated faces of the nine VOC photos, by file name."""
    faces: dict[str, list[AnnotatedFace]] = {}
    for xml_name in ANNOTATION_FILES:
        for image in ET.parse(PHOTOS / "annotations" / xml_name).getroot().iter("image"):
            entries = []
            for box in image.iter("box"):
                parts = sorted(box.iter("part"), key=lambda p: int(p.get("name")))
                points = np.array([(float(p.get("x")), float(p.get("y"))) for p in parts])
                entries.append(
                    AnnotatedFace(
                        (
                            float(box.get("left")),
                            float(box.get("top")),
                            float(box.get("width")),
                            float(box.get("height")),
                        ),
                        points,
                    )
                )
            faces[image.get("file")] = entries
    return faces


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def normalised_landmark_error(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Mean point distance divided by the outer-eye-corner distance (points 36 and 45)."""
    return float(np.linalg.norm(predicted - truth, axis=1).mean() / np.linalg.norm(truth[36] - truth[45]))
