"""Dataset readers (all returning `FaceArrays`) and the shared crop-to-tensor transform.

The transform (torch) is imported on first use, so commands that only need the readers or
`SPEC_HELP` (e.g. `fermam eval --help`) start without loading torch.
"""

from typing import Any

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


def __getattr__(name: str) -> Any:
    if name == "to_model_input":
        from model.data.transforms import to_model_input

        return to_model_input
    raise AttributeError(f"module 'model.data' has no attribute {name!r}")
