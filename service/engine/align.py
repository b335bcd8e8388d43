"""Align faces to the model's template crop: a similarity transform from five landmarks, one warp.

Coordinate convention (shared with the face backends): a point (x, y) in pixels has pixel centres
at integer positions, so pixel (0, 0) covers [-0.5, 0.5]^2. The contract's template, given as
fractions of the crop side, is scaled by the crop side into the same convention.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from model.config import InputContract, Padding, five_points
from model.data.transforms import luminance, normalise


def estimate_similarity(src_pts: np.ndarray, dst_pts: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src onto dst.

    Umeyama (1991) with the reflection excluded: a mirrored face must not be "aligned" by
    flipping it. Returns a (2, 3) float64 matrix M with dst ~= M[:, :2] @ src + M[:, 2].
    """
    src = np.asarray(src_pts, dtype=np.float64)
    dst = np.asarray(dst_pts, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"need two matching (N>=2, 2) point sets, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 0:
        raise ValueError("source points are all identical; no transform is defined")
    covariance = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0  # best proper rotation instead of a reflection
    rotation = u @ np.diag(sign) @ vt
    scale = (singular * sign).sum() / src_var
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - matrix[:, :2] @ src_mean
    return matrix


def alignment_matrices(landmarks: Sequence[np.ndarray] | np.ndarray, contract: InputContract) -> np.ndarray:
    """Image-to-crop similarity matrices (F, 2, 3) from each face's 68 landmarks.

    Uses the five alignment points (eye centres, nose tip, mouth corners) of the landmarks and
    of the contract's template, so the crop matches what the checkpoint was trained on.
    """
    points = np.asarray(landmarks, dtype=np.float64).reshape(-1, 68, 2)
    template = five_points(contract.template_pixels())
    if len(points) == 0:
        return np.zeros((0, 2, 3))
    return np.stack([estimate_similarity(five_points(p), template) for p in points])


def map_points(points: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """Apply (F, 2, 3) affine matrices to (F, N, 2) points (e.g. landmarks into crop pixels)."""
    points = np.asarray(points, dtype=np.float64)
    return points @ np.swapaxes(matrices[:, :, :2], 1, 2) + matrices[:, None, :, 2]


def align_faces(
    images: Sequence[np.ndarray],
    faces: Sequence[tuple[int, np.ndarray]],
    contract: InputContract,
    *,
    device: torch.device | str = "cpu",
    padding: Padding | None = None,
    matrices: np.ndarray | None = None,
) -> torch.Tensor:
    """Warp every face to the template crop in one grid_sample call: (F, 3, S, S) float32.

    `faces` holds (index into `images`, (68, 2) landmarks) pairs; `images` are HxWx3 uint8 RGB.
    The result is normalised per the contract (colour mode, mean, std) and lives on `device`.
    Parts of a crop that fall outside its image are black ("zeros") or repeat the edge
    ("border"), as the contract says unless `padding` overrides it; such faces are padded,
    never dropped. Pass `matrices` (from `alignment_matrices`) to reuse ones already computed.
    """
    size = contract.input_size
    padding = contract.padding if padding is None else padding
    if not faces:
        return torch.zeros((0, 3, size, size), dtype=torch.float32, device=device)
    image_indices = [int(i) for i, _ in faces]
    if min(image_indices) < 0 or max(image_indices) >= len(images):
        raise IndexError("a face refers to an image index outside `images`")
    if matrices is None:
        matrices = alignment_matrices([lm for _, lm in faces], contract)
    if matrices.shape != (len(faces), 2, 3):
        raise ValueError(f"matrices must have shape ({len(faces)}, 2, 3), got {matrices.shape}")

    # Only the images that have faces are stacked, zero-padded to a common size: outside each
    # image the padded batch is zero, exactly what "zeros" padding would give per image.
    used = sorted(set(image_indices))
    slot = {image_index: k for k, image_index in enumerate(used)}
    gray = contract.colour_mode == "gray"
    channels = 1 if gray else 3
    height = max(images[i].shape[0] for i in used)
    width = max(images[i].shape[1] for i in used)
    batch = torch.zeros((len(used), channels, height, width), dtype=torch.float32, device=device)
    for image_index in used:
        image = images[image_index]
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"images must be HxWx3 uint8 RGB, got {image.dtype} {image.shape}")
        pixels = (
            torch.from_numpy(np.require(image, requirements=["C", "W"])).to(device).permute(2, 0, 1).float()
            / 255.0
        )
        if gray:  # before the warp: one channel to sample instead of three
            pixels = luminance(pixels[None])[0]
        batch[slot[image_index], :, : image.shape[0], : image.shape[1]] = pixels

    # For every crop pixel (u, v): the image point it comes from, x = A^-1 ((u, v) - t).
    inverse = np.linalg.inv(np.concatenate([matrices, np.tile([[[0.0, 0.0, 1.0]]], (len(faces), 1, 1))], 1))
    grid_v, grid_u = np.meshgrid(
        np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij"
    )
    crop_points = np.stack([grid_u, grid_v, np.ones_like(grid_u)], axis=-1).reshape(-1, 3)  # (S*S, 3)
    source = crop_points @ np.swapaxes(inverse[:, :2, :], 1, 2)  # (F, S*S, 2) image pixels
    if padding == "border":
        sizes = np.array(
            [[images[i].shape[1] - 1, images[i].shape[0] - 1] for i in image_indices], dtype=np.float64
        )
        source = np.clip(source, 0.0, sizes[:, None, :])
    elif padding != "zeros":
        raise ValueError(f"padding must be 'zeros' or 'border', got {padding!r}")
    # Pixel centre i sits at normalised (2i + 1) / W - 1 with align_corners=False.
    normalised = (2.0 * source + 1.0) / np.array([width, height], dtype=np.float64) - 1.0

    # One grid per stacked image, holding all its faces one after another (missing ones at -2,
    # outside everything), so one grid_sample warps all faces of all images.
    per_image = [[k for k, i in enumerate(image_indices) if i == image_index] for image_index in used]
    most = max(len(ks) for ks in per_image)
    grid = np.full((len(used), most, size * size, 2), -2.0, dtype=np.float32)
    for row, ks in enumerate(per_image):
        grid[row, : len(ks)] = normalised[ks]
    grid_t = torch.from_numpy(grid).to(device).view(len(used), most * size, size, 2)
    warped = F.grid_sample(batch, grid_t, mode="bilinear", padding_mode="zeros", align_corners=False)
    warped = warped.view(len(used), channels, most, size, size).permute(0, 2, 1, 3, 4)  # (N, most, C, S, S)

    order = torch.tensor(
        [slot[i] * most + per_image[slot[i]].index(k) for k, i in enumerate(image_indices)], device=device
    )
    crops = warped.reshape(len(used) * most, channels, size, size).index_select(0, order)
    return normalise(crops, contract)
