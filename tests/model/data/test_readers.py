"""Dataset readers: the shared npz files, and the public FERPlus / FER2013 / RAF-DB / AffectNet
layouts rebuilt in tmp_path from a handful of real FER+ faces (never written into the repo)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.config import AFFECTNET8_CLASSES, FERPLUS_CLASSES, RAFDB_CLASSES
from model.data import (
    FER2013_CLASSES,
    FaceArrays,
    load_affectnet,
    load_dataset,
    load_ferplus_layout,
    load_npz,
    load_rafdb,
    majority_labels,
    parse_spec,
    save_npz,
    vote_distribution,
)

FERPLUS_DIR = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "ferplus"
TRAIN_NPZ = FERPLUS_DIR / "train.npz"
VAL_NPZ = FERPLUS_DIR / "val.npz"
VOTE_HEADER = ["Usage", "Image name", *FERPLUS_CLASSES, "unknown", "NF"]


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    """Twelve real 48x48 FER+ validation faces used as image content of the synthetic layouts."""
    with np.load(VAL_NPZ, allow_pickle=False) as data:
        return data["images"][:12].copy()


def _votes(**counts: int) -> list[int]:
    return [counts.get(name, 0) for name in [*FERPLUS_CLASSES, "unknown", "NF"]]


# ---- the shared npz files -------------------------------------------------------------------


def test_train_npz_matches_readme() -> None:
    train = load_npz(TRAIN_NPZ)
    assert len(train) == 25_057
    assert train.images.shape == (25_057, 48, 48) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64
    assert train.class_names == FERPLUS_CLASSES
    assert train.class_counts().tolist() == [8739, 7287, 3149, 3013, 2099, 119, 532, 119]
    assert train.exact_dup is not None and int(train.exact_dup.sum()) == 614
    assert train.source == str(TRAIN_NPZ)


def test_val_npz_matches_readme_and_soft_labels_agree_with_majority() -> None:
    val = load_npz(VAL_NPZ)
    assert len(val) == 3_199
    assert val.images.shape == (3_199, 48, 48) and val.images.dtype == np.uint8
    assert val.class_counts().tolist() == [1182, 865, 415, 351, 287, 24, 62, 13]
    assert val.exact_dup is not None and int(val.exact_dup.sum()) == 276
    assert val.soft_labels is not None and val.soft_labels.dtype == np.float32
    np.testing.assert_allclose(val.soft_labels.sum(axis=1), 1.0, atol=1e-6)
    assert (val.soft_labels.argmax(axis=1) == val.labels).all()


@pytest.mark.parametrize("path", [TRAIN_NPZ, VAL_NPZ], ids=["train", "val"])
def test_majority_protocol_reproduces_shared_labels(path: Path) -> None:
    with np.load(path, allow_pickle=False) as data:
        assert (majority_labels(data["votes"]) == data["labels"]).all()


# ---- the majority protocol on hand-made vote rows -----------------------------------------------


@pytest.mark.parametrize(
    ("votes", "expected"),
    [
        (_votes(neutral=10), 0),
        (_votes(contempt=6, unknown=2, NF=2), 7),  # 6 > 0.5 * 10
        (_votes(neutral=5, happiness=5), -1),  # tie: nothing exceeds half
        (_votes(neutral=4, happiness=4, surprise=1, sadness=1), -1),  # tie after outlier removal
        (_votes(surprise=3, sadness=3, anger=2, disgust=2), -1),  # 3 of 10: no majority
        # Seven single votes are outliers: once removed, 3 of the remaining 3 is a majority.
        ([3, 1, 1, 1, 1, 1, 1, 1, 0, 0], 0),
        # 5 of 10 is no majority, but 5 of 7 after removing the three single votes is.
        (_votes(neutral=5, happiness=2, surprise=1, sadness=1, anger=1), 0),
        (_votes(neutral=1, unknown=9), -1),  # unknown majority
        (_votes(unknown=2, NF=8), -1),  # not-a-face majority
        ([1] * 10, -1),  # every count a single vote
        (_votes(happiness=5, surprise=4), 1),  # a 9-vote row: 5 > 4.5
    ],
    ids=[
        "unanimous", "majority-with-unknown", "tie", "tie-after-cleaning", "no-majority",
        "outliers-removed", "cleaning-creates-majority", "unknown", "not-a-face", "all-single", "nine-votes",
    ],
)  # fmt: skip
def test_majority_protocol_on_hand_made_rows(votes: list[int], expected: int) -> None:
    assert majority_labels(np.array([votes])).tolist() == [expected]


def test_soft_labels_are_the_cleaned_emotion_votes() -> None:
    soft = vote_distribution(np.array([_votes(neutral=5, happiness=2, surprise=1, unknown=2)]))
    np.testing.assert_allclose(soft[0], [5 / 7, 2 / 7, 0, 0, 0, 0, 0, 0], rtol=1e-6)


# ---- FERPlus layout: fer2013new.csv + PNG folders -------------------------------------------

# (Usage, image name, votes, index of the face written for that name or None).
# fer0000005 is named twice: the later row's face is the one in the folder, as in FERPlus.
FERPLUS_ROWS = [
    ("Training", "fer0000000.png", _votes(neutral=9, happiness=1), 0),
    ("Training", "", _votes(happiness=10), None),  # FER+ gave no name: a non-face
    ("Training", "fer0000002.png", _votes(neutral=5, sadness=5), 1),
    ("Training", "fer0000003.png", _votes(NF=10), 2),
    ("Training", "fer0000004.png", [3, 1, 1, 1, 1, 1, 1, 1, 0, 0], 3),
    ("Training", "fer0000005.png", _votes(happiness=8, neutral=2), None),
    ("Training", "fer0000005.png", _votes(surprise=7, fear=3), 4),
    ("Training", "fer0000007.png", _votes(unknown=6, neutral=4), 5),
    ("Training", "fer0000008.png", _votes(fear=6, surprise=4), 6),
    ("PublicTest", "fer0000009.png", _votes(anger=10), 7),
    ("PublicTest", "fer0000010.png", _votes(sadness=8, neutral=2), 0),  # same pixels as a train face
    ("PrivateTest", "fer0000011.png", _votes(happiness=10), 6),  # same pixels as a train face
]  # fmt: skip
_FOLDERS = {"Training": "FER2013Train", "PublicTest": "FER2013Valid", "PrivateTest": "FER2013Test"}


def _write_votes_csv(path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(VOTE_HEADER)
        for usage, name, votes, _ in FERPLUS_ROWS:
            writer.writerow([usage, name, *votes])


@pytest.fixture()
def ferplus_root(tmp_path: Path, faces: np.ndarray) -> Path:
    root = tmp_path / "ferplus"
    for folder in _FOLDERS.values():
        (root / folder).mkdir(parents=True)
    _write_votes_csv(root / "fer2013new.csv")
    for usage, name, _, face in FERPLUS_ROWS:
        if face is not None:
            Image.fromarray(faces[face]).save(root / _FOLDERS[usage] / name)
    return root


def test_ferplus_layout_train_follows_majority_protocol_and_later_duplicate_name(
    ferplus_root: Path, faces: np.ndarray
) -> None:
    train = load_ferplus_layout(ferplus_root, "train")
    # Kept: fer0000000 (neutral), fer0000004 (neutral once outliers go), the later fer0000005
    # row (surprise), fer0000008 (fear); everything else is nameless, tied, NF or unknown.
    assert train.labels.tolist() == [0, 0, 2, 6]
    assert train.class_names == FERPLUS_CLASSES
    np.testing.assert_array_equal(train.images, faces[[0, 3, 4, 6]])  # PNG is lossless
    assert train.exact_dup is not None and train.exact_dup.tolist() == [True, False, False, True]
    assert train.soft_labels is not None
    np.testing.assert_allclose(train.soft_labels[2], [0, 0, 0.7, 0, 0, 0, 0.3, 0], rtol=1e-6)
    assert train.source == f"ferplus:{ferplus_root}:train"


def test_ferplus_layout_val_and_test_splits(ferplus_root: Path, faces: np.ndarray) -> None:
    val = load_ferplus_layout(ferplus_root, "PublicTest")
    assert val.labels.tolist() == [4, 3]
    np.testing.assert_array_equal(val.images, faces[[7, 0]])
    assert val.exact_dup is not None and val.exact_dup.tolist() == [False, True]
    test = load_ferplus_layout(ferplus_root, "test", size=64, flag_duplicates=False)
    assert test.labels.tolist() == [1] and test.images.shape == (1, 64, 64) and test.exact_dup is None


def _write_fer2013_csv(path: Path, faces: np.ndarray) -> None:
    """Kaggle's fer2013.csv for the rows above (a nameless row still has pixels there)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["emotion", "pixels", "Usage"])
        for i, (usage, _, _, face) in enumerate(FERPLUS_ROWS):
            pixels = faces[face if face is not None else 8 + i % 4]
            writer.writerow([i % 7, " ".join(map(str, pixels.ravel())), usage])


def test_fer2013_csv_with_ferplus_votes_keeps_each_rows_own_pixels(tmp_path: Path, faces: np.ndarray) -> None:
    _write_votes_csv(tmp_path / "fer2013new.csv")
    _write_fer2013_csv(tmp_path / "fer2013.csv", faces)
    train = load_ferplus_layout(tmp_path, "train")
    # Both fer0000005 rows have their own pixels here, so the earlier (happiness) row stays.
    assert train.labels.tolist() == [0, 0, 1, 2, 6]
    np.testing.assert_array_equal(train.images, faces[[0, 3, 9, 4, 6]])
    assert train.exact_dup is not None and train.exact_dup.tolist() == [True, False, False, False, True]


def test_fer2013_csv_alone_gives_original_seven_classes(tmp_path: Path, faces: np.ndarray) -> None:
    _write_fer2013_csv(tmp_path / "fer2013.csv", faces)
    val = load_ferplus_layout(tmp_path, "val")
    assert val.class_names == FER2013_CLASSES
    assert val.labels.tolist() == [9 % 7, 10 % 7]
    assert val.soft_labels is None
    assert val.source == f"fer2013:{tmp_path}:val"


def test_ferplus_layout_missing_files_raise(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_ferplus_layout(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        load_ferplus_layout(tmp_path, "holdout")


# ---- RAF-DB -------------------------------------------------------------------------------------


def _tinted_rgb(face: np.ndarray, side: int) -> np.ndarray:
    """A colour image from a gray face, with distinct channels so an RGB/BGR swap would show."""
    big = np.asarray(Image.fromarray(face).resize((side, side), Image.Resampling.BILINEAR)).astype(np.float32)
    return np.stack([big, big * 0.75, big * 0.5], axis=-1).round().astype(np.uint8)


@pytest.fixture()
def rafdb_root(tmp_path: Path, faces: np.ndarray) -> Path:
    root = tmp_path / "basic"
    (root / "EmoLabel").mkdir(parents=True)
    (root / "Image" / "aligned").mkdir(parents=True)
    entries = [
        ("train_00001.jpg", 5, 0),
        ("test_0001.jpg", 7, 1),
        ("train_00002.jpg", 1, 2),
        ("test_0002.jpg", 4, 3),
    ]
    (root / "EmoLabel" / "list_patition_label.txt").write_text("".join(f"{n} {y}\n" for n, y, _ in entries))
    for name, _, face in entries:
        path = root / "Image" / "aligned" / name.replace(".jpg", "_aligned.jpg")
        Image.fromarray(_tinted_rgb(faces[face], 100)).save(path, quality=95)
    return root


def test_rafdb_reads_split_labels_and_aligned_rgb_faces(rafdb_root: Path, faces: np.ndarray) -> None:
    train = load_rafdb(rafdb_root, "train")
    assert train.class_names == RAFDB_CLASSES
    assert train.labels.tolist() == [4, 0]  # RAF-DB 5 = sadness, 1 = surprise
    assert train.images.shape == (2, 100, 100, 3) and train.images.dtype == np.uint8
    expected = np.stack([_tinted_rgb(faces[0], 100), _tinted_rgb(faces[2], 100)]).astype(np.float32)
    assert np.abs(train.images.astype(np.float32) - expected).mean() < 3.0  # JPEG, not lossless
    test = load_rafdb(rafdb_root, "test", size=48, mode="gray")
    assert test.labels.tolist() == [6, 3] and test.images.shape == (2, 48, 48)


def test_rafdb_rejects_missing_images_and_bad_lines(rafdb_root: Path) -> None:
    (rafdb_root / "Image" / "aligned" / "test_0002_aligned.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_rafdb(rafdb_root, "test")
    (rafdb_root / "EmoLabel" / "list_patition_label.txt").write_text("train_00001.jpg 9\n")
    with pytest.raises(ValueError, match="1..7"):
        load_rafdb(rafdb_root, "train")


# ---- AffectNet ----------------------------------------------------------------------------------


def _class_folders(root: Path, faces: np.ndarray, folders: dict[str, list[int]]) -> None:
    for folder, face_ids in folders.items():
        (root / folder).mkdir(parents=True)
        for k in face_ids:
            Image.fromarray(_tinted_rgb(faces[k], 96)).save(root / folder / f"img{k:03d}.png")


def test_affectnet_class_folders_by_index_and_name(tmp_path: Path, faces: np.ndarray) -> None:
    # "0" by index, "Happy" by name, "angry" by synonym, "8" (none) and "notes" are not classes.
    _class_folders(
        tmp_path / "train", faces, {"0": [0, 1], "Happy": [2], "angry": [3], "8": [4], "notes": [5]}
    )
    train = load_affectnet(tmp_path, "train", size=64)
    assert train.class_names == AFFECTNET8_CLASSES[:7]  # no contempt folder: AffectNet-7
    assert train.labels.tolist() == [
        0,
        0,
        AFFECTNET8_CLASSES.index("happy"),
        AFFECTNET8_CLASSES.index("anger"),
    ]
    assert train.images.shape == (4, 64, 64, 3)
    expected = np.asarray(
        Image.fromarray(_tinted_rgb(faces[2], 96)).resize((64, 64), Image.Resampling.BILINEAR)
    )
    np.testing.assert_array_equal(train.images[2], expected)  # PNG content, same resize
    assert load_dataset(train.source).labels.tolist() == train.labels.tolist()


def test_affectnet_contempt_folder_gives_eight_classes_unless_seven_asked(
    tmp_path: Path, faces: np.ndarray
) -> None:
    _class_folders(tmp_path / "validation", faces, {"neutral": [0], "Contempt": [1], "7": [2]})
    val8 = load_affectnet(tmp_path, "val")
    assert val8.class_names == AFFECTNET8_CLASSES and val8.labels.tolist() == [7, 7, 0]
    assert val8.images.shape == (3, 112, 112, 3)
    val7 = load_affectnet(tmp_path, "val", num_classes=7, mode="gray")
    assert val7.class_names == AFFECTNET8_CLASSES[:7] and val7.labels.tolist() == [0]
    assert val7.images.shape == (1, 112, 112)


def test_affectnet_annotation_files_crop_face_boxes_and_drop_non_expressions(
    tmp_path: Path, faces: np.ndarray
) -> None:
    images_dir = tmp_path / "Manually_Annotated_Images" / "17"
    images_dir.mkdir(parents=True)
    rows = []
    for k, expression in enumerate([3, 8, 7, 10, 0]):
        canvas = np.full((160, 200, 3), 40, dtype=np.uint8)
        canvas[30:126, 50:146] = _tinted_rgb(faces[k], 96)  # the face at x=50, y=30, 96x96
        Image.fromarray(canvas).save(images_dir / f"p{k}.png")
        rows.append([f"17/p{k}.png", 50, 30, 96, 96, "1;2", expression, 0.1, -0.2])
    with (tmp_path / "training.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
             "facial_landmarks", "expression", "valence", "arousal"]
        )  # fmt: skip
        writer.writerows(rows)
    with (tmp_path / "validation.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows[:2])  # the original validation.csv has no header row
    train = load_affectnet(tmp_path, "train", size=96)
    assert train.class_names == AFFECTNET8_CLASSES
    assert train.labels.tolist() == [3, 7, 0]  # 8 (none) and 10 (no face) dropped
    np.testing.assert_array_equal(train.images[0], _tinted_rgb(faces[0], 96))  # exactly the box
    assert load_affectnet(tmp_path, "validation", size=96).labels.tolist() == [3]
    assert load_affectnet(tmp_path, "train", num_classes=7, size=32).labels.tolist() == [3, 0]


# ---- load_dataset, save_npz, FaceArrays ---------------------------------------------------------


def test_load_dataset_dispatches_on_spec(ferplus_root: Path, rafdb_root: Path, tmp_path: Path) -> None:
    val = load_dataset(str(VAL_NPZ))
    assert len(val) == 3_199 and len(load_dataset(f"npz:{VAL_NPZ}")) == 3_199
    assert load_dataset(f"ferplus:{ferplus_root}:val").labels.tolist() == [4, 3]
    rafdb = load_dataset(f"rafdb:{rafdb_root}:test:size=48,mode=gray")
    assert rafdb.images.shape == (2, 48, 48) and rafdb.class_names == RAFDB_CLASSES
    assert parse_spec("affectnet:/data/a:b:val:classes=7,size=64") == (
        "affectnet", "/data/a:b", "val", {"classes": 7, "size": 64}
    )  # fmt: skip
    for bad in ["images.h5", "rafdb:/only-root", "rafdb:/r:test:colour=red", "ferplus:/r:val:mode=gray"]:
        with pytest.raises(ValueError):
            load_dataset(bad)


def test_save_npz_round_trips_through_load_npz(tmp_path: Path, rafdb_root: Path) -> None:
    val = load_npz(VAL_NPZ).subset(np.arange(0, 3_199, 100))
    save_npz(tmp_path / "val_small.npz", val)
    back = load_npz(tmp_path / "val_small.npz")
    np.testing.assert_array_equal(back.images, val.images)
    np.testing.assert_array_equal(back.labels, val.labels)
    np.testing.assert_array_equal(back.soft_labels, val.soft_labels)
    np.testing.assert_array_equal(back.exact_dup, val.exact_dup)
    assert back.class_names == val.class_names
    rafdb = load_rafdb(rafdb_root, "train")
    save_npz(tmp_path / "rafdb.npz", rafdb)
    again = load_npz(tmp_path / "rafdb.npz")
    assert again.class_names == RAFDB_CLASSES and again.images.shape == (2, 100, 100, 3)
    assert again.soft_labels is None and again.exact_dup is None


def test_subset_keeps_rows_aligned() -> None:
    val = load_npz(VAL_NPZ)
    picked = val.subset([5, 2, 7])
    np.testing.assert_array_equal(picked.images, val.images[[5, 2, 7]])
    np.testing.assert_array_equal(picked.labels, val.labels[[5, 2, 7]])
    assert picked.soft_labels is not None and (picked.soft_labels.argmax(axis=1) == picked.labels).all()
    assert picked.exact_dup is not None and picked.exact_dup.tolist() == val.exact_dup[[5, 2, 7]].tolist()


def test_face_arrays_rejects_inconsistent_arrays(faces: np.ndarray) -> None:
    labels = np.zeros(len(faces), dtype=np.int64)
    with pytest.raises(TypeError):
        FaceArrays(faces.astype(np.float32), labels, FERPLUS_CLASSES)
    with pytest.raises(ValueError):
        FaceArrays(faces, labels[:-1], FERPLUS_CLASSES)
    with pytest.raises(ValueError):
        FaceArrays(faces, labels + 8, FERPLUS_CLASSES)
    with pytest.raises(ValueError):
        FaceArrays(faces, labels, FERPLUS_CLASSES, soft_labels=np.zeros((len(faces), 7), np.float32))
