"""Where the network runs: one resolution of "auto"/"cpu"/"cuda[:N]" for training, evaluation and serving."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """ "auto" is CUDA when present, else the CPU; asking for CUDA without it is an error, not a
    silent fall back to a CPU a hundred times slower."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device
