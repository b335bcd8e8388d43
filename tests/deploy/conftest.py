"""Fixtures of the deployment checks."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pytest
from deploy_helpers import FERMAM_PREFIX


@pytest.fixture
def build_settings(monkeypatch: pytest.MonkeyPatch):
    """Build the service's Settings exactly as `fermam serve` would in a container whose
    environment holds only `variables` (string values, as environment variables are)."""
    from service.settings import Settings

    def build(variables: Mapping[str, str]) -> Settings:
        for name in [name for name in os.environ if name.startswith(FERMAM_PREFIX)]:
            monkeypatch.delenv(name)
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        return Settings()

    return build


SHIPPED_WEIGHTS = Path(__file__).resolve().parents[2] / "model" / "weights" / "fermam-ferplus.safetensors"


@pytest.fixture(scope="session")
def weights_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped FERMam checkpoint; until it exists, a freshly initialised FERMam saved with
    the real checkpoint code (loading is what the smoke check proves, not accuracy)."""
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
