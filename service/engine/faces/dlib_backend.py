"""dlib backend: HOG frontal-face detector + the 68-point shape predictor, no downloads needed.

The predictor ships inside the `face-recognition-models` package (see docs/face-models.md for
its licence: trained on iBUG 300-W, non-commercial terms).

Detector score: the HOG SVM margin from `fhog_object_detector.run`; detections start at
`adjust_threshold` (0.0 by default) and good frontal faces usually score 0.5 to 3.

`upsample`: how many times the image is doubled before detection. HOG's window is 80x80 px, so
with 0 the smallest face found is ~80 px, with 1 ~40 px, with 2 ~20 px; each doubling costs about
4x the time. docs/face-models.md has the measured recall per setting.
"""

from __future__ import annotations

import importlib.util
import math
import threading
from collections.abc import Sequence
from pathlib import Path

import dlib
import numpy as np
from PIL import Image

from service.engine.faces.base import (
    NUM_LANDMARKS,
    Box,
    DetectedFace,
    FaceBackend,
    ImageFaces,
    as_rgb_uint8,
    per_image_min_sizes,
    sort_and_filter,
)

PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"

# refit: the search area around a known box (a fraction of its side on every side), the size its
# box is scaled to (HOG's window is 80 px, so the face is found on the first pyramid levels), and
# how much the found box must overlap the known one to be the same face.
REFIT_MARGIN = 0.5
REFIT_FACE_PX = 100
REFIT_MIN_IOU = 0.3


def bundled_models_dir() -> Path:
    """The `models/` folder of face-recognition-models, found without importing the package.

    Importing it fails on new setuptools (it imports pkg_resources), so locate it via its spec.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("face-recognition-models is not installed (pip install face-recognition-models)")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class DlibFaceBackend(FaceBackend):
    """HOG detection + dlib's 68-point regression-tree predictor, on the CPU."""

    name = "dlib"
    concurrent = True  # one detector per calling thread, a shared predictor
    can_refit = True

    def __init__(
        self,
        *,
        min_face_size: int = 20,
        upsample: int = 1,
        adjust_threshold: float = 0.0,
        weights_dir: Path | None = None,
    ) -> None:
        if upsample < 0:
            raise ValueError("upsample must be >= 0")
        predictor_path = Path(weights_dir or bundled_models_dir()) / PREDICTOR_FILE
        if not predictor_path.is_file():
            raise FileNotFoundError(
                f"dlib 68-point predictor not found: {predictor_path} "
                f"(install face-recognition-models or put {PREDICTOR_FILE} in weights_dir)"
            )
        self.min_face_size = int(min_face_size)
        self.upsample = int(upsample)
        self.adjust_threshold = float(adjust_threshold)
        self.predictor_path = predictor_path
        # dlib's object_detector keeps per-call state (not safe to share between threads); its
        # shape_predictor does not (one instance may serve many threads). So each thread gets its
        # own detector (a few kB) and all share the 99 MB predictor: images run in parallel.
        self._predictor = dlib.shape_predictor(str(predictor_path))
        self._local = threading.local()

    def _detector(self) -> dlib.fhog_object_detector:
        detector = getattr(self._local, "detector", None)
        if detector is None:
            detector = self._local.detector = dlib.get_frontal_face_detector()
        return detector

    def detect(
        self, images: Sequence[np.ndarray], *, min_face_size: int | Sequence[int] | None = None
    ) -> list[ImageFaces]:
        min_sizes = per_image_min_sizes(len(images), self.min_face_size, min_face_size)
        results: list[ImageFaces] = []
        detector = self._detector()
        # HOG has no batch mode: one image after another, each single-threaded, with no copy
        # beyond making the array contiguous (callers wanting both cores call from two threads).
        for image, min_size in zip(images, min_sizes, strict=True):
            rgb = as_rgb_uint8(image)
            rects, scores, _ = detector.run(rgb, self.upsample, self.adjust_threshold)
            faces = [
                self._face_for_rect(rgb, rect, float(score), detected=True)
                for rect, score in zip(rects, scores, strict=True)
            ]
            results.append(sort_and_filter(faces, min_size))
        return results

    def refit(self, image: np.ndarray, boxes: Sequence[Box]) -> list[DetectedFace | None]:
        """The HOG detector on a small crop around each known box (scaled so the face is about
        `REFIT_FACE_PX`: ~2-4 ms instead of ~200 ms for a 640x480 frame), then the 68 landmarks
        in the box it finds. The fit-quality check is the detector's own: a face must score above
        `adjust_threshold` there and overlap the known box by `REFIT_MIN_IOU`, else None."""
        rgb = as_rgb_uint8(image)
        height, width = rgb.shape[:2]
        detector = self._detector()
        faces: list[DetectedFace | None] = []
        for x, y, w, h in boxes:
            side = max(w, h)
            margin = REFIT_MARGIN * side
            left, top = max(0, int(x - margin)), max(0, int(y - margin))
            right, bottom = (
                min(width, int(np.ceil(x + w + margin))),
                min(height, int(np.ceil(y + h + margin))),
            )
            if side <= 0 or right - left < 16 or bottom - top < 16:
                faces.append(None)
                continue
            # A scale on the full detector's pyramid (2**upsample, then steps of 5/6), so the box
            # found here is the one a full detection would find.
            top_scale = 2.0**self.upsample
            steps = max(0, math.floor(math.log(top_scale * side / REFIT_FACE_PX) / math.log(6 / 5)))
            scale = top_scale * (5 / 6) ** steps
            crop = rgb[top:bottom, left:right]
            size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
            crop = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.BILINEAR))
            rects, scores, _ = detector.run(crop, 0, self.adjust_threshold)
            known = ((x - left) * scale, (y - top) * scale, w * scale, h * scale)
            best, best_iou = None, REFIT_MIN_IOU
            for rect, score in zip(rects, scores, strict=True):
                found = (rect.left(), rect.top(), rect.width(), rect.height())
                overlap = _iou(found, known)
                if overlap >= best_iou:
                    best, best_iou = (found, float(score)), overlap
            if best is None:
                faces.append(None)
                continue
            (fx, fy, fw, fh), score = best
            box = (fx / scale + left, fy / scale + top, fw / scale, fh / scale)
            fit = self.landmarks_for_boxes(rgb, [box])[0]
            faces.append(DetectedFace(fit.box, score, fit.landmarks, detected=True))
        return faces

    def landmarks_for_boxes(self, image: np.ndarray, boxes: Sequence[Box]) -> list[DetectedFace]:
        rgb = as_rgb_uint8(image)
        faces = []
        for x, y, w, h in boxes:
            if w <= 0 or h <= 0:
                raise ValueError(f"box must have positive width and height, got {(x, y, w, h)}")
            rect = dlib.rectangle(int(round(x)), int(round(y)), int(round(x + w)) - 1, int(round(y + h)) - 1)
            face = self._face_for_rect(rgb, rect, 1.0, detected=False)
            # Keep the caller's box exactly, not its integer rounding.
            faces.append(DetectedFace((float(x), float(y), float(w), float(h)), 1.0, face.landmarks, False))
        return faces

    def _face_for_rect(
        self, rgb: np.ndarray, rect: dlib.rectangle, score: float, *, detected: bool
    ) -> DetectedFace:
        shape = self._predictor(rgb, rect)
        points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
        if points.shape != (NUM_LANDMARKS, 2):
            raise RuntimeError(f"predictor returned {points.shape[0]} points, expected 68")
        # dlib rectangles are inclusive: width = right - left + 1.
        box = (float(rect.left()), float(rect.top()), float(rect.width()), float(rect.height()))
        return DetectedFace(box, score, points, detected)


def _iou(a: Box, b: Box) -> float:
    left, top = max(a[0], b[0]), max(a[1], b[1])
    right, bottom = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0.0, right - left) * max(0.0, bottom - top)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0
