"""Faces that fill the frame or are cut by its edges (issue 10: 25 of the 585 realfaces-dev photos,
tight portrait crops, had no face): a photo without a face is searched again inside a grey margin."""

from __future__ import annotations

import numpy as np
from photo_truth import load_photo, normalised_landmark_error

from service.engine.detect_stage import detect_bounded, with_margin


def tight_crops(annotations) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each annotated face cut just inside its cheeks and at its chin, as a tight portrait is:
    (crop, its 68 annotated points in crop pixels); faces under 40 px are left out."""
    crops = []
    for name, faces in sorted(annotations.items()):
        image = load_photo(name)
        for truth in faces:
            (x0, y0), (x1, y1) = truth.landmarks.min(0), truth.landmarks.max(0)
            w, h = x1 - x0, y1 - y0
            left, top = int(max(0, x0 + 0.05 * w)), int(max(0, y0 - 0.1 * h))
            right, bottom = int(min(image.shape[1], x1 - 0.05 * w)), int(min(image.shape[0], y1))
            crop = np.ascontiguousarray(image[top:bottom, left:right])
            if min(crop.shape[:2]) >= 40:
                crops.append((crop, truth.landmarks - np.array([left, top], dtype=np.float32)))
    return crops


def test_with_margin_frames_the_image_in_grey():
    image = np.full((10, 20, 3), 7, np.uint8)
    framed, margin = with_margin(image, 0.15)
    assert margin == 3 and framed.shape == (16, 26, 3)
    assert (framed[3:13, 3:23] == 7).all() and (framed[0] == 128).all() and (framed[:, -1] == 128).all()


def test_the_margin_retry_finds_tightly_cropped_faces_with_accurate_landmarks(dlib_backend, annotations):
    crops = tight_crops(annotations)
    assert len(crops) >= 12
    plain = [detect_bounded(dlib_backend, [crop], [0], 1280)[0] for crop, _ in crops]
    retried = [detect_bounded(dlib_backend, [crop], [0], 1280, retry_margin=0.15)[0] for crop, _ in crops]
    found_plain = sum(bool(faces) for faces in plain)
    found_retried = sum(bool(faces) for faces in retried)
    # Measured: 10 of 14 without the margin, 14 of 14 with it (mean NME 0.027).
    assert found_retried >= found_plain + 3 and found_retried >= 0.9 * len(crops)
    errors = [
        normalised_landmark_error(faces[0].landmarks, truth)
        for (_, truth), faces in zip(crops, retried, strict=True)
        if faces
    ]
    assert np.mean(errors) <= 0.04
    # Found faces are the same on both paths: the retry runs only where the first search found none.
    for first, second in zip(plain, retried, strict=True):
        if first:
            assert [f.box for f in first] == [f.box for f in second]


def test_the_retry_maps_a_downscaled_search_back_to_original_pixels(dlib_backend, annotations):
    """Crops upscaled 4x and searched at 160 px: those only the retry finds (2 of 14 measured)
    come back with landmarks in the pixels of the upscaled crop."""
    checked = 0
    for crop, truth in tight_crops(annotations):
        big = np.repeat(np.repeat(crop, 4, axis=0), 4, axis=1)
        if detect_bounded(dlib_backend, [big], [0], 160)[0]:
            continue  # found without the margin: not what this test is about
        retried = detect_bounded(dlib_backend, [big], [0], 160, retry_margin=0.15)[0]
        if retried:
            checked += 1
            assert normalised_landmark_error(retried[0].landmarks, 4 * truth + 1.5) <= 0.06
    assert checked >= 1
