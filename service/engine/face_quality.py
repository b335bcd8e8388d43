"""Per-face head pose and image quality, so a caller can ignore faces it should not trust.

Pose: the 68 landmarks are fitted to a generic, mirror-symmetric 3-D face (`GENERIC_FACE_68`)
under scaled orthographic projection (a face is small against its distance to the camera), by
Gauss-Newton on rotation, scale and translation, started from the linear (POS-style) solution.
Angles are in degrees, in camera axes (x right, y down, z away from the camera), with the fitted
rotation R = Rz(roll) @ Ry(yaw) @ Rx(pitch) taking the model into the camera:

- yaw > 0: the nose points towards the image's right (the person turns to their left);
- pitch > 0: the nose points up (the person looks up);
- roll > 0: the face is turned clockwise in the image (rotating the photo clockwise by t adds t).

Mirroring an image negates yaw and roll and keeps pitch. Limits (measured, `docs/face-quality.md`):
the model is one generic face, the landmarks come from a 2-D detector that is least accurate on
turned faces, and beyond about 45 degrees of yaw the hidden jaw line is guessed by the detector,
so large angles are underestimated.

Quality: `sharpness` (variance of the Laplacian of the face resampled to a fixed size, mapped to
0..1), `brightness` (mean luminance of the face, 0..1) and `size` (the box's shorter side, px).
Everything here is numpy and Pillow: no torch, no OpenCV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Left-right mirror of the 68 iBUG points (point i of a face is point MIRRORED_68[i] of its mirror).
MIRRORED_68 = (
    16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0,
    26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 27, 28, 29, 30, 35, 34, 33, 32, 31,
    45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40,
    54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65,
)  # fmt: skip

# Depth of each point in front of the ear plane, centimetres, nose tip = 0 (smaller is further
# back). Set by us from adult anthropometry (face ~14 cm wide at the cheekbones, the jaw angle
# ~8 cm behind the nose tip, eyes ~3-4 cm behind it); symmetric, so point i and its mirror agree.
_DEPTH_CM_HALF = {
    # jaw line, ear to chin
    0: -10.0, 1: -9.5, 2: -8.8, 3: -8.0, 4: -6.8, 5: -5.5, 6: -4.3, 7: -3.4, 8: -3.0,
    # eyebrows, outer to inner
    17: -4.3, 18: -3.2, 19: -2.6, 20: -2.3, 21: -2.3,
    # nose bridge to tip, nostrils
    27: -2.3, 28: -1.7, 29: -1.0, 30: 0.0, 31: -1.8, 32: -1.1, 33: -1.4,
    # eye, outer corner, upper lid, inner corner, lower lid
    36: -4.0, 37: -3.2, 38: -3.1, 39: -3.0, 40: -3.3, 41: -3.4,
    # lips: outer contour, then inner
    48: -3.2, 49: -2.4, 50: -2.0, 51: -1.9, 57: -2.1, 58: -2.2, 59: -2.6,
    60: -3.0, 61: -2.3, 62: -2.1, 66: -2.1, 67: -2.3,
}  # fmt: skip
# Centimetres per unit of the 2-D template below (outer eye corners 0.516 apart ~ 9.5 cm).
_CM_PER_UNIT = 9.5 / 0.516


def _generic_face() -> np.ndarray:
    """(68, 3) model points in template units: x right, y down, z away from the camera."""
    from model.config import PROVISIONAL_TEMPLATE_68

    xy = np.asarray(PROVISIONAL_TEMPLATE_68, dtype=np.float64)
    mirrored = xy[list(MIRRORED_68)] * (-1.0, 1.0) + (1.0, 0.0)
    xy = (xy + mirrored) / 2  # exactly symmetric about x = 0.5
    depth = np.zeros(68)
    for index, cm in _DEPTH_CM_HALF.items():
        depth[index] = depth[MIRRORED_68[index]] = cm
    model = np.column_stack([xy - (0.5, xy[30, 1]), -depth / _CM_PER_UNIT])
    return model - model.mean(axis=0)


GENERIC_FACE_68 = _generic_face()
GAUSS_NEWTON_STEPS = 10

# Quality: the face is resampled to QUALITY_SIDE px grey before measuring, so sharpness compares
# faces of any size (a small face upsampled by the camera is blurry at this scale, as it should be).
QUALITY_SIDE = 64
# Laplacian variance (grey in 0..1, at QUALITY_SIDE) that maps to sharpness 0.5; see docs/face-quality.md.
SHARPNESS_HALF = 0.004


@dataclass(frozen=True)
class Pose:
    yaw: float
    pitch: float
    roll: float


@dataclass(frozen=True)
class Quality:
    sharpness: float
    brightness: float
    size: float


def rotation_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """R = Rz(roll) @ Ry(yaw) @ Rx(pitch), angles in degrees, signs as in the module docstring."""
    # Camera y points down and z away; these signs make the nose (0, 0, -1) turn right for yaw,
    # up for pitch, and the eye line clockwise on screen for roll.
    y, p, r = (math.radians(a) for a in (yaw, pitch, roll))
    ry = np.array([[math.cos(y), 0, -math.sin(y)], [0, 1, 0], [math.sin(y), 0, math.cos(y)]])
    rx = np.array([[1, 0, 0], [0, math.cos(p), math.sin(p)], [0, -math.sin(p), math.cos(p)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def angles_of(rotation: np.ndarray) -> Pose:
    """Inverse of `rotation_matrix` (yaw in -90..90, pitch and roll in -180..180)."""
    # Row 2 of Rz Ry Rx is (sin yaw, -cos yaw sin pitch, cos yaw cos pitch); roll is in column 0.
    r = rotation
    yaw = math.degrees(math.asin(max(-1.0, min(1.0, r[2, 0]))))
    pitch = math.degrees(math.atan2(-r[2, 1], r[2, 2]))
    roll = math.degrees(math.atan2(r[1, 0], r[0, 0]))
    return Pose(yaw=yaw, pitch=pitch, roll=roll)


def project(model: np.ndarray, pose: Pose, scale: float, shift: np.ndarray) -> np.ndarray:
    """Scaled orthographic projection of (N, 3) model points: (N, 2) image points."""
    rotated = model @ rotation_matrix(pose.yaw, pose.pitch, pose.roll).T
    return scale * rotated[:, :2] + shift


def estimate_pose(landmarks: np.ndarray, model: np.ndarray = GENERIC_FACE_68) -> Pose:
    """Yaw, pitch and roll (degrees) of a face from its (68, 2) landmarks in image pixels."""
    points = np.asarray(landmarks, dtype=np.float64)
    centre = points.mean(axis=0)
    target = points - centre
    model_c = model - model.mean(axis=0)
    # Linear start: the affine 2x3 map that best projects the model, made a scaled rotation.
    affine, *_ = np.linalg.lstsq(model_c, target, rcond=None)  # (3, 2): target ~ model_c @ affine
    u, s, vt = np.linalg.svd(affine.T, full_matrices=False)  # (2, 3) = u diag(s) vt
    rows = u @ vt
    rotation = np.vstack([rows, np.cross(rows[0], rows[1])])
    start = angles_of(rotation)
    params = np.array([start.yaw, start.pitch, start.roll, s.mean(), 0.0, 0.0])

    def residual(q: np.ndarray) -> np.ndarray:
        return (project(model_c, Pose(q[0], q[1], q[2]), q[3], q[4:6]) - target).ravel()

    # Gauss-Newton with a numerical Jacobian: six parameters, 136 residuals, a few steps.
    steps = np.array([1e-3, 1e-3, 1e-3, 1e-6 * max(1.0, params[3]), 1e-4, 1e-4])
    for _ in range(GAUSS_NEWTON_STEPS):
        base = residual(params)
        jacobian = np.column_stack(
            [(residual(params + np.eye(6)[k] * steps[k]) - base) / steps[k] for k in range(6)]
        )
        delta, *_ = np.linalg.lstsq(jacobian, -base, rcond=None)
        params = params + delta
        if np.abs(delta[:3]).max() < 5e-3:  # degrees; results are rounded to 0.01
            break
    fitted = angles_of(rotation_matrix(params[0], params[1], params[2]))
    return Pose(yaw=round(fitted.yaw, 2), pitch=round(fitted.pitch, 2), roll=round(fitted.roll, 2))


def measure_quality(image: np.ndarray, box: tuple[float, float, float, float]) -> Quality:
    """Sharpness, brightness and size of the face in `box` (x, y, w, h) of an HxWx3 uint8 image."""
    x, y, w, h = box
    height, width = image.shape[:2]
    left, top = max(0, int(math.floor(x))), max(0, int(math.floor(y)))
    right, bottom = min(width, int(math.ceil(x + w))), min(height, int(math.ceil(y + h)))
    size = float(min(w, h))
    if right - left < 2 or bottom - top < 2:
        return Quality(sharpness=0.0, brightness=0.0, size=size)
    face = Image.fromarray(np.ascontiguousarray(image[top:bottom, left:right])).convert("L")
    grey = np.asarray(face.resize((QUALITY_SIDE, QUALITY_SIDE), Image.Resampling.BILINEAR), np.float64)
    grey /= 255.0
    laplacian = (
        grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4 * grey[1:-1, 1:-1]
    )  # 4-neighbour Laplacian, (S-2, S-2)
    variance = float(laplacian.var())
    return Quality(
        sharpness=round(variance / (variance + SHARPNESS_HALF), 4),
        brightness=round(float(grey.mean()), 4),
        size=size,
    )


def describe_faces(
    images: list[np.ndarray], faces: list[tuple[int, tuple[float, float, float, float], np.ndarray]]
) -> list[tuple[Pose, Quality]]:
    """Pose and quality of each (image index, box, landmarks); runs in the engine's thread pool."""
    return [(estimate_pose(landmarks), measure_quality(images[i], box)) for i, box, landmarks in faces]
