"""Fixtures shared by every test package (here, not in tests/, so that tests/model and tests/service
cannot shadow the real packages on sys.path)."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.weights import default_weights_path


@pytest.fixture(scope="session")
def weights_path() -> Path:
    """The shipped FERMam checkpoint: service and deployment tests run on the real trained weights."""
    path = default_weights_path()
    if not path.is_file():
        pytest.fail(f"the shipped weights are missing: {path}")
    return path
