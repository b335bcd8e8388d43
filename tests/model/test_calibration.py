"""Fitting the scoring rule: temperature scaling, the logit adjustment's exponent, and the
expected calibration error."""

from __future__ import annotations

import numpy as np
import pytest

from model.calibration import (
    ExponentScan,
    accuracy_near,
    choose_prior_exponent,
    class_prior,
    cross_validate_rule,
    expected_calibration_error,
    fit_scoring_rule,
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


# --- the logit adjustment's exponent, fitted with the temperature -----------------------------

PRIOR = np.array([0.35, 0.29, 0.13, 0.12, 0.08, 0.005, 0.02, 0.005])


def _biased(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Balanced labels scored by a model that learned PRIOR's balance: its logits carry log(PRIOR),
    as a network trained on those labels does, so the frequent classes win too often."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 8, n)
    logits = rng.normal(0.0, 1.0, (n, 8)) + np.log(PRIOR)
    logits[np.arange(n), labels] += 2.5
    return logits, labels


def test_class_prior_is_the_label_shares_with_every_class_kept_finite() -> None:
    assert class_prior(np.array([0, 0, 0, 1]), 3) == pytest.approx((3 / 5, 1 / 5, 1 / 5))


def test_the_fitted_exponent_undoes_a_learned_prior_on_balanced_labels() -> None:
    logits, labels = _biased()
    fit = fit_scoring_rule(logits, labels, np.log(PRIOR))
    # Dividing by the prior the logits carry (a = 1) is what balanced labels want.
    assert 0.8 <= fit.prior_exponent <= 1.2
    at = list(fit.scan.exponents).index(fit.prior_exponent)
    assert fit.scan.macro_recall[at] > fit.scan.macro_recall[0] + 0.1
    assert fit.scan.accuracy[at] >= fit.scan.accuracy[0]
    # The temperature is fitted on the adjusted logits: it matches T fitted there directly.
    adjusted = logits - fit.prior_exponent * np.log(PRIOR)
    assert fit.temperature == pytest.approx(fit_temperature(adjusted, labels), rel=1e-6)


def _scan(accuracy: list[float], macro: list[float]) -> ExponentScan:
    n = len(accuracy)
    return ExponentScan(
        np.round(np.arange(n) * 0.05, 2),
        np.array(accuracy),
        np.array(macro),
        np.array(macro),
        np.zeros((n, 1)),
    )


def test_one_lucky_exponent_does_not_win_against_a_good_neighbourhood() -> None:
    accuracy = [0.70] * 13
    macro = [0.40, 0.40, 0.40, 0.40, 0.58, 0.40, 0.40, 0.48, 0.49, 0.50, 0.49, 0.48, 0.45]
    assert choose_prior_exponent(_scan(accuracy, macro)) == 0.45  # not the spike at 0.20
    assert choose_prior_exponent(_scan(accuracy, macro), window=0) == 0.20


def test_an_exponent_that_costs_accuracy_is_not_chosen() -> None:
    accuracy = [0.70, 0.70, 0.71, 0.70, 0.69, 0.60, 0.55]
    macro = [0.40, 0.41, 0.44, 0.46, 0.50, 0.60, 0.65]
    chosen = choose_prior_exponent(_scan(accuracy, macro), window=0)
    assert chosen == 0.15  # 0.20 has more recall but 0.69 < 0.70


def test_photos_without_logits_count_as_wrong_and_stay_out_of_the_temperature() -> None:
    logits, labels = _biased(400)
    missing = logits.copy()
    missing[:40] = np.nan
    fit = fit_scoring_rule(missing, labels, np.log(PRIOR), exponent=0.5)
    assert fit.scan.accuracy[0] == pytest.approx((logits[40:].argmax(1) == labels[40:]).sum() / 400)
    adjusted = logits[40:] - 0.5 * np.log(PRIOR)
    assert fit.temperature == pytest.approx(fit_temperature(adjusted, labels[40:]), rel=1e-6)


def test_cross_validation_scores_each_fold_with_a_rule_fitted_on_the_others() -> None:
    logits, labels = _biased(1000)
    cv = cross_validate_rule(logits, labels, np.log(PRIOR), folds=4, repeats=2)
    assert cv["out_of_fold_macro_recall"] > cv["unadjusted_macro_recall"] + 0.1
    assert cv["out_of_fold_accuracy"] >= cv["unadjusted_accuracy"] - 0.01
    assert 0.0 <= cv["out_of_fold_ece"] < 0.1 and 0.5 <= cv["exponent_median"] <= 1.2
