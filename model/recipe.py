"""A training run's recipe: plain data, importable without torch (the command line builds it)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """Everything that shapes a run; stored in the checkpoint's metadata."""

    epochs: int = 60
    time_budget_s: float | None = None
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    ema_decay: float = 0.998
    label_smoothing: float = 0.0
    soft_labels: bool = True
    seed: int = 0
    limit: int | None = None
    epoch_size: int | None = None
    bn_recalibration: int = 0


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    fields = Recipe.__dataclass_fields__
    return Recipe(**{k: getattr(args, k) for k in fields if getattr(args, k, None) is not None})
