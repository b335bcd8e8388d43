"""Fitting the scoring rule (model/scoring.py): the logit adjustment's exponent and the
temperature (Guo et al., 2017), and the expected calibration error that judges the temperature.

The temperature T divides the logits before the softmax: it changes how confident the scores
are, never which class wins. It is fitted by minimising the negative log-likelihood.

The exponent a of the logit adjustment (subtract a * log(training prior)) does change which class
wins. One number on a fixed direction (the training labels' balance) rather than a free vector
per class: the dev photos hold 5-7 faces of three classes, and a vector fitted to them would
learn those few photos. a is chosen on a grid by a criterion that no single photo can swing much
(`choose_prior_exponent`), then T is fitted with a applied. Both travel in the checkpoint's
config, so every caller of the weights gets the same decisions and probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.evaluate import COMMON_CLASS_MIN_SUPPORT, macro_recall, recall_per_class

ECE_BINS = 15
# Exponents searched: 0 (no adjustment) to 1.2 (past full division by the prior, a = 1), in steps
# coarse enough that neighbours differ by more than one photo's worth of noise.
PRIOR_EXPONENTS = tuple(round(0.05 * i, 2) for i in range(25))
# The criterion is averaged over this many grid points either side of each exponent, so a choice
# needs a neighbourhood that is good too, not one lucky point.
EXPONENT_WINDOW = 2
NO_PREDICTION = -1  # a row without logits (a photo without a face): always wrong


def fit_temperature(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """The T > 0 that minimises the NLL of softmax(logits / T) on (logits, labels).

    Optimised over log T (so T stays positive) with L-BFGS; the problem is convex in 1/T.
    """
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.int64)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimiser.step(closure)
    return float(log_t.detach().exp())


def softmax_t(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / T, numerically stable."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin: count, mean confidence, accuracy (top-1)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    conf = np.bincount(which, weights=confidence, minlength=bins) / np.maximum(count, 1)
    acc = np.bincount(which, weights=correct.astype(np.float64), minlength=bins) / np.maximum(count, 1)
    return {"edges": edges, "count": count, "confidence": conf, "accuracy": acc}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    r = reliability(probs, labels, bins)
    total = r["count"].sum()
    return float((r["count"] * np.abs(r["accuracy"] - r["confidence"])).sum() / max(total, 1))


def accuracy_near(
    probs: np.ndarray, labels: np.ndarray, score: float, width: float = 0.05
) -> dict[str, float]:
    """How often the top class is right when its score is within `width` of `score`: what a
    score means to a user ("of the faces scored 0.9, how many were right")."""
    confidence = probs.max(axis=1)
    near = np.abs(confidence - score) <= width
    correct = probs.argmax(axis=1) == np.asarray(labels)
    return {"faces": int(near.sum()), "accuracy": float(correct[near].mean()) if near.any() else float("nan")}


def save_reliability_png(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, *, bins: int = ECE_BINS
) -> Path:
    """Reliability diagram: accuracy against confidence per bin, one line per (probs, labels)."""
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for name, (probs, labels) in curves.items():
        r = reliability(probs, labels, bins)
        used = r["count"] > 0
        ece = expected_calibration_error(probs, labels, bins)
        ax.plot(r["confidence"][used], r["accuracy"][used], marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"reliability, {bins} equal-width bins")
    fig.savefig(path, dpi=120)
    return path


def class_prior(labels: np.ndarray, num_classes: int) -> tuple[float, ...]:
    """Each class's share of the labels (a training split's balance), every class at least one
    count so its log stays finite."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)[:num_classes]
    counts = np.maximum(counts, 1).astype(np.float64)
    return tuple(float(c) for c in counts / counts.sum())


def adjusted_decisions(logits: np.ndarray, log_prior: np.ndarray, exponent: float) -> np.ndarray:
    """argmax(logits - exponent * log_prior) per row; rows of NaN (no face) give NO_PREDICTION."""
    logits = np.asarray(logits, dtype=np.float64)
    missing = np.isnan(logits).any(axis=1)
    decided = np.nan_to_num(logits - exponent * np.asarray(log_prior)).argmax(axis=1)
    return np.where(missing, NO_PREDICTION, decided)


@dataclass(frozen=True)
class ExponentScan:
    """The decision's scores at each searched exponent, (A,) arrays (per-class recall (A, C))."""

    exponents: np.ndarray
    accuracy: np.ndarray
    macro_recall: np.ndarray
    macro_recall_common: np.ndarray
    per_class_recall: np.ndarray

    def rows(self) -> list[dict[str, float]]:
        """One JSON-ready row per exponent."""
        return [
            {
                "exponent": float(a),
                "accuracy": float(acc),
                "macro_recall": float(m),
                "macro_recall_common": float(mc),
            }
            for a, acc, m, mc in zip(
                self.exponents, self.accuracy, self.macro_recall, self.macro_recall_common, strict=True
            )
        ]


def scan_exponents(
    logits: np.ndarray,
    labels: np.ndarray,
    log_prior: np.ndarray,
    exponents: tuple[float, ...] = PRIOR_EXPONENTS,
) -> ExponentScan:
    """Accuracy and macro recall (all classes, and classes with COMMON_CLASS_MIN_SUPPORT rows) of
    the adjusted decision at each exponent; NaN rows of `logits` count as wrong."""
    c = np.asarray(logits).shape[1]
    accuracy, macro, common, per_class = [], [], [], []
    for a in exponents:
        decided = adjusted_decisions(logits, log_prior, a)
        accuracy.append(float((decided == labels).mean()))
        macro.append(macro_recall(labels, decided, c))
        common.append(macro_recall(labels, decided, c, min_support=COMMON_CLASS_MIN_SUPPORT))
        per_class.append(recall_per_class(labels, decided, c))
    return ExponentScan(
        np.asarray(exponents, dtype=np.float64),
        np.asarray(accuracy),
        np.asarray(macro),
        np.asarray(common),
        np.asarray(per_class),
    )


def _window_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean over `window` points either side (the ends repeated): what the neighbourhood says."""
    padded = np.pad(values, window, mode="edge")
    return np.convolve(padded, np.ones(2 * window + 1) / (2 * window + 1), mode="valid")


def choose_prior_exponent(scan: ExponentScan, window: int = EXPONENT_WINDOW) -> float:
    """The exponent with the highest macro recall averaged over its neighbourhood, among those
    whose accuracy, at the point and averaged over the neighbourhood, is not below the unadjusted
    decision's (the scan's first exponent must be 0). Macro recall over all classes is what the
    adjustment is for; the neighbourhood mean keeps one photo of a 5-photo class from choosing."""
    if scan.exponents[0] != 0.0:
        raise ValueError("the scan must start at exponent 0 (the unadjusted decision)")
    baseline = scan.accuracy[0]
    allowed = (scan.accuracy >= baseline) & (_window_mean(scan.accuracy, window) >= baseline)
    allowed[0] = True
    merit = np.where(allowed, _window_mean(scan.macro_recall, window), -np.inf)
    return float(scan.exponents[int(np.argmax(merit))])


@dataclass(frozen=True)
class RuleFit:
    """A fitted scoring rule: the exponent, the temperature fitted with it, and the scan."""

    prior_exponent: float
    temperature: float
    scan: ExponentScan


def fit_scoring_rule(
    logits: np.ndarray,
    labels: np.ndarray,
    log_prior: np.ndarray,
    *,
    exponent: float | None = None,
    window: int = EXPONENT_WINDOW,
) -> RuleFit:
    """Choose the exponent (unless given) on (logits, labels), then fit T by NLL on the adjusted
    logits of the rows that have them (NaN rows, photos without a face, only count as wrong)."""
    labels = np.asarray(labels, dtype=np.int64)
    scan = scan_exponents(logits, labels, log_prior)
    chosen = choose_prior_exponent(scan, window) if exponent is None else float(exponent)
    found = ~np.isnan(np.asarray(logits, dtype=np.float64)).any(axis=1)
    adjusted = np.asarray(logits, dtype=np.float64)[found] - chosen * np.asarray(log_prior)
    return RuleFit(chosen, fit_temperature(adjusted, labels[found]), scan)


def cross_validate_rule(
    logits: np.ndarray,
    labels: np.ndarray,
    log_prior: np.ndarray,
    *,
    folds: int = 5,
    repeats: int = 20,
    seed: int = 0,
    window: int = EXPONENT_WINDOW,
) -> dict[str, float]:
    """How the fitting procedure does on rows it did not see: stratified `folds`-fold splits,
    `repeats` times; each fold's rows are decided and scored by a rule fitted on the others.
    Returns the means and spreads over repeats of the out-of-fold accuracy, macro recalls and ECE,
    the unadjusted decision's figures, and the spread of the chosen exponents."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    c = logits.shape[1]
    found = ~np.isnan(logits).any(axis=1)
    rng = np.random.default_rng(seed)
    chosen: list[float] = []
    figures: list[tuple[float, float, float, float]] = []
    for _ in range(repeats):
        fold = np.zeros(len(labels), dtype=np.int64)
        for k in range(c):  # stratified: every class spread over the folds
            rows = np.flatnonzero(labels == k)
            fold[rng.permutation(rows)] = np.arange(len(rows)) % folds
        decided = np.full(len(labels), NO_PREDICTION)
        probs = np.zeros_like(logits)
        for f in range(folds):
            train, test = fold != f, fold == f
            fit = fit_scoring_rule(logits[train], labels[train], log_prior, window=window)
            chosen.append(fit.prior_exponent)
            decided[test] = adjusted_decisions(logits[test], log_prior, fit.prior_exponent)
            adjusted = np.nan_to_num(logits[test]) - fit.prior_exponent * np.asarray(log_prior)
            probs[test] = softmax_t(adjusted, fit.temperature)
        figures.append(
            (
                float((decided == labels).mean()),
                macro_recall(labels, decided, c),
                macro_recall(labels, decided, c, min_support=COMMON_CLASS_MIN_SUPPORT),
                expected_calibration_error(probs[found], labels[found]),
            )
        )
    base = adjusted_decisions(logits, log_prior, 0.0)
    spread = np.asarray(figures)
    out = {
        "folds": folds,
        "repeats": repeats,
        "unadjusted_accuracy": float((base == labels).mean()),
        "unadjusted_macro_recall": macro_recall(labels, base, c),
        "unadjusted_macro_recall_common": macro_recall(labels, base, c, min_support=COMMON_CLASS_MIN_SUPPORT),
        "exponent_median": float(np.median(chosen)),
        "exponent_p25": float(np.percentile(chosen, 25)),
        "exponent_p75": float(np.percentile(chosen, 75)),
    }
    for i, name in enumerate(("accuracy", "macro_recall", "macro_recall_common", "ece")):
        out[f"out_of_fold_{name}"] = float(spread[:, i].mean())
        out[f"out_of_fold_{name}_sd"] = float(spread[:, i].std())
    return out
