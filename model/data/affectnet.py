"""AffectNet, from class folders (`train/<class>/*.jpg`) or from the original annotation files.

Both layouts map to AffectNet's expression order (neutral, happy, sad, surprise, fear, disgust,
anger, contempt); codes 8-10 (none, uncertain, no face) are dropped. With 7 classes, contempt is
dropped too, as in the AffectNet-7 benchmark.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from model.config import AFFECTNET8_CLASSES
from model.data.arrays import FaceArrays
from model.data.images import Box, ColourMode, read_images

DEFAULT_SIDE = 112
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
ANNOTATION_FILES = {"train": "training.csv", "val": "validation.csv"}
# The original validation.csv ships without a header row; these are training.csv's columns.
ANNOTATION_COLUMNS = (
    "subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
    "facial_landmarks", "expression", "valence", "arousal",
)  # fmt: skip
_SPLIT_FOLDERS = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test",)}
_CLASS_SYNONYMS = {
    "neutral": "neutral", "neutrality": "neutral",
    "happy": "happy", "happiness": "happy", "joy": "happy",
    "sad": "sad", "sadness": "sad",
    "surprise": "surprise", "surprised": "surprise",
    "fear": "fear", "fearful": "fear", "afraid": "fear",
    "disgust": "disgust", "disgusted": "disgust",
    "anger": "anger", "angry": "anger",
    "contempt": "contempt",
}  # fmt: skip


def _split_key(split: str) -> str:
    key = split.strip().lower()
    for canonical, names in _SPLIT_FOLDERS.items():
        if key in names:
            return canonical
    raise ValueError(f"unknown AffectNet split {split!r}; use train, val or test")


def folder_class_index(folder_name: str) -> int | None:
    """AffectNet class index for a class folder named by index (`3`) or by name (`Surprise`)."""
    name = folder_name.strip().lower()
    if name.isdigit():
        index = int(name)
        return index if index < len(AFFECTNET8_CLASSES) else None
    canonical = _CLASS_SYNONYMS.get(name)
    return None if canonical is None else AFFECTNET8_CLASSES.index(canonical)


def _class_names(num_classes: int | None, present: set[int]) -> tuple[str, ...]:
    if num_classes is None:
        num_classes = 8 if AFFECTNET8_CLASSES.index("contempt") in present else 7
    if num_classes not in (7, 8):
        raise ValueError(f"AffectNet has 7 or 8 expression classes, not {num_classes}")
    return AFFECTNET8_CLASSES[:num_classes]


def _load_class_folders(
    split_dir: Path, *, num_classes: int | None, size: int, mode: ColourMode
) -> FaceArrays:
    samples: list[tuple[Path, int]] = []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        index = folder_class_index(class_dir.name)
        if index is None:
            continue
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        samples += [(p, index) for p in files]
    class_names = _class_names(num_classes, {y for _, y in samples})
    samples = [(p, y) for p, y in samples if y < len(class_names)]
    if not samples:
        raise FileNotFoundError(f"{split_dir}: no images in recognised class folders")
    return FaceArrays(
        images=read_images([p for p, _ in samples], mode=mode, size=size),
        labels=np.array([y for _, y in samples], dtype=np.int64),
        class_names=class_names,
        source=f"affectnet:{split_dir.parent}:{split_dir.name}",
    )


def read_annotations(csv_path: Path) -> list[dict[str, str]]:
    """Rows of training.csv / validation.csv as dicts, whether or not the file has a header."""
    with csv_path.open(newline="") as f:
        rows = list(csv.reader(f))
    if rows and rows[0] and rows[0][0].strip() == ANNOTATION_COLUMNS[0]:
        header, rows = [c.strip() for c in rows[0]], rows[1:]
    else:
        header = list(ANNOTATION_COLUMNS)
    return [dict(zip(header, row, strict=False)) for row in rows if row]


def _load_annotations(
    root: Path, csv_path: Path, split: str, *, num_classes: int | None, size: int, mode: ColourMode
) -> FaceArrays:
    class_names = _class_names(8 if num_classes is None else num_classes, set())
    image_roots = [root / "Manually_Annotated_Images", root]
    paths: list[Path] = []
    boxes: list[Box] = []
    labels: list[int] = []
    for row in read_annotations(csv_path):
        expression = int(row["expression"])
        if not 0 <= expression < len(class_names):
            continue
        relative = row["subDirectory_filePath"]
        path = next((r / relative for r in image_roots if (r / relative).is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{relative} (from {csv_path.name}) not found under {image_roots}")
        paths.append(path)
        boxes.append(tuple(int(float(row[k])) for k in ("face_x", "face_y", "face_width", "face_height")))
        labels.append(expression)
    return FaceArrays(
        images=read_images(paths, mode=mode, size=size, boxes=boxes),
        labels=np.array(labels, dtype=np.int64),
        class_names=class_names,
        source=f"affectnet:{root}:{split}",
    )


def load_affectnet(
    root: str | Path,
    split: str,
    *,
    num_classes: int | None = None,
    size: int = DEFAULT_SIDE,
    mode: ColourMode = "rgb",
) -> FaceArrays:
    """One AffectNet split as `size`-square crops.

    Class folders under `root/<split>/` win when present; otherwise `root/training.csv` or
    `root/validation.csv` with images under `root/Manually_Annotated_Images/` (face boxes cropped).
    `num_classes` None: 8 when contempt is present (always for annotation files), else 7.
    """
    root = Path(root)
    key = _split_key(split)
    for name in _SPLIT_FOLDERS[key]:
        if (root / name).is_dir():
            return _load_class_folders(root / name, num_classes=num_classes, size=size, mode=mode)
    csv_name = ANNOTATION_FILES.get(key)
    for folder in (root, root / "Manually_Annotated_file_lists"):
        if csv_name and (folder / csv_name).is_file():
            return _load_annotations(
                root, folder / csv_name, key, num_classes=num_classes, size=size, mode=mode
            )
    raise FileNotFoundError(
        f"{root}: no {'/'.join(_SPLIT_FOLDERS[key])} class folder"
        + (f" and no {csv_name}" if csv_name else " (AffectNet publishes no test annotations)")
    )
