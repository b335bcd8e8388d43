"""Settings and the `fermam serve` flags agree with what the backends accept."""

from __future__ import annotations

import typing

import pytest
from pydantic import ValidationError

from service.commands.serve import build_parser
from service.engine.faces.fan_backend import DETECTOR_FILES
from service.settings import Settings


def test_detector_choices_are_the_face_alignment_backends_detectors() -> None:
    allowed = typing.get_args(Settings.model_fields["detector"].annotation)
    assert set(allowed) == set(DETECTOR_FILES)
    (flag,) = [action for action in build_parser()._actions if action.dest == "detector"]
    assert set(flag.choices) == set(DETECTOR_FILES)


def test_a_detector_the_backend_cannot_load_is_refused_at_start() -> None:
    with pytest.raises(ValidationError):
        Settings(detector="dlib")
    assert Settings(detector="retinaface").detector == "retinaface"


def test_api_keys_come_from_a_file_too_so_they_stay_out_of_the_process_list(tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# rotated monthly\nfirst-key-123\nsecond-key-456, third-key-789\n\n")
    settings = Settings(api_keys="flag-key-000", api_keys_file=keys)
    assert settings.api_keys == ["flag-key-000", "first-key-123", "second-key-456", "third-key-789"]
    assert "first-key-123" not in repr(settings)
    keys.write_text("short\n")
    with pytest.raises(ValidationError, match="at least 8"):
        Settings(api_keys_file=keys)
    with pytest.raises(ValidationError, match="cannot read"):
        Settings(api_keys_file=tmp_path / "missing")


def test_the_default_connection_cap_is_per_cpu_within_the_open_file_limit(monkeypatch) -> None:
    import resource

    from service import settings as settings_module

    monkeypatch.setattr(settings_module.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (100_000, 100_000))
    assert Settings().max_connections == 2 * settings_module.CONNECTIONS_PER_CPU
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 4096))
    assert Settings().max_connections == 2 * settings_module.CONNECTIONS_PER_CPU  # 512 < 1024 - 64
    monkeypatch.setattr(settings_module.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert Settings().max_connections == 1024 - settings_module.RESERVED_FDS
