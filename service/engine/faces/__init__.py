"""Face stage: detection + 68 landmarks behind one contract, backend chosen by configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from service.engine.faces.base import (
    NUM_LANDMARKS,
    OUTER_EYE_CORNERS,
    Box,
    DetectedFace,
    FaceBackend,
    ImageFaces,
    landmarks_in_crops,
)

BackendName = Literal["dlib", "face-alignment"]

__all__ = [
    "NUM_LANDMARKS",
    "OUTER_EYE_CORNERS",
    "BackendName",
    "Box",
    "DetectedFace",
    "FaceBackend",
    "ImageFaces",
    "create_face_backend",
    "landmarks_in_crops",
]


def create_face_backend(
    name: BackendName,
    *,
    device: str = "cpu",
    min_face_size: int = 20,
    detector: str = "sfd",
    weights_dir: Path | None = None,
    upsample: int | None = None,
    allow_download: bool = False,
) -> FaceBackend:
    """Build a face backend by name; the heavy imports happen only for the backend chosen.

    - `dlib`: CPU only (`device` must be "cpu"); `upsample` defaults to 1 (faces down to ~40 px);
      `weights_dir` may hold `shape_predictor_68_face_landmarks.dat` (default: the copy bundled in
      face-recognition-models); `detector` is ignored.
    - `face-alignment`: `detector` is one of face_alignment's detectors ("sfd", "blazeface",
      "retinaface"); weights are read from `weights_dir` (default `$TORCH_HOME/hub/checkpoints`) and
      fetched only when `allow_download` is true; otherwise missing files raise at construction.
      `upsample` is not used.
    """
    if name == "dlib":
        if device != "cpu":
            raise ValueError(f"the dlib backend runs on the CPU only, not {device!r}")
        from service.engine.faces.dlib_backend import DlibFaceBackend

        return DlibFaceBackend(
            min_face_size=min_face_size, upsample=1 if upsample is None else upsample, weights_dir=weights_dir
        )
    if name == "face-alignment":
        from service.engine.faces.fan_backend import FanFaceBackend

        return FanFaceBackend(
            device=device,
            min_face_size=min_face_size,
            detector=detector,
            weights_dir=weights_dir,
            allow_download=allow_download,
        )
    raise ValueError(f"unknown face backend {name!r}; choose 'dlib' or 'face-alignment'")
