"""Settings and the `fermam serve` flags agree with what the backends accept."""

from __future__ import annotations

import typing

import pytest
from pydantic import ValidationError

from service.engine.faces.fan_backend import DETECTOR_FILES
from service.serve import build_parser
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
