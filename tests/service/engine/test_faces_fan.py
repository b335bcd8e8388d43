"""The face-alignment backend's code path with RANDOM weights written by the test.

These weights have the real architectures (face_alignment's FAN(4) and s3fd, saved as the state
dicts face_alignment 1.5.0 loads, under its file names) but random values: the tests check the
contract, shapes, batching, the weight-file handling and that our batched re-implementation
computes what face_alignment's own code computes with the same weights, NOT accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from photo_truth import load_photo

pytest.importorskip("face_alignment", reason="the face-alignment extra is not installed")
from service.engine.faces import create_face_backend
from service.engine.faces.fan_backend import (
    FAN_FILE,
    S3FD_FILE,
    FaceAlignmentWeightsMissing,
    FanFaceBackend,
    write_untrained_weights,
)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fa_weights")
    write_untrained_weights(folder)
    return folder


@pytest.fixture(scope="module")
def backend(weights_dir) -> FanFaceBackend:
    # flip_input=False halves FAN's CPU time; the flip path is covered by the reference test.
    return FanFaceBackend(weights_dir=weights_dir, min_face_size=0, flip_input=False)


@pytest.fixture(scope="module")
def equal_size_images() -> list[np.ndarray]:
    return [small("2008_001009.jpg", 128), small("grace_hopper.jpg", 128)]


@pytest.fixture(scope="module")
def batched_and_alone(backend, equal_size_images):
    """Detections of two same-size images in one batch, and of each image alone."""
    together = backend.detect(equal_size_images)
    alone = [backend.detect([image])[0] for image in equal_size_images]
    return together, alone


def small(name: str, side: int = 160) -> np.ndarray:
    """A real photo cropped to a small region (random S3FD on a full photo is slow on 2 cores)."""
    return np.ascontiguousarray(load_photo(name)[:side, :side])


def test_missing_weights_fail_at_construction_naming_the_files(tmp_path):
    with pytest.raises(FaceAlignmentWeightsMissing) as caught:
        create_face_backend("face-alignment", weights_dir=tmp_path)
    message = str(caught.value)
    assert FAN_FILE in message and S3FD_FILE in message and str(tmp_path) in message
    (tmp_path / FAN_FILE).write_bytes(b"")
    with pytest.raises(FaceAlignmentWeightsMissing) as caught:
        create_face_backend("face-alignment", weights_dir=tmp_path)
    assert S3FD_FILE in str(caught.value) and FAN_FILE not in str(caught.value)
    with pytest.raises(ValueError, match="unknown face-alignment detector"):
        create_face_backend("face-alignment", weights_dir=tmp_path, detector="haar")


def test_a_corrupt_weight_file_is_reported_with_its_path(tmp_path, weights_dir):
    (tmp_path / FAN_FILE).write_bytes(b"not a checkpoint")
    (tmp_path / S3FD_FILE).write_bytes((weights_dir / S3FD_FILE).read_bytes())
    with pytest.raises(RuntimeError, match=FAN_FILE):
        create_face_backend("face-alignment", weights_dir=tmp_path)


def test_detect_follows_the_contract_with_random_weights(equal_size_images, batched_and_alone):
    results, _ = batched_and_alone
    assert len(results) == 2
    assert sum(len(r) for r in results) > 0
    for faces in results:
        areas = [f.box[2] * f.box[3] for f in faces]
        assert areas == sorted(areas, reverse=True)
        for face in faces:
            assert face.landmarks.shape == (68, 2) and face.landmarks.dtype == np.float32
            assert 0.5 < face.score <= 1.0 and face.detected
            assert np.isfinite(face.landmarks).all()


def test_batched_detection_equals_one_image_at_a_time_for_equal_sizes(batched_and_alone):
    together, alone = batched_and_alone
    for faces, single in zip(together, alone, strict=True):
        assert len(faces) == len(single)
        np.testing.assert_allclose([f.box for f in faces], [f.box for f in single], atol=1e-3)
        for a, b in zip(faces, single, strict=True):
            np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-2)


def test_mixed_sizes_are_padded_into_one_batch_and_min_face_size_counts_skips(backend):
    images = [small("astronaut.png", 96), small("grace_hopper.jpg", 128)]
    results = backend.detect(images, min_face_size=[0, 10_000])
    assert [type(r).__name__ for r in results] == ["ImageFaces"] * 2
    assert len(results[0]) >= 1
    assert results[1] == [] and results[1].skipped_small >= 1
    for image, faces in zip(images, results, strict=True):
        for face in faces:  # boxes refer to their own image, not the padded batch
            x, y, w, h = face.box
            assert x < image.shape[1] and y < image.shape[0]


@pytest.mark.slow  # ~30 s on 2 cores: face_alignment's numba JIT and FAN with flipping
def test_landmarks_match_face_alignments_own_pipeline_with_the_same_weights(
    backend, weights_dir, monkeypatch
):
    """Same weights, same boxes: our batched crop + decode vs face_alignment.FaceAlignment."""
    import face_alignment

    monkeypatch.setenv("TORCH_HOME", str(weights_dir.parent / "torch_home"))
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / FAN_FILE).symlink_to(weights_dir / FAN_FILE)
    reference = face_alignment.FaceAlignment(
        face_alignment.LandmarksType.TWO_D,
        device="cpu",
        compile=False,
        flip_input=True,
        face_detector="sfd",
        face_detector_kwargs={"path_to_detector": str(weights_dir / S3FD_FILE)},
    )
    image = load_photo("2008_001322.jpg")
    boxes = [(-20.0, 300.0, 80.0, 90.0)]  # overhangs the left and bottom edges
    flipping = FanFaceBackend(weights_dir=weights_dir, min_face_size=0, flip_input=True)
    ours = flipping.landmarks_for_boxes(image, boxes)
    theirs = reference.get_landmarks_from_image(
        image, detected_faces=[(x, y, x + w, y + h) for x, y, w, h in boxes]
    )
    for face, expected in zip(ours, theirs, strict=True):
        assert face.box in boxes and not face.detected
        # face_alignment truncates to int (up to 1 px); rare argmax ties from its uint8 crop
        # rounding move a point by one heatmap cell, so compare the median and most points.
        distance = np.linalg.norm(face.landmarks - expected, axis=1)
        cell = (boxes[0][2] + boxes[0][3]) * 200 / 195 / 64  # one heatmap cell in image pixels
        assert np.median(distance) <= 1.0
        assert (distance <= 1.0 + cell).mean() >= 0.9

    # The detector too, on one image (no padding): same boxes after NMS and threshold.
    crop = small("2008_001009.jpg", 160)
    expected_boxes = reference.face_detector.detect_from_image(crop.copy())
    (found,) = backend.detect([crop])  # two faces
    ours_xyxy = sorted((f.box[0], f.box[1], f.box[0] + f.box[2], f.box[1] + f.box[3], f.score) for f in found)
    assert len(ours_xyxy) == len(expected_boxes) > 0
    np.testing.assert_allclose(np.array(ours_xyxy), np.array(sorted(map(tuple, expected_boxes))), atol=1e-3)


def test_landmarks_for_boxes_batched_equals_one_box_at_a_time(backend):
    image = small("2008_002470.jpg", 200)
    boxes = [(10.0, 10.0, 60.0, 60.0), (100.0, 80.0, 80.0, 80.0)]
    together = backend.landmarks_for_boxes(image, boxes)
    (alone,) = backend.landmarks_for_boxes(image, boxes[1:])
    np.testing.assert_allclose(together[1].landmarks, alone.landmarks, atol=1e-3)
    assert not np.allclose(together[0].landmarks, together[1].landmarks)
    with pytest.raises(ValueError):
        backend.landmarks_for_boxes(image, [(0.0, 0.0, -1.0, 5.0)])


@pytest.mark.gpu
def test_cuda_backend_matches_cpu(weights_dir, backend):
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    gpu = create_face_backend("face-alignment", device="cuda", weights_dir=weights_dir, min_face_size=0)
    image = small("2008_001009.jpg")
    (cpu_faces,) = backend.detect([image])
    (gpu_faces,) = gpu.detect([image])
    assert len(cpu_faces) == len(gpu_faces)
    for a, b in zip(cpu_faces, gpu_faces, strict=True):
        assert a.box == pytest.approx(b.box, abs=0.5)
