"""`FaceArrays`: the one in-memory form every dataset reader returns and the trainer consumes.

Whole splits fit in memory (FER+ train is 55 MB), so the trainer can move them to the device in
one copy and augment there; readers therefore return plain arrays rather than a per-item Dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True, eq=False)
class FaceArrays:
    """Face crops of one split with their labels.

    images: uint8 (N, H, W) grayscale or (N, H, W, 3) RGB, all crops the same size.
    labels: int64 (N,), indices into class_names.
    soft_labels: float32 (N, C) label distributions (FER+ cleaned votes), rows sum to 1; or None.
    exact_dup: bool (N,), True where the same pixels also occur in another split; or None.
    source: where the rows came from (a spec `load_dataset` accepts), recorded in checkpoints.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    soft_labels: np.ndarray | None = None
    exact_dup: np.ndarray | None = None
    source: str = ""

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.images.dtype != np.uint8:
            raise TypeError(f"images must be uint8, got {self.images.dtype}")
        if self.images.ndim not in (3, 4) or (self.images.ndim == 4 and self.images.shape[-1] != 3):
            raise ValueError(f"images must be (N, H, W) or (N, H, W, 3), got {self.images.shape}")
        if self.images.shape[0] != n:
            raise ValueError(f"{self.images.shape[0]} images but {n} labels")
        if self.labels.dtype != np.int64 or self.labels.ndim != 1:
            raise TypeError(f"labels must be int64 (N,), got {self.labels.dtype} {self.labels.shape}")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(f"labels outside 0..{len(self.class_names) - 1}")
        if self.soft_labels is not None and self.soft_labels.shape != (n, len(self.class_names)):
            raise ValueError(f"soft_labels shape {self.soft_labels.shape} != {(n, len(self.class_names))}")
        if self.exact_dup is not None and (self.exact_dup.dtype != np.bool_ or self.exact_dup.shape != (n,)):
            raise ValueError("exact_dup must be bool (N,)")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of every crop."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def is_rgb(self) -> bool:
        return self.images.ndim == 4

    def class_counts(self) -> np.ndarray:
        """Rows per class, int64 (C,): class weights and the per-class tables read this."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)

    def subset(self, indices: np.ndarray | slice | list[int]) -> FaceArrays:
        """The rows at `indices` (a smoke run's few hundred faces, a stratified hold-out)."""
        idx = np.arange(len(self))[indices]
        return replace(
            self,
            images=self.images[idx],
            labels=self.labels[idx],
            soft_labels=None if self.soft_labels is None else self.soft_labels[idx],
            exact_dup=None if self.exact_dup is None else self.exact_dup[idx],
            source=f"{self.source}[{len(idx)} rows]",
        )
