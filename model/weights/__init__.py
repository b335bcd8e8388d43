"""The shipped FERMam checkpoint (trained on FER+ by `fermam train`) lives beside this file."""

from __future__ import annotations

from pathlib import Path

DEFAULT_WEIGHTS_NAME = "fermam-ferplus.safetensors"


def default_weights_path() -> Path:
    """Path of the checkpoint the package ships (it may be absent in a source checkout)."""
    return Path(__file__).resolve().parent / DEFAULT_WEIGHTS_NAME
