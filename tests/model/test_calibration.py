"""Temperature scaling and the expected calibration error."""

from __future__ import annotations

import numpy as np
import pytest

from model.calibration import (
    accuracy_near,
    expected_calibration_error,
    fit_temperature,
    reliability,
    softmax_t,
)
from model.config import FERMamConfig


def _sampled(true_t: float, n: int = 20_000, classes: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, size=(n, classes))
    probs = softmax_t(logits, true_t)
    labels = np.array([rng.choice(classes, p=p) for p in probs])
    return logits, labels


@pytest.mark.parametrize("true_t", [0.6, 1.0, 2.5])
def test_fit_recovers_the_temperature_that_generated_the_labels(true_t: float) -> None:
    logits, labels = _sampled(true_t)
    assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.06)


def test_calibrated_scores_have_low_ece_and_overconfident_ones_do_not() -> None:
    logits, labels = _sampled(2.0)
    assert expected_calibration_error(softmax_t(logits, 2.0), labels) < 0.02
    assert expected_calibration_error(softmax_t(logits, 1.0), labels) > 0.08


def test_reliability_bins_count_every_row_once() -> None:
    logits, labels = _sampled(1.0, n=1000)
    r = reliability(softmax_t(logits), labels, bins=15)
    assert r["count"].sum() == 1000 and len(r["count"]) == 15


def test_temperature_travels_in_the_config_json_and_defaults_to_one() -> None:
    config = FERMamConfig(temperature=1.7)
    assert FERMamConfig.from_json(config.to_json()).temperature == 1.7
    old = config.to_dict()
    del old["temperature"]  # a checkpoint written before calibration existed
    assert FERMamConfig.from_dict(old).temperature == 1.0


def test_accuracy_near_a_score_counts_only_faces_scored_close_to_it() -> None:
    probs = np.array([[0.9, 0.1], [0.88, 0.12], [0.2, 0.8], [0.5, 0.5]])
    labels = np.array([0, 1, 1, 0])
    assert accuracy_near(probs, labels, 0.9) == {"faces": 2, "accuracy": 0.5}
    assert accuracy_near(probs, labels, 0.8, width=0.01) == {"faces": 1, "accuracy": 1.0}
