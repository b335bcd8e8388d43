"""The scoring rule every caller applies: softmax((logits - a * log prior) / T), from the config."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from model.config import FERMamConfig
from model.scoring import adjusted_logits, class_scores, logit_offsets, raw_logits_from_scores

# FER+ train's label shares (neutral .. contempt), the prior the shipped rule uses.
PRIOR = (0.3488, 0.2908, 0.1257, 0.1202, 0.0838, 0.0047, 0.0212, 0.0047)


def _reference(
    logits: np.ndarray, prior: tuple[float, ...], exponent: float, temperature: float
) -> np.ndarray:
    z = (logits.astype(np.float64) - exponent * np.log(np.asarray(prior))) / temperature
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _logits(rows: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(0.0, 3.0, (rows, 8)).astype(np.float32))


def test_scores_are_the_reference_formula() -> None:
    config = FERMamConfig(temperature=1.04, class_prior=PRIOR, prior_exponent=0.5)
    logits = _logits()
    scores = class_scores(logits, config)
    assert scores.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), _reference(logits.numpy(), PRIOR, 0.5, 1.04), atol=1e-6)
    # The adjustment is not a no-op here: it lifts the rare classes over the frequent ones.
    plain = torch.softmax(logits / 1.04, -1)
    assert (scores.argmax(1) != plain.argmax(1)).any()


def test_a_config_without_a_prior_scores_as_temperature_scaling_alone() -> None:
    old = FERMamConfig(temperature=0.87).to_dict()
    del old["class_prior"], old["prior_exponent"]  # a checkpoint written before the adjustment
    config = FERMamConfig.from_dict(old)
    assert config.class_prior is None and config.prior_exponent == 0.0
    logits = _logits()
    np.testing.assert_allclose(class_scores(logits, config).numpy(), torch.softmax(logits / 0.87, -1).numpy())
    assert not logit_offsets(config).any()


def test_the_exponent_moves_the_decision_and_the_temperature_does_not() -> None:
    logits = _logits(256)
    adjusted = FERMamConfig(class_prior=PRIOR, prior_exponent=0.5)
    hotter = replace(adjusted, temperature=3.0)
    decided = adjusted_logits(logits, adjusted).argmax(1)
    assert torch.equal(decided, adjusted_logits(logits, hotter).argmax(1))
    assert not torch.equal(decided, logits.argmax(1))


def test_raw_logits_are_recovered_from_the_scores_up_to_a_constant_per_row() -> None:
    config = FERMamConfig(temperature=0.9, class_prior=PRIOR, prior_exponent=0.7)
    logits = _logits()
    recovered = raw_logits_from_scores(class_scores(logits, config).numpy(), config)
    difference = recovered - logits.numpy().astype(np.float64)
    np.testing.assert_allclose(difference, difference[:, :1].repeat(8, axis=1), atol=1e-4)


def test_the_prior_travels_in_the_config_json() -> None:
    config = FERMamConfig(temperature=1.04, class_prior=PRIOR, prior_exponent=0.5)
    again = FERMamConfig.from_json(config.to_json())
    assert again == config and isinstance(again.class_prior, tuple)


@pytest.mark.parametrize(
    "fields",
    [
        {"class_prior": PRIOR[:7]},  # one value short
        {"class_prior": (0.0,) + PRIOR[1:]},  # log(0)
        {"prior_exponent": 0.5},  # an exponent of nothing
        {"temperature": 0.0},
    ],
)
def test_rules_that_cannot_score_are_refused(fields: dict) -> None:
    with pytest.raises(ValueError):
        FERMamConfig(**fields)
