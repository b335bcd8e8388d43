"""Head pose and face quality: the fit itself, then real photos mirrored, rotated, blurred, darkened."""

from __future__ import annotations

import numpy as np
import pytest
from photo_truth import PHOTOS, load_photo
from PIL import Image, ImageEnhance, ImageFilter

from service.engine.face_quality import (
    GENERIC_FACE_68,
    MIRRORED_68,
    Pose,
    angles_of,
    estimate_pose,
    measure_quality,
    project,
    rotation_matrix,
)

# Single-face photos with a clear face: portraits, a big smile, a face tilted up.
PORTRAITS = ("grace_hopper.jpg", "obama.jpg", "Tom_Cruise_avp_2014_4.jpg", "aflw-test.jpg")


def only_face(backend, image: np.ndarray):
    faces = backend.detect([image], min_face_size=40)[0]
    assert len(faces) >= 1
    return faces[0]  # largest


def mirror_points(points: np.ndarray, width: int) -> np.ndarray:
    """Landmarks of the mirrored image: x reflected (pixel centres at integers), points re-indexed."""
    flipped = np.column_stack([width - 1 - points[:, 0], points[:, 1]])
    return flipped[list(MIRRORED_68)]


def test_generic_face_is_mirror_symmetric() -> None:
    mirrored = GENERIC_FACE_68[list(MIRRORED_68)] * (-1.0, 1.0, 1.0)
    np.testing.assert_allclose(mirrored, GENERIC_FACE_68, atol=1e-12)
    assert GENERIC_FACE_68[30, 2] == GENERIC_FACE_68[:, 2].min()  # the nose tip is nearest the camera


@pytest.mark.parametrize("angles", [(0, 0, 0), (35, 0, 0), (-30, 12, 6), (20, -25, -15), (60, 5, 30)])
def test_fit_recovers_the_pose_the_model_was_projected_with(angles) -> None:
    points = project(GENERIC_FACE_68, Pose(*angles), 180.0, np.array([320.0, 240.0]))
    fitted = estimate_pose(points)
    assert (fitted.yaw, fitted.pitch, fitted.roll) == pytest.approx(angles, abs=0.02)
    back = angles_of(rotation_matrix(*angles))
    assert (back.yaw, back.pitch, back.roll) == pytest.approx(angles, abs=1e-9)


def test_signs_mean_what_the_docs_say() -> None:
    """Nose to the image's right for yaw > 0, nose up for pitch > 0, clockwise for roll > 0."""
    nose, left_eye, right_eye = 30, 36, 45  # image-left and image-right outer eye corners
    frontal = project(GENERIC_FACE_68, Pose(0, 0, 0), 100.0, np.zeros(2))
    turned = project(GENERIC_FACE_68, Pose(20, 0, 0), 100.0, np.zeros(2))
    up = project(GENERIC_FACE_68, Pose(0, 20, 0), 100.0, np.zeros(2))
    clockwise = project(GENERIC_FACE_68, Pose(0, 0, 20), 100.0, np.zeros(2))
    assert turned[nose, 0] > frontal[nose, 0]
    assert up[nose, 1] < frontal[nose, 1]  # image y points down
    assert clockwise[right_eye, 1] > clockwise[left_eye, 1]  # on screen, clockwise lowers the right eye


def test_mirrored_annotated_landmarks_give_opposite_yaw_and_roll(annotations) -> None:
    for name, faces in annotations.items():
        width = load_photo(name).shape[1]
        for face in faces:
            pose, mirrored = (
                estimate_pose(face.landmarks),
                estimate_pose(mirror_points(face.landmarks, width)),
            )
            assert mirrored.yaw == pytest.approx(-pose.yaw, abs=0.05)
            assert mirrored.roll == pytest.approx(-pose.roll, abs=0.05)
            assert mirrored.pitch == pytest.approx(pose.pitch, abs=0.05)


@pytest.mark.parametrize("name", PORTRAITS)
def test_mirrored_photo_detected_again_gives_opposite_yaw(dlib_backend, name) -> None:
    """The detector runs on the mirrored pixels, so landmark noise enters twice: up to 4.5 degrees
    of yaw measured on these portraits."""
    image = load_photo(name)
    pose = estimate_pose(only_face(dlib_backend, image).landmarks)
    mirrored = estimate_pose(only_face(dlib_backend, np.ascontiguousarray(image[:, ::-1])).landmarks)
    assert mirrored.yaw == pytest.approx(-pose.yaw, abs=6.0)
    assert mirrored.roll == pytest.approx(-pose.roll, abs=3.0)
    assert mirrored.pitch == pytest.approx(pose.pitch, abs=3.0)


@pytest.mark.parametrize("name", PORTRAITS)
def test_rotating_the_photo_clockwise_adds_to_roll_only(dlib_backend, name) -> None:
    image = load_photo(name)
    turned = np.asarray(Image.fromarray(image).rotate(-20, resample=Image.Resampling.BILINEAR, expand=True))
    before = estimate_pose(only_face(dlib_backend, image).landmarks)
    after = estimate_pose(only_face(dlib_backend, turned).landmarks)
    assert after.roll - before.roll == pytest.approx(20.0, abs=3.0)
    assert after.yaw == pytest.approx(before.yaw, abs=3.0)
    assert after.pitch == pytest.approx(before.pitch, abs=3.0)


def test_portraits_are_near_frontal_and_the_tilted_face_looks_up(dlib_backend) -> None:
    for name in ("grace_hopper.jpg", "obama.jpg"):
        pose = estimate_pose(only_face(dlib_backend, load_photo(name)).landmarks)
        assert abs(pose.yaw) < 8 and abs(pose.roll) < 8 and abs(pose.pitch) < 10, (name, pose)
    tilted = estimate_pose(only_face(dlib_backend, load_photo("aflw-test.jpg")).landmarks)
    assert tilted.pitch > 8, tilted


def test_blur_lowers_sharpness_and_darkening_lowers_brightness(dlib_backend) -> None:
    photo = Image.open(PHOTOS / "grace_hopper.jpg").convert("RGB")
    face = only_face(dlib_backend, np.asarray(photo))
    sharp = measure_quality(np.asarray(photo), face.box)
    blurred = measure_quality(np.asarray(photo.filter(ImageFilter.GaussianBlur(face.box[2] / 64))), face.box)
    dark = measure_quality(np.asarray(ImageEnhance.Brightness(photo).enhance(0.4)), face.box)
    assert sharp.sharpness > 0.6 and blurred.sharpness < 0.5 * sharp.sharpness
    assert dark.brightness == pytest.approx(0.4 * sharp.brightness, rel=0.1)
    assert sharp.size == min(face.box[2], face.box[3])
    assert 0 <= blurred.sharpness <= 1 and 0 <= dark.brightness <= 1


def test_a_box_outside_the_image_has_zero_quality_not_an_error() -> None:
    image = np.zeros((50, 50, 3), dtype=np.uint8)
    quality = measure_quality(image, (100.0, 100.0, 30.0, 30.0))
    assert (quality.sharpness, quality.brightness, quality.size) == (0.0, 0.0, 30.0)
