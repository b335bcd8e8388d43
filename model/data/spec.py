"""`load_dataset(spec)`: one string names a split, so `fermam train/eval` take any format as one flag.

Specs: `PATH.npz` (or `npz:PATH`), `ferplus:ROOT:SPLIT` (alias `fer2013:`), `rafdb:ROOT:SPLIT`,
`affectnet:ROOT:SPLIT`, each optionally followed by `:key=value,...` with keys `size`, `mode`
(rgb / gray) and, for AffectNet, `classes` (7 or 8); e.g. `rafdb:/data/RAF-DB/basic:test:size=112`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model.data.affectnet import load_affectnet
from model.data.arrays import FaceArrays
from model.data.ferplus import load_ferplus_layout
from model.data.npz import load_npz
from model.data.rafdb import load_rafdb

SPEC_HELP = (
    "FILE.npz, ferplus:ROOT:SPLIT, rafdb:ROOT:SPLIT or affectnet:ROOT:SPLIT "
    "(optionally :size=N,mode=rgb|gray,classes=7|8)"
)
_KINDS = ("npz", "ferplus", "fer2013", "rafdb", "affectnet")
_OPTION_TYPES = {"size": int, "mode": str, "classes": int}
_ALLOWED_OPTIONS = {
    "ferplus": {"size"},
    "fer2013": {"size"},
    "rafdb": {"size", "mode"},
    "affectnet": {"size", "mode", "classes"},
}


def _parse_options(text: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in _OPTION_TYPES:
            raise ValueError(f"unknown dataset option {key!r}; known: {sorted(_OPTION_TYPES)}")
        options[key] = _OPTION_TYPES[key](value.strip())
    return options


def parse_spec(spec: str) -> tuple[str, str, str | None, dict[str, Any]]:
    """(kind, path, split or None, options) of a dataset spec."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in _KINDS:
        if spec.endswith(".npz"):
            return "npz", spec, None, {}
        raise ValueError(f"cannot read dataset {spec!r}; expected {SPEC_HELP}")
    if kind == "npz":
        return "npz", rest, None, {}
    options: dict[str, Any] = {}
    head, _, last = rest.rpartition(":")
    if "=" in last:
        options, rest = _parse_options(last), head
    root, sep, split = rest.rpartition(":")
    if not sep or not root or not split:
        raise ValueError(f"dataset spec {spec!r} needs {kind}:ROOT:SPLIT")
    unsupported = set(options) - _ALLOWED_OPTIONS[kind]
    if unsupported:
        raise ValueError(f"{kind} does not take {sorted(unsupported)}")
    return kind, root, split, options


def load_dataset(spec: str | Path) -> FaceArrays:
    """The split a spec names, as `FaceArrays` (see the module docstring for the spec syntax)."""
    kind, path, split, options = parse_spec(str(spec))
    if kind == "npz":
        return load_npz(path)
    assert split is not None
    if kind in ("ferplus", "fer2013"):
        return load_ferplus_layout(path, split, size=options.get("size"))
    if kind == "rafdb":
        return load_rafdb(path, split, **options)
    return load_affectnet(
        path,
        split,
        **{k: v for k, v in options.items() if k != "classes"},
        num_classes=options.get("classes"),
    )
