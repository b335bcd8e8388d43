"""Dataset readers (all returning `FaceArrays`) and the shared crop-to-tensor transform."""

from model.data.affectnet import load_affectnet
from model.data.arrays import FaceArrays
from model.data.ferplus import (
    FER2013_CLASSES,
    FERPLUS_VOTE_COLUMNS,
    load_ferplus_layout,
    majority_labels,
    vote_distribution,
)
from model.data.npz import load_npz, save_npz
from model.data.rafdb import load_rafdb
from model.data.spec import SPEC_HELP, load_dataset, parse_spec
from model.data.transforms import to_model_input

__all__ = [
    "FER2013_CLASSES",
    "FERPLUS_VOTE_COLUMNS",
    "SPEC_HELP",
    "FaceArrays",
    "load_affectnet",
    "load_dataset",
    "load_ferplus_layout",
    "load_npz",
    "load_rafdb",
    "majority_labels",
    "parse_spec",
    "save_npz",
    "to_model_input",
    "vote_distribution",
]
