"""Alignment: Umeyama similarity, the batched warp, and crops whose landmarks land on the template."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from photo_truth import FERPLUS, load_photo
from PIL import Image

from model.config import InputContract, five_points
from service.engine.align import align_faces, alignment_matrices, estimate_similarity, map_points

CONTRACT = InputContract()  # 112 px, gray, mean/std 0.5, provisional template


def similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array(
        [[scale * math.cos(a), -scale * math.sin(a), tx], [scale * math.sin(a), scale * math.cos(a), ty]]
    )


def test_estimate_similarity_recovers_a_known_transform_and_refuses_reflections():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, size=(5, 2))
    truth = similarity(23.0, 1.7, 12.0, -40.0)
    dst = map_points(src[None], truth[None])[0]
    np.testing.assert_allclose(estimate_similarity(src, dst), truth, atol=1e-9)

    mirrored = dst * np.array([-1.0, 1.0])
    matrix = estimate_similarity(src, mirrored)
    linear = matrix[:, :2]
    assert np.linalg.det(linear) > 0  # a rotation, never a flip
    with pytest.raises(ValueError):
        estimate_similarity(np.zeros((5, 2)), dst)
    with pytest.raises(ValueError):
        estimate_similarity(src[:4], dst)


@pytest.fixture(scope="module")
def fer_face(dlib_backend):
    """The first FER+ validation face that dlib detects, upscaled to 144 px, with its landmarks."""
    for face48 in np.load(FERPLUS / "val.npz")["images"][:20]:
        face = np.asarray(Image.fromarray(face48).resize((144, 144), Image.BICUBIC).convert("RGB"))
        (found,) = dlib_backend.detect([face])
        if found:
            return face, found[0].landmarks
    pytest.fail("dlib found none of the first 20 FER+ validation faces")


def warp_image(image: np.ndarray, matrix: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """Reference warp with PIL (independent of the code under test), in our pixel-centre convention."""
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(full)
    # PIL maps output pixel corners; shift by half a pixel to map pixel centres.
    shift = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
    unshift = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    pil = unshift @ inverse @ shift
    coefficients = tuple(pil[:2].reshape(-1))
    return np.asarray(Image.fromarray(image).transform(out_size, Image.AFFINE, coefficients, Image.BILINEAR))


def test_a_face_moved_by_a_known_similarity_is_aligned_to_the_same_crop(fer_face):
    face, landmarks = fer_face
    # Rotation + translation at scale 1: scaling would add resampling blur of its own.
    moved_by = similarity(-25.0, 1.0, 90.0, 30.0)
    canvas = warp_image(face, moved_by, (400, 320))
    moved_landmarks = map_points(landmarks[None], moved_by[None])[0]

    crops = align_faces([face, canvas], [(0, landmarks), (1, moved_landmarks)], CONTRACT)
    assert crops.shape == (2, 3, 112, 112) and crops.dtype == torch.float32
    # The transform is recovered: crop matrix of the moved face = original matrix after moved_by^-1.
    m_orig, m_moved = alignment_matrices([landmarks, moved_landmarks], CONTRACT)
    expected = np.vstack([m_orig, [0, 0, 1]]) @ np.linalg.inv(np.vstack([moved_by, [0, 0, 1]]))
    np.testing.assert_allclose(m_moved, expected[:2], atol=1e-6)
    # And the two crops agree up to the blur of the extra warp (values in [-1, 1]; measured
    # 0.015), far closer than the same crop misplaced by one pixel (measured >= 0.05).
    inner = (slice(None), slice(16, 96), slice(16, 96))
    difference = (crops[0][inner] - crops[1][inner]).abs().mean().item()
    assert difference < 0.03
    for shift in ((1, 0), (0, 1), (-1, 0), (0, -1)):
        misplaced = torch.roll(crops[1], shift, dims=(1, 2))
        assert difference < 0.7 * (crops[0][inner] - misplaced[inner]).abs().mean().item()


@pytest.mark.parametrize(
    ("name", "max_five_error"),
    # Measured five-point residual 0.015 (neutral face) and 0.082 (open smile: mouth corners
    # cannot all sit on a neutral template under a similarity transform).
    [("grace_hopper.jpg", 0.04), ("Tom_Cruise_avp_2014_4.jpg", 0.11)],
)
def test_landmarks_of_the_aligned_crop_land_on_the_template(dlib_backend, name, max_five_error):
    image = load_photo(name)
    (faces,) = dlib_backend.detect([image])
    contract = InputContract(input_size=160)
    crops = align_faces([image], [(0, faces[0].landmarks)], contract)
    # Back to uint8 pixels, then let dlib place 68 points on the crop independently.
    crop = ((crops[0].permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255).round().clip(0, 255).astype(np.uint8)
    side = contract.input_size
    (on_crop,) = dlib_backend.landmarks_for_boxes(
        crop, [(0.07 * side, 0.17 * side, 0.87 * side, 0.87 * side)]
    )
    template = contract.template_pixels()
    eye_distance = np.linalg.norm(template[36] - template[45])
    five_error = np.linalg.norm(five_points(on_crop.landmarks) - five_points(template), axis=1).mean()
    assert five_error / eye_distance < max_five_error
    # The source landmarks mapped by the alignment matrix agree with dlib on the crop (measured
    # 0.016-0.023 of the eye distance): the warp put the pixels where the matrix says.
    mapped = map_points(faces[0].landmarks[None], alignment_matrices([faces[0].landmarks], contract))[0]
    assert np.linalg.norm(mapped - on_crop.landmarks, axis=1).mean() / eye_distance < 0.05


def test_faces_partly_outside_the_image_are_padded_not_dropped(dlib_backend):
    image = load_photo("obama_partial_face.jpg")
    (faces,) = dlib_backend.detect([image])
    assert faces
    landmarks = faces[0].landmarks.copy()
    # Shift the face so its left half lies outside the image.
    shifted = landmarks - np.array([landmarks[:, 0].mean() + 10.0, 0.0], dtype=np.float32)
    zeros = align_faces([image], [(0, shifted)], CONTRACT, padding="zeros")
    border = align_faces([image], [(0, shifted)], CONTRACT, padding="border")
    assert zeros.shape == border.shape == (1, 3, 112, 112)
    black = (0.0 - 0.5) / 0.5
    assert torch.isclose(zeros[0, :, :, :20], torch.tensor(black)).float().mean() > 0.95
    assert not torch.isclose(border[0, :, :, :20], torch.tensor(black)).all()
    torch.testing.assert_close(zeros[0, :, :, 80:], border[0, :, :, 80:])
    # Without an override the contract says what fills the corners (it travels with the weights).
    from_contract = align_faces([image], [(0, shifted)], replace(CONTRACT, padding="border"))
    torch.testing.assert_close(from_contract, border)
    torch.testing.assert_close(align_faces([image], [(0, shifted)], CONTRACT), zeros)


def test_one_batched_warp_matches_warping_each_face_alone_across_images_of_different_sizes(dlib_backend):
    names = ["2008_001322.jpg", "astronaut.png", "2008_001009.jpg"]
    images = [load_photo(n) for n in names]
    detections = dlib_backend.detect(images)
    faces = [(i, f.landmarks) for i, found in enumerate(detections) for f in found]
    faces = faces[::-1]  # any order of image indices
    assert len(faces) >= 5
    for contract in (
        CONTRACT,
        InputContract(colour_mode="rgb", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ):
        together = align_faces(images, faces, contract)
        alone = torch.cat([align_faces([images[i]], [(0, lm)], contract) for i, lm in faces])
        # float32 grid coordinates normalised by a different (padded) size: ~1e-5 apart.
        torch.testing.assert_close(together, alone, atol=2e-4, rtol=0)
    rgb = align_faces(images, faces[:1], InputContract(colour_mode="rgb"))
    assert not torch.equal(rgb[0, 0], rgb[0, 1])  # colour kept
    gray = align_faces(images, faces[:1], CONTRACT)
    assert torch.equal(gray[0, 0], gray[0, 1]) and torch.equal(gray[0, 1], gray[0, 2])


def test_gray_crops_use_luma_and_the_contract_normalisation():
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[..., 0] = 255  # pure red: luma 0.299
    landmarks = (np.asarray(CONTRACT.template, dtype=np.float32) * 40 + 12).astype(np.float32)
    crop = align_faces([image], [(0, landmarks)], CONTRACT)
    centre = crop[0, :, 56, 56]
    torch.testing.assert_close(centre, torch.full((3,), (0.299 - 0.5) / 0.5), atol=1e-4, rtol=0)


def test_no_faces_give_an_empty_batch_and_bad_indices_are_refused():
    assert align_faces([], [], CONTRACT).shape == (0, 3, 112, 112)
    with pytest.raises(IndexError):
        align_faces(
            [np.zeros((10, 10, 3), np.uint8)], [(1, np.asarray(CONTRACT.template, np.float32) * 10)], CONTRACT
        )
