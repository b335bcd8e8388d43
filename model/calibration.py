"""Temperature scaling (Guo et al., 2017) and the expected calibration error.

One scalar T divides the logits before the softmax: it changes how confident the scores are,
never which class wins, so accuracy is untouched. T is fitted on validation logits by minimising
the negative log-likelihood and travels in the checkpoint's config (`FERMamConfig.temperature`),
so every caller of the weights gets the same calibrated probabilities.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ECE_BINS = 15


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
