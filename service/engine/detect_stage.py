"""Stage 1's batch function, with its cost set by settings rather than by the upload.

- Detection runs on a copy of each image downscaled to `max_side` (its longest side); boxes are
  mapped back to the original pixels and the 68 landmarks are fitted again on the original, so
  landmark precision is that of the full image. A 52 kB PNG that decodes to 6300x6300 costs what
  a 1280-pixel photo costs (dlib: ~0.9 s instead of 17 s on a 2-core CPU).
- A photo where no face is found is searched once more with a uniform grey margin around it
  (`retry_margin`, a fraction of its longest side): HOG-style detectors miss a face that fills
  the whole frame or is cut by its edges, as in tightly cropped portraits (16 of the 25 misses
  on realfaces-dev are found this way). Boxes found so may extend past the photo's edges.
- Items whose deadline has passed are dropped before their image runs, not only before their
  batch runs: a backend without batching (dlib) works through a batch one image at a time.
- `detect=false` needs an image large enough to hold a face: smaller ones are refused with a
  clear error instead of failing inside the alignment (a 1x1 image gave 500).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Protocol

import numpy as np
from PIL import Image

from service.engine.batcher import DeadlineExceeded
from service.engine.decode import ImageDecodeError
from service.engine.faces import Box, DetectedFace, FaceBackend, ImageFaces

# Smallest side of an image sent with detect=false: below it five landmarks cannot be told apart.
MIN_CROP_SIDE = 16


class FaceQuery(Protocol):
    """What a stage-1 item carries (pipeline's `_FaceQuery`)."""

    image: np.ndarray
    min_face_size: int
    boxes: tuple[Box, ...] | None
    deadline: float | None
    # With `boxes`: follow the faces in them (`FaceBackend.refit`) rather than only placing
    # landmarks; if any fit fails (or the backend cannot refit), the image is detected in full.
    refit: bool
    # Whether a miss is searched again inside a grey margin (not for stream frames: the next frame
    # comes anyway).
    retry: bool


class CropTooSmall(ImageDecodeError):
    """detect=false on an image too small to be a face crop (HTTP 422, image_too_small)."""

    code = "bad_image"  # the rejection metric's reason


def check_crop_size(width: int, height: int) -> None:
    if min(width, height) < MIN_CROP_SIDE:
        raise CropTooSmall(
            f"a {width}x{height} image is too small for detect=false; a face crop needs at least "
            f"{MIN_CROP_SIDE} pixels on each side"
        )


def downscaled(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """`image` resized so its longest side is at most `max_side`, and the factor applied (<= 1)."""
    height, width = image.shape[:2]
    longest = max(height, width)
    if longest <= max_side:
        return image, 1.0
    ratio = max_side / longest
    size = (max(1, round(width * ratio)), max(1, round(height * ratio)))
    # reducing_gap: a box reduction first, then bilinear; fast on huge images and alias-free.
    small = Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(small), ratio


# Detection cost per pixel of the original, relative to a pixel searched: downscaling and refitting
# landmarks on the original. Measured with dlib on a 2-core AMD EPYC: a 3000x3000 and a 6300x6300
# PNG (both searched at 1280 px) took 1.56 and 1.83 s, i.e. 0.009 s per extra megapixel against
# 0.90 s per searched megapixel.
ORIGINAL_PIXEL_SHARE = 0.01


def detect_units(width: int, height: int, max_side: int) -> float:
    """What detecting faces in a width x height image costs, in megapixels searched: the copy
    downscaled to `max_side` plus `ORIGINAL_PIXEL_SHARE` of the original's pixels."""
    pixels = width * height
    longest = max(width, height, 1)
    searched = pixels if longest <= max_side else pixels * (max_side / longest) ** 2
    return (searched + ORIGINAL_PIXEL_SHARE * pixels) / 1e6


# The margin's grey: mid-level, so it adds no edge a detector would take for a face's outline.
MARGIN_GREY = 128


def with_margin(image: np.ndarray, fraction: float) -> tuple[np.ndarray, int]:
    """`image` inside a grey margin of `fraction` of its longest side, and the margin in pixels."""
    margin = max(1, round(fraction * max(image.shape[:2])))
    framed = np.pad(image, ((margin, margin), (margin, margin), (0, 0)), constant_values=MARGIN_GREY)
    return framed, margin


def _shifted(faces: ImageFaces, offset: float) -> ImageFaces:
    """Faces found in a framed copy, in the coordinates of the image inside the frame."""
    moved = [
        DetectedFace(
            (face.box[0] - offset, face.box[1] - offset, face.box[2], face.box[3]),
            face.score,
            face.landmarks - np.float32(offset),
            face.detected,
        )
        for face in faces
    ]
    return ImageFaces(moved, skipped_small=faces.skipped_small)


def detect_bounded(
    backend: FaceBackend,
    images: Sequence[np.ndarray],
    min_sizes: Sequence[int],
    max_side: int,
    retry_margin: float = 0.0,
) -> list[ImageFaces]:
    """`backend.detect` on copies no longer than `max_side`; faces in original pixels.

    `min_sizes` are in original pixels (scaled for the search). Landmarks of a downscaled image
    are refitted on the original inside the mapped-back boxes; scores stay the detector's. With
    `retry_margin` > 0, images without a face are searched again inside a grey margin.
    """
    smalls = [downscaled(image, max_side) for image in images]
    small_min_sizes = [int(size * ratio) for size, (_, ratio) in zip(min_sizes, smalls, strict=True)]
    found = backend.detect([small for small, _ in smalls], min_face_size=small_min_sizes)
    misses = [k for k, faces in enumerate(found) if not faces] if retry_margin > 0 else []
    if misses:
        framed = [with_margin(smalls[k][0], retry_margin) for k in misses]
        again = backend.detect(
            [image for image, _ in framed], min_face_size=[small_min_sizes[k] for k in misses]
        )
        for k, (_, margin), faces in zip(misses, framed, again, strict=True):
            if faces or faces.skipped_small:
                found[k] = _shifted(faces, margin)
    results: list[ImageFaces] = []
    for image, (_, ratio), faces, min_size in zip(images, smalls, found, min_sizes, strict=True):
        if ratio == 1.0 or not faces:
            results.append(faces)
            continue
        boxes = [tuple(v / ratio for v in face.box) for face in faces]
        refitted = backend.landmarks_for_boxes(image, boxes)  # type: ignore[arg-type]
        mapped = [
            DetectedFace(fit.box, face.score, fit.landmarks, detected=True)
            for face, fit in zip(faces, refitted, strict=True)
        ]
        # A face that met min_size only after rounding in the small image is counted, not kept.
        kept = [face for face in mapped if face.size >= min_size]
        results.append(ImageFaces(kept, skipped_small=faces.skipped_small + len(mapped) - len(kept)))
    return results


def run_detect_batch(
    backend: FaceBackend,
    queries: Sequence[FaceQuery],
    max_side: int,
    retry_margin: float = 0.0,
    pool: Executor | None = None,
) -> list[ImageFaces | BaseException]:
    """Stage 1 over one batch: detection or given-box landmarks per query, deadlines honoured.

    A backend that does not batch images (dlib) gets one image at a time, each checked against
    its deadline just before it runs; with `pool` (and a backend safe to call from several
    threads) the images run on the pool's threads side by side, so a batch uses every core the
    pool has. A batching backend (face-alignment) gets the batch at once.
    """
    if backend.name != "dlib":
        return _run_batched(backend, queries, max_side, retry_margin)

    def one(query: FaceQuery) -> ImageFaces | BaseException:
        if query.deadline is not None and time.monotonic() >= query.deadline:
            return DeadlineExceeded("detect: deadline passed before this image ran")
        if query.boxes is not None and getattr(query, "refit", False):
            followed = follow(backend, query.image, query.boxes)
            if followed is not None:
                return followed
        elif query.boxes is not None:
            return ImageFaces(backend.landmarks_for_boxes(query.image, list(query.boxes)))
        margin = retry_margin if getattr(query, "retry", True) else 0.0
        return detect_bounded(backend, [query.image], [query.min_face_size], max_side, margin)[0]

    if pool is not None and backend.concurrent and len(queries) > 1:
        return list(pool.map(one, queries))
    return [one(query) for query in queries]


# Two followed faces overlapping this much have converged on one face: the frame is detected anew.
FOLLOW_MAX_IOU = 0.5


def follow(backend: FaceBackend, image: np.ndarray, boxes: Sequence[Box]) -> ImageFaces | None:
    """The faces in `boxes` followed into `image` (largest first), or None when the backend cannot
    refit, any fit fails, or two fits converged on one face: the caller then detects in full."""
    fits = backend.refit(image, list(boxes))
    if fits is None or any(fit is None for fit in fits):
        return None
    faces = [fit for fit in fits if fit is not None]
    for i, a in enumerate(faces):
        for b in faces[i + 1 :]:
            if _iou(a.box, b.box) > FOLLOW_MAX_IOU:
                return None
    faces.sort(key=lambda f: (-(f.box[2] * f.box[3]), -f.score))
    return ImageFaces(faces, refitted=True)


def _iou(a: Box, b: Box) -> float:
    left, top = max(a[0], b[0]), max(a[1], b[1])
    right, bottom = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0.0, right - left) * max(0.0, bottom - top)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _run_batched(
    backend: FaceBackend, queries: Sequence[FaceQuery], max_side: int, retry_margin: float
) -> list[ImageFaces | BaseException]:
    out: list[ImageFaces | BaseException | None] = [None] * len(queries)
    now = time.monotonic()
    chunk = []
    for k, query in enumerate(queries):
        if query.deadline is not None and now >= query.deadline:
            out[k] = DeadlineExceeded("detect: deadline passed before this image ran")
        elif query.boxes is not None and not getattr(query, "refit", False):
            out[k] = ImageFaces(backend.landmarks_for_boxes(query.image, list(query.boxes)))
        else:  # a refit on a batching backend (none can refit yet) is a full detection
            chunk.append(k)
    if chunk:
        retry = any(getattr(queries[k], "retry", True) for k in chunk)
        found = detect_bounded(
            backend,
            [queries[k].image for k in chunk],
            [queries[k].min_face_size for k in chunk],
            max_side,
            retry_margin if retry else 0.0,
        )
        if len(found) != len(chunk):
            raise RuntimeError(f"face backend answered {len(found)} of {len(chunk)} images")
        for k, faces in zip(chunk, found, strict=True):
            out[k] = faces
    return out  # type: ignore[return-value]
