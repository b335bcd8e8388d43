"""Fixtures of the deployment checks."""

from __future__ import annotations

import os
from collections.abc import Mapping

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
