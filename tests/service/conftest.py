"""Fixtures shared by the engine and HTTP tests: real weights (or a real fresh network), real photos.

Until trained weights ship at model/weights/fermam-ferplus.safetensors, the tests save a freshly
initialised FERMam with `save_checkpoint` and load it like any checkpoint: the real network and
the real loading path, only untrained (so tests check shapes and invariants, never labels).
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHIPPED_WEIGHTS = REPO / "model" / "weights" / "fermam-ferplus.safetensors"


@pytest.fixture(scope="session")
def weights_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if SHIPPED_WEIGHTS.is_file():
        return SHIPPED_WEIGHTS
    import torch

    from model.checkpoint import save_checkpoint
    from model.config import FERMamConfig
    from model.fermam import FERMam

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "fermam-untrained.safetensors"
    save_checkpoint(
        path, FERMam(FERMamConfig()).eval(), metadata={"name": "fermam", "version": "untrained-test"}
    )
    return path


@pytest.fixture(scope="session")
def shared_face_backend():
    """One dlib backend for every engine in the session (loading the predictor takes a second)."""
    from service.engine.faces import create_face_backend

    return create_face_backend("dlib", min_face_size=20)


@pytest.fixture(scope="session")
def engine_factory(weights_path: Path, shared_face_backend):
    """Build engines that share the session's face backend; each test module starts its own."""
    from service.engine.pipeline import Engine
    from service.settings import Settings

    def build(**overrides) -> Engine:
        settings = Settings(weights=weights_path, device="cpu", **overrides)
        return Engine(settings, face_backend=shared_face_backend)

    return build
