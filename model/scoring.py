"""How a checkpoint's logits become the scores and the decision every caller reports.

One rule, read from the checkpoint's config, applied here and nowhere else (the engine, `fermam
eval`, `fermam calibrate`, the CPU-runtime checks and the benchmarks all call it):

    scores = softmax((logits - prior_exponent * log(class_prior)) / temperature)

The subtracted term is post-hoc logit adjustment (Menon et al., "Long-tail learning via logit
adjustment", 2021): the network learned the training labels' balance (FER+: a third neutral) and
carries it into every face; dividing the scores by the training prior to a power removes part of
that lean without retraining. The adjustment alone moves the decision (argmax); the temperature
alone only sets how confident the scores are, so each can be read and fitted for what it does.
A config without a prior (checkpoints from before it existed) or with exponent 0 scores as before.
"""

from __future__ import annotations

import numpy as np
import torch

from model.config import FERMamConfig


def logit_offsets(config: FERMamConfig) -> np.ndarray:
    """The per-class term subtracted from the logits, (C,) float64 in `config.class_names` order."""
    if config.class_prior is None or config.prior_exponent == 0.0:
        return np.zeros(config.num_classes, dtype=np.float64)
    return config.prior_exponent * np.log(np.asarray(config.class_prior, dtype=np.float64))


def adjusted_logits(logits: torch.Tensor, config: FERMamConfig) -> torch.Tensor:
    """(logits - offsets) / temperature in float32, (B, C) in the config's class order: the
    softmax of this is the score, its argmax the decision."""
    logits = logits.float()
    offsets = torch.as_tensor(logit_offsets(config), dtype=torch.float32, device=logits.device)
    return (logits - offsets) / config.temperature


def class_scores(logits: torch.Tensor, config: FERMamConfig) -> torch.Tensor:
    """The probabilities a caller of the weights reports, (B, C) float32."""
    return torch.softmax(adjusted_logits(logits, config), dim=-1)


def raw_logits_from_scores(scores: np.ndarray, config: FERMamConfig) -> np.ndarray:
    """Undo `class_scores`: logits (up to a constant per row, which no softmax sees) from the
    probabilities a checkpoint's rule produced, e.g. the engine's scores saved by `fermam eval
    --photos --predictions`. Lets a new rule be fitted on what the service really computed."""
    log_p = np.log(np.clip(np.asarray(scores, dtype=np.float64), 1e-30, None))
    return log_p * config.temperature + logit_offsets(config)
