"""`align_faces` with memory bounded per face, not per uploaded image.

`align_faces` stacks whole images as float32: a 6300x6300 upload became a 476 MB tensor (and four
of them 1.9 GB) to cut one 112-pixel crop. Here each face is cut first to the region its crop
samples from (plus a pixel for the bilinear taps), so the warp sees only that; the result is the
same as warping the whole image, because every sample and tap lies inside the region or outside
the image in both cases. A region longer than `MAX_REGION_SIDE` (a face filling a huge image) is
box-reduced first, which only removes detail the 112-pixel crop could not hold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.config import InputContract
from service.engine.align import align_faces, alignment_matrices

MAX_REGION_SIDE = 1024


def _region(matrix: np.ndarray, size: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """Pixel bounds (x0, y0, x1, y1), exclusive ends, of what the crop samples; None if all outside."""
    inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))
    corners = np.array([[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1], [size - 1, size - 1, 1]], float)
    points = corners @ inverse[:2].T
    x0 = max(0, math.floor(points[:, 0].min()) - 1)
    y0 = max(0, math.floor(points[:, 1].min()) - 1)
    x1 = min(width, math.ceil(points[:, 0].max()) + 2)
    y1 = min(height, math.ceil(points[:, 1].max()) + 2)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def align_faces_bounded(
    images: Sequence[np.ndarray],
    faces: Sequence[tuple[int, np.ndarray]],
    contract: InputContract,
    **options: Any,
) -> torch.Tensor:
    """Same crops as `align_faces(images, faces, contract, **options)`, one face region at a time.

    `options` (device, padding) go to `align_faces` unchanged; "border" padding gives the same
    result too, since a region is clipped only where the image ends.
    """
    size = contract.input_size
    if not faces:
        return align_faces(images, faces, contract, **options)
    matrices = alignment_matrices([landmarks for _, landmarks in faces], contract)
    crops: list[torch.Tensor] = []
    for (index, landmarks), matrix in zip(faces, matrices, strict=True):
        image = images[index]
        bounds = _region(matrix, size, image.shape[1], image.shape[0])
        if bounds is None:  # the crop lies wholly outside the image: all padding, as before
            far = np.asarray(landmarks, dtype=np.float64) + 1e6
            crops.append(align_faces([np.zeros((1, 1, 3), dtype=np.uint8)], [(0, far)], contract, **options))
            continue
        x0, y0, x1, y1 = bounds
        region = image[y0:y1, x0:x1]
        points = np.asarray(landmarks, dtype=np.float64) - (x0, y0)
        factor = math.ceil(max(region.shape[:2]) / MAX_REGION_SIDE)
        if factor > 1:
            region = np.asarray(Image.fromarray(np.ascontiguousarray(region)).reduce(factor))
            # Pixel centres at integers: pixel j of the reduced image covers k*j .. k*j + k - 1.
            points = (points + 0.5) / factor - 0.5
        # One face per call: a stacked batch would pad every region to the largest one.
        crops.append(align_faces([np.ascontiguousarray(region)], [(0, points)], contract, **options))
    return torch.cat(crops)
