"""The face-stage contract every backend implements: images in, boxes + 68 landmarks out.

Coordinates are always in the pixels of the image passed in (the upright image after EXIF
transpose); landmarks follow the iBUG / 300-W 68-point order.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from model.config import NUM_LANDMARKS, OUTER_EYE_CORNERS  # noqa: F401  (re-exported)

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class DetectedFace:
    """One face: box (x, y, width, height), detector score and 68 (x, y) points, image pixels.

    `detected` is False when the box was given by the caller (`landmarks_for_boxes`) rather than
    found by the detector; such faces carry `score=1.0` (the caller vouched for the box). Each
    backend documents the scale of its detector score.
    """

    box: Box
    score: float
    landmarks: np.ndarray = field(repr=False)
    detected: bool = True

    def __post_init__(self) -> None:
        if self.landmarks.shape != (NUM_LANDMARKS, 2) or self.landmarks.dtype != np.float32:
            got = f"{self.landmarks.dtype} {self.landmarks.shape}"
            raise ValueError(f"landmarks must be float32 of shape (68, 2), got {got}")

    @property
    def size(self) -> float:
        """The box's shorter side: what `min_face_size` is compared with."""
        return min(self.box[2], self.box[3])


class ImageFaces(list[DetectedFace]):
    """The faces of one image, largest first, plus how many were too small to report.

    A plain list for callers that only iterate; `skipped_small` lets the service tell the user
    that faces were found but dropped by `min_face_size` instead of silently returning fewer.
    """

    def __init__(
        self, faces: Sequence[DetectedFace] = (), *, skipped_small: int = 0, refitted: bool = False
    ) -> None:
        super().__init__(faces)
        self.skipped_small = skipped_small
        # True when the faces were followed from known boxes (`FaceBackend.refit`), not detected.
        self.refitted = refitted

    def __repr__(self) -> str:
        return (
            f"ImageFaces({list.__repr__(self)}, skipped_small={self.skipped_small}, refitted={self.refitted})"
        )


class FaceBackend(abc.ABC):
    """Detection + 68-point landmarks over a batch of images.

    Thread safety: `concurrent` says whether several threads may call a backend at once (dlib:
    yes, one detector per thread); one that is not (torch modules on one device) holds an internal
    lock, so concurrent use is serialised rather than corrupted, and the stage does not try.
    """

    name: str
    min_face_size: int
    concurrent: bool = False
    # Whether `refit` can follow faces between frames; a stream on a backend that cannot runs the
    # full detector on every frame.
    can_refit: bool = False

    @abc.abstractmethod
    def detect(
        self, images: Sequence[np.ndarray], *, min_face_size: int | Sequence[int] | None = None
    ) -> list[ImageFaces]:
        """Faces of every image (HxWx3 uint8 RGB), largest first.

        `min_face_size` overrides the backend default, for all images or per image (a request
        option); faces whose shorter box side is below it are dropped and counted in
        `ImageFaces.skipped_small`.
        """

    @abc.abstractmethod
    def landmarks_for_boxes(self, image: np.ndarray, boxes: Sequence[Box]) -> list[DetectedFace]:
        """68 points for each given box (x, y, w, h) of `image`; no detection runs."""

    def refit(self, image: np.ndarray, boxes: Sequence[Box]) -> list[DetectedFace | None] | None:
        """Follow known faces into a new frame: for each box (where a face was a frame ago), the
        face found near it with its 68 landmarks, or None where the fit fails (the face left, turned
        away or moved too far). None for the whole call: this backend cannot refit."""
        return None

    def warmup(self) -> None:
        """Run once on a synthetic image so the first request pays no lazy-initialisation cost."""
        rng = np.random.default_rng(0)
        self.detect([rng.integers(0, 256, size=(240, 320, 3), dtype=np.uint8)])
        self.landmarks_for_boxes(np.full((96, 96, 3), 128, dtype=np.uint8), [(8.0, 8.0, 80.0, 80.0)])


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Validate an input image and return it as a C-contiguous HxWx3 uint8 array.

    A 2-D (grayscale) array is replicated to three channels: pseudo-labelling feeds grayscale
    FER+ crops, and the service's decoder always produces RGB.
    """
    if image.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"images must be HxWx3 RGB, got shape {image.shape}")
    return np.ascontiguousarray(image)


def per_image_min_sizes(count: int, default: int, override: int | Sequence[int] | None) -> list[int]:
    """Expand a `min_face_size` argument (None, one value, or one per image) to one per image."""
    if override is None:
        return [default] * count
    if isinstance(override, int | np.integer):
        return [int(override)] * count
    sizes = [int(s) for s in override]
    if len(sizes) != count:
        raise ValueError(f"min_face_size has {len(sizes)} entries for {count} images")
    return sizes


def sort_and_filter(faces: Sequence[DetectedFace], min_face_size: int) -> ImageFaces:
    """Largest first (by box area, then score), faces below `min_face_size` dropped and counted."""
    kept = [f for f in faces if f.size >= min_face_size]
    kept.sort(key=lambda f: (-(f.box[2] * f.box[3]), -f.score))
    return ImageFaces(kept, skipped_small=len(faces) - len(kept))


def landmarks_in_crops(
    backend: FaceBackend,
    crops: Sequence[np.ndarray],
    *,
    fallback_box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0),
) -> list[DetectedFace]:
    """One face per crop (already centred on a face, e.g. FER+): detected if possible, else assumed.

    For each crop the largest detected face is used (`detected=True`; the detector's score is the
    quality signal). When the detector finds nothing, landmarks are placed inside `fallback_box`
    ((x, y, w, h) as fractions of the crop side; default the whole crop) with `detected=False`.
    Coordinates are in the crop's pixels. Upscale 48x48 crops first: dlib's HOG window is 80 px
    (FER+ at 144x144 with upsample=0 was detected in 81% of 300 validation faces, median box
    (0.07, 0.17, 0.87, 0.87) of the side).
    """
    rgb = [as_rgb_uint8(c) for c in crops]
    found = backend.detect(rgb, min_face_size=0)
    fx, fy, fw, fh = fallback_box
    results: list[DetectedFace] = []
    for crop, faces in zip(rgb, found, strict=True):
        if faces:
            results.append(faces[0])
            continue
        h, w = crop.shape[:2]
        results.append(backend.landmarks_for_boxes(crop, [(fx * w, fy * h, fw * w, fh * h)])[0])
    return results
