"""FER+ labels (majority protocol) and readers for the public FERPlus / FER2013 layouts.

The majority protocol follows microsoft/FERPlus `_process_data(mode="majority")` as described in
../shared/data/ferplus/README.md, so a user rebuilding the splits from the public files gets the
same rows and labels as the shipped npz files.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from model.config import FERPLUS_CLASSES
from model.data.arrays import FaceArrays
from model.data.images import read_images

FERPLUS_VOTE_COLUMNS: tuple[str, ...] = (*FERPLUS_CLASSES, "unknown", "NF")
FER2013_CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
FER2013_SIDE = 48

# split name -> (Usage value in the csv files, image folder written by generate_training_data.py)
_SPLITS: dict[str, tuple[str, str]] = {
    "train": ("Training", "FER2013Train"),
    "val": ("PublicTest", "FER2013Valid"),
    "test": ("PrivateTest", "FER2013Test"),
}
_SPLIT_ALIASES = {
    "training": "train",
    "valid": "val",
    "validation": "val",
    "publictest": "val",
    "privatetest": "test",
}
# Counts at or below this are single-annotator outliers and are removed before the majority test.
_OUTLIER_MAX_VOTES = 1
_MAJORITY_FRACTION = 0.5


def canonical_split(split: str) -> str:
    """'train' / 'val' / 'test' for any of the names FER2013 and FER+ use."""
    key = split.strip().lower()
    key = _SPLIT_ALIASES.get(key, key)
    if key not in _SPLITS:
        raise ValueError(f"unknown FER+ split {split!r}; use train, val (PublicTest) or test (PrivateTest)")
    return key


def clean_votes(votes: np.ndarray) -> np.ndarray:
    """Votes (N, 10) with every count of at most one vote set to zero (outlier removal)."""
    votes = np.asarray(votes)
    return np.where(votes <= _OUTLIER_MAX_VOTES, 0, votes)


def majority_labels(votes: np.ndarray) -> np.ndarray:
    """FER+ majority label per row of raw votes (N, 10): class index 0..7, or -1 for a dropped row.

    A row is dropped when no cleaned count exceeds half the cleaned sum (ties included), or when
    the majority is `unknown` or `NF`.
    """
    cleaned = clean_votes(votes).astype(np.float64)
    if cleaned.ndim != 2 or cleaned.shape[1] != len(FERPLUS_VOTE_COLUMNS):
        raise ValueError(f"votes must be (N, {len(FERPLUS_VOTE_COLUMNS)}), got {cleaned.shape}")
    top = cleaned.argmax(axis=1)
    has_majority = cleaned.max(axis=1) > _MAJORITY_FRACTION * cleaned.sum(axis=1)
    is_emotion = top < len(FERPLUS_CLASSES)
    return np.where(has_majority & is_emotion, top, -1).astype(np.int64)


def vote_distribution(votes: np.ndarray) -> np.ndarray:
    """Cleaned votes over the 8 emotions, normalised per row: float32 (N, 8) soft labels.

    Rows with no emotion votes left stay all-zero; rows kept by `majority_labels` never are.
    """
    emotions = clean_votes(votes)[:, : len(FERPLUS_CLASSES)].astype(np.float64)
    totals = emotions.sum(axis=1, keepdims=True)
    return (emotions / np.where(totals > 0, totals, 1.0)).astype(np.float32)


def pixel_digest(image: np.ndarray) -> bytes:
    """Identity of a crop's exact pixels (shape included), for cross-split duplicate checks."""
    return hashlib.blake2b(
        np.ascontiguousarray(image).tobytes() + repr(image.shape).encode(), digest_size=16
    ).digest()


def duplicate_mask(images: np.ndarray, other_digests: Iterable[bytes]) -> np.ndarray:
    """True for each image whose exact pixels appear among `other_digests`."""
    others = set(other_digests)
    return np.fromiter((pixel_digest(img) in others for img in images), dtype=np.bool_, count=len(images))


def _resize_stack(images: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, *images.shape[3:]), dtype=np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
    return out


def _read_ferplus_csv(path: Path) -> list[tuple[str, str, np.ndarray]]:
    """(Usage, Image name, votes int64 (10,)) per row of fer2013new.csv, in file order."""
    rows = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = {name.strip(): name for name in reader.fieldnames or []}
        missing = [c for c in ("Usage", "Image name", *FERPLUS_VOTE_COLUMNS) if c not in fields]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}")
        for row in reader:
            votes = np.array([int(row[fields[c]]) for c in FERPLUS_VOTE_COLUMNS], dtype=np.int64)
            rows.append((row[fields["Usage"]].strip(), row[fields["Image name"]].strip(), votes))
    return rows


def _read_fer2013_csv(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(Usage per row, labels int64 (N,), images uint8 (N, 48, 48)) from Kaggle's fer2013.csv."""
    usages: list[str] = []
    labels: list[int] = []
    images: list[np.ndarray] = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            pixels = np.array(row["pixels"].split(), dtype=np.uint8)
            if pixels.size != FER2013_SIDE * FER2013_SIDE:
                raise ValueError(f"{path}: row {len(usages)} has {pixels.size} pixels")
            usages.append(row["Usage"].strip())
            labels.append(int(row["emotion"]))
            images.append(pixels.reshape(FER2013_SIDE, FER2013_SIDE))
    stacked = np.stack(images) if images else np.zeros((0, FER2013_SIDE, FER2013_SIDE), np.uint8)
    return usages, np.array(labels, dtype=np.int64), stacked


def _ferplus_rows(rows: list[tuple[str, str, np.ndarray]], usage: str, *, last_name_wins: bool) -> list[int]:
    """Indices of the rows of one split that FER+ named, in file order.

    With `last_name_wins`, a name given to two rows keeps only the later one: generate_training_data.py
    writes images in row order, so the PNG of a repeated name holds the later row's face.
    """
    named = [i for i, (u, name, _) in enumerate(rows) if u == usage and name]
    if not last_name_wins:
        return named
    last = {rows[i][1]: i for i in named}
    return [i for i in named if last[rows[i][1]] == i]


def load_ferplus_layout(
    root: str | Path, split: str, *, size: int | None = None, flag_duplicates: bool = True
) -> FaceArrays:
    """One split of the public FERPlus layout, labelled by the majority protocol.

    `root` holds fer2013new.csv and either the FER2013Train/FER2013Valid/FER2013Test PNG folders
    written by FERPlus's generate_training_data.py, or Kaggle's fer2013.csv (pixels column). With
    fer2013.csv alone the original FER2013 7-class labels are used. `flag_duplicates` marks rows
    whose exact pixels also occur in another split (read from the other folders / csv rows).
    """
    root = Path(root)
    key = canonical_split(split)
    usage, folder = _SPLITS[key]
    labels_csv = root / "fer2013new.csv"
    pixels_csv = root / "fer2013.csv"
    source = f"ferplus:{root}:{key}"

    if labels_csv.is_file() and (root / folder).is_dir():
        rows = _read_ferplus_csv(labels_csv)
        idx = _ferplus_rows(rows, usage, last_name_wins=True)
        votes = np.stack([rows[i][2] for i in idx]) if idx else np.zeros((0, 10), np.int64)
        labels = majority_labels(votes)
        keep = labels >= 0
        paths = [root / folder / rows[i][1] for i, k in zip(idx, keep, strict=True) if k]
        images = read_images(paths, mode="gray")
        exact_dup = None
        if flag_duplicates:
            other_paths = [
                p
                for s, (_, f) in _SPLITS.items()
                if s != key and (root / f).is_dir()
                for p in (root / f).glob("*.png")
            ]
            other = read_images(sorted(other_paths), mode="gray") if other_paths else images[:0]
            exact_dup = duplicate_mask(images, map(pixel_digest, other))
        return FaceArrays(
            images=_resize_stack(images, size),
            labels=labels[keep],
            class_names=FERPLUS_CLASSES,
            soft_labels=vote_distribution(votes[keep]),
            exact_dup=exact_dup,
            source=source,
        )

    if pixels_csv.is_file():
        usages, fer_labels, all_images = _read_fer2013_csv(pixels_csv)
        in_split = np.array([u == usage for u in usages], dtype=np.bool_)
        exact_dup_all = None
        if flag_duplicates:
            other = {pixel_digest(img) for img in all_images[~in_split]}
            exact_dup_all = duplicate_mask(all_images, other)
        if labels_csv.is_file():
            rows = _read_ferplus_csv(labels_csv)
            if len(rows) != len(usages):
                raise ValueError(f"{labels_csv} has {len(rows)} rows, {pixels_csv} has {len(usages)}")
            # Every row keeps its own pixels here, so a repeated name is no reason to drop a row.
            idx = np.array(_ferplus_rows(rows, usage, last_name_wins=False), dtype=np.int64)
            votes = np.stack([rows[i][2] for i in idx]) if len(idx) else np.zeros((0, 10), np.int64)
            labels = majority_labels(votes)
            keep = labels >= 0
            idx = idx[keep]
            return FaceArrays(
                images=_resize_stack(all_images[idx], size),
                labels=labels[keep],
                class_names=FERPLUS_CLASSES,
                soft_labels=vote_distribution(votes[keep]),
                exact_dup=None if exact_dup_all is None else exact_dup_all[idx],
                source=source,
            )
        return FaceArrays(
            images=_resize_stack(all_images[in_split], size),
            labels=fer_labels[in_split],
            class_names=FER2013_CLASSES,
            exact_dup=None if exact_dup_all is None else exact_dup_all[in_split],
            source=f"fer2013:{root}:{key}",
        )

    raise FileNotFoundError(
        f"{root}: expected fer2013new.csv with a {folder}/ folder, "
        "or fer2013.csv (with or without fer2013new.csv)"
    )
