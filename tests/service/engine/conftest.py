"""Shared fixtures for the engine tests: the annotated photos and a dlib backend built once."""

from __future__ import annotations

import pytest
from photo_truth import PHOTOS, AnnotatedFace, read_annotations


@pytest.fixture(scope="session")
def annotations() -> dict[str, list[AnnotatedFace]]:
    if not PHOTOS.is_dir():
        pytest.fail(f"shared photos not found at {PHOTOS}")
    return read_annotations()


@pytest.fixture(scope="session")
def dlib_backend():
    from service.engine.faces import create_face_backend

    return create_face_backend("dlib", upsample=1, min_face_size=0)


@pytest.fixture
def detect_calls(engine, monkeypatch) -> list[int]:
    """How often the module's engine runs its full face detector: calls[0], counted from now."""
    calls = [0]
    backend = engine.face_backend
    detect = backend.detect

    def counted(*args, **kwargs):
        calls[0] += 1
        return detect(*args, **kwargs)

    monkeypatch.setattr(backend, "detect", counted)
    return calls
