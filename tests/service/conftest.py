"""Fixtures shared by the engine and HTTP tests: real photos (the shipped weights come from
tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


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
        settings = Settings(**({"weights": weights_path, "device": "cpu"} | overrides))
        return Engine(settings, face_backend=shared_face_backend)

    return build
