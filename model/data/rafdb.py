"""RAF-DB (basic emotions) in its public layout: EmoLabel/list_patition_label.txt + Image/aligned/."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model.config import RAFDB_CLASSES
from model.data.arrays import FaceArrays
from model.data.images import ColourMode, read_images

RAFDB_ALIGNED_SIDE = 100
_SPLITS = ("train", "test")


def read_rafdb_labels(label_file: Path) -> list[tuple[str, int]]:
    """(image name, class index 0..6) per line `train_00001.jpg 5`; RAF-DB numbers classes 1..7."""
    entries = []
    for line_no, line in enumerate(label_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or not 1 <= int(parts[1]) <= len(RAFDB_CLASSES):
            raise ValueError(
                f"{label_file}:{line_no}: expected '<name>.jpg <1..{len(RAFDB_CLASSES)}>', got {line!r}"
            )
        entries.append((parts[0], int(parts[1]) - 1))
    return entries


def load_rafdb(
    root: str | Path, split: str, *, size: int | None = RAFDB_ALIGNED_SIDE, mode: ColourMode = "rgb"
) -> FaceArrays:
    """The `train` or `test` split of RAF-DB basic, aligned faces resized to `size` (None: as stored).

    `mode="gray"` stores one channel (a third of the memory) for gray-contract training.
    """
    root = Path(root)
    split = split.strip().lower()
    if split not in _SPLITS:
        raise ValueError(f"unknown RAF-DB split {split!r}; use train or test")
    entries = [
        (n, y)
        for n, y in read_rafdb_labels(root / "EmoLabel" / "list_patition_label.txt")
        if n.startswith(split + "_")
    ]
    aligned = root / "Image" / "aligned"
    paths = [aligned / f"{Path(name).stem}_aligned{Path(name).suffix}" for name, _ in entries]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} aligned RAF-DB images missing, e.g. {missing[0]}")
    return FaceArrays(
        images=read_images(paths, mode=mode, size=size),
        labels=np.array([y for _, y in entries], dtype=np.int64),
        class_names=RAFDB_CLASSES,
        source=f"rafdb:{root}:{split}",
    )
