"""Decode image files into one uint8 array of equally sized crops.

PIL releases the GIL while decoding, so a thread pool keeps large folders (RAF-DB, AffectNet)
from taking minutes on one core.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

ColourMode = Literal["rgb", "gray"]
Box = tuple[int, int, int, int]  # x, y, width, height in pixels


def read_image(
    path: Path, *, mode: ColourMode, size: int | None = None, box: Box | None = None
) -> np.ndarray:
    """One file as uint8 (H, W) for "gray" or (H, W, 3) for "rgb", optionally cropped, then resized.

    PIL's bilinear resize widens its kernel when shrinking, so downscaled faces are antialiased.
    """
    with Image.open(path) as img:
        img = img.convert("L" if mode == "gray" else "RGB")
        if box is not None:
            x, y, w, h = box
            img = img.crop((x, y, x + w, y + h))
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def read_images(
    paths: Sequence[Path],
    *,
    mode: ColourMode,
    size: int | None = None,
    boxes: Sequence[Box] | None = None,
    workers: int | None = None,
) -> np.ndarray:
    """All files stacked into (N, S, S[, 3]); with size=None they must already share one size."""
    n = len(paths)
    if boxes is not None and len(boxes) != n:
        raise ValueError(f"{len(boxes)} boxes for {n} images")
    shape_tail = () if mode == "gray" else (3,)
    if n == 0:
        side = size or 0
        return np.zeros((0, side, side, *shape_tail), dtype=np.uint8)

    def one(i: int) -> np.ndarray:
        return read_image(paths[i], mode=mode, size=size, box=None if boxes is None else boxes[i])

    first = one(0)
    out = np.empty((n, *first.shape), dtype=np.uint8)
    out[0] = first

    def fill(i: int) -> None:
        img = one(i)
        if img.shape != first.shape:
            raise ValueError(
                f"{paths[i]} is {img.shape[:2]}, {paths[0]} is {first.shape[:2]}: pass size= to resize"
            )
        out[i] = img

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fill, range(1, n)))
    return out
