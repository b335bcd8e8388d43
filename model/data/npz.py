"""The npz split format of ../shared/data/ferplus (see its README), read and written.

Only `images` and `labels` are required; `votes` (FER+ raw counts) yield soft labels through the
same majority-protocol cleaning the labels came from, and `exact_dup_in_other_split` feeds the
de-duplicated score of `fermam eval`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model.config import FERPLUS_CLASSES
from model.data.arrays import FaceArrays
from model.data.ferplus import FERPLUS_VOTE_COLUMNS, vote_distribution


def _soft_labels(data: np.lib.npyio.NpzFile, class_names: tuple[str, ...]) -> np.ndarray | None:
    if "soft_labels" in data.files:
        return data["soft_labels"].astype(np.float32)
    if "votes" not in data.files:
        return None
    columns = (
        tuple(str(c) for c in data["vote_columns"]) if "vote_columns" in data.files else FERPLUS_VOTE_COLUMNS
    )
    if columns != FERPLUS_VOTE_COLUMNS or class_names != FERPLUS_CLASSES:
        raise ValueError(f"votes with columns {columns} do not follow the FER+ layout {FERPLUS_VOTE_COLUMNS}")
    return vote_distribution(data["votes"])


def load_npz(path: str | Path) -> FaceArrays:
    """A split stored in the shared FER+ npz format (no pickled objects are loaded)."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as data:
        for key in ("images", "labels"):
            if key not in data.files:
                raise ValueError(f"{path}: no {key!r} array (keys: {sorted(data.files)})")
        class_names = (
            tuple(str(c) for c in data["class_names"]) if "class_names" in data.files else FERPLUS_CLASSES
        )
        exact_dup = (
            data["exact_dup_in_other_split"].astype(np.bool_)
            if "exact_dup_in_other_split" in data.files
            else None
        )
        return FaceArrays(
            images=np.ascontiguousarray(data["images"], dtype=np.uint8),
            labels=data["labels"].astype(np.int64),
            class_names=class_names,
            soft_labels=_soft_labels(data, class_names),
            exact_dup=exact_dup,
            source=str(path),
        )


def save_npz(path: str | Path, faces: FaceArrays) -> None:
    """Write `faces` so that `load_npz` (and `fermam eval --data`) reads it back unchanged.

    Lets a RAF-DB or AffectNet split decoded once be reused or shipped as one file.
    """
    arrays: dict[str, np.ndarray] = {
        "images": faces.images,
        "labels": faces.labels,
        "class_names": np.array(faces.class_names),
    }
    if faces.soft_labels is not None:
        arrays["soft_labels"] = faces.soft_labels
    if faces.exact_dup is not None:
        arrays["exact_dup_in_other_split"] = faces.exact_dup
    with Path(path).open("wb") as f:
        np.savez(f, **arrays)
