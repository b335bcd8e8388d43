"""`fermam eval`: how good a set of weights is on a labelled split.

Reports accuracy, macro-F1, per-class recall and precision, the confusion matrix (optionally as a
PNG), and accuracy without rows whose pixels also occur in another split (FER2013 has such
duplicates, and they flatter a score). Without --weights it judges the shipped model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.config import InputContract
from model.data import SPEC_HELP, FaceArrays, load_dataset, to_model_input
from model.device import resolve_device, resolve_dtype
from model.scoring import adjusted_logits

DEFAULT_BATCH_SIZE = 256
# Macro recall is also given over the classes with at least this many labelled rows: on a small
# set (realfaces-dev has 5-7 photos of disgust, fear and contempt) one photo of a tiny class moves
# the all-class mean by 2-3 points and hides what the large classes do.
COMMON_CLASS_MIN_SUPPORT = 20


@dataclass(frozen=True, eq=False)
class EvalReport:
    """Scores of one model on one split; recall/precision are None where undefined (no rows / no
    predictions of that class)."""

    class_names: tuple[str, ...]
    confusion: np.ndarray  # (C, C) int64 counts, rows = true class, columns = predicted class
    accuracy: float
    macro_f1: float
    per_class_recall: dict[str, float | None]
    per_class_precision: dict[str, float | None]
    per_class_f1: dict[str, float | None]
    n: int
    accuracy_dedup: float | None = None
    n_dedup: int | None = None

    @property
    def support(self) -> dict[str, int]:
        return {name: int(c) for name, c in zip(self.class_names, self.confusion.sum(axis=1), strict=True)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the shape `fermam eval --json` prints)."""
        return {
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "per_class_recall": self.per_class_recall,
            "per_class_precision": self.per_class_precision,
            "per_class_f1": self.per_class_f1,
            "support": self.support,
            "accuracy_dedup": self.accuracy_dedup,
            "n": self.n,
            "n_dedup": self.n_dedup,
            "confusion": self.confusion.tolist(),
            "classes": list(self.class_names),
        }


def recall_per_class(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Recall of each class, (C,) float64, NaN where a class has no rows; a prediction outside
    0..C-1 (a photo without a face) is simply wrong."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    rows = [predictions[labels == k] for k in range(num_classes)]
    return np.array([(row == k).mean() if len(row) else np.nan for k, row in enumerate(rows)])


def macro_recall(
    labels: np.ndarray, predictions: np.ndarray, num_classes: int, *, min_support: int = 1
) -> float:
    """Mean recall over the classes with at least `min_support` rows (NaN if there are none)."""
    recall = recall_per_class(labels, predictions, num_classes)
    support = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)[:num_classes]
    kept = recall[support >= max(min_support, 1)]
    return float(kept.mean()) if len(kept) else math.nan


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def compute_report(
    labels: np.ndarray,
    predictions: np.ndarray,
    class_names: tuple[str, ...],
    exact_dup: np.ndarray | None = None,
) -> EvalReport:
    """Metrics from true and predicted class indices.

    Macro-F1 averages F1 = 2TP / (2TP + FP + FN) over the classes that occur among the labels or
    the predictions: a class absent from both says nothing about the model (scikit-learn's default).
    """
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    if labels.shape != predictions.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} must be equal (N,)")
    c = len(class_names)
    confusion = np.bincount(labels * c + predictions, minlength=c * c).reshape(c, c).astype(np.int64)
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    recall = {name: _ratio(tp[i], support[i]) for i, name in enumerate(class_names)}
    precision = {name: _ratio(tp[i], predicted[i]) for i, name in enumerate(class_names)}
    f1 = {name: _ratio(2 * tp[i], support[i] + predicted[i]) for i, name in enumerate(class_names)}
    present = [v for v in f1.values() if v is not None]
    n = len(labels)
    correct = labels == predictions
    accuracy_dedup = n_dedup = None
    if exact_dup is not None:
        kept = ~np.asarray(exact_dup, dtype=np.bool_)
        n_dedup = int(kept.sum())
        accuracy_dedup = _ratio(correct[kept].sum(), n_dedup)
    return EvalReport(
        class_names=tuple(class_names),
        confusion=confusion,
        accuracy=float(correct.mean()) if n else math.nan,
        macro_f1=float(np.mean(present)) if present else math.nan,
        per_class_recall=recall,
        per_class_precision=precision,
        per_class_f1=f1,
        n=n,
        accuracy_dedup=accuracy_dedup,
        n_dedup=n_dedup,
    )


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    contract: InputContract,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Logits (N, C) float32 on the CPU for uint8 face crops, preprocessed per `contract`.

    Runs on `device` (default: where the model's parameters are) in eval mode, restoring the
    model's train/eval state afterwards so the trainer can call it between epochs.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.to(device).eval()
    try:
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            batch = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
            x = to_model_input(batch.to(device, non_blocking=True), contract)
            chunks.append(model(x).float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros((0, 0))
    finally:
        model.train(was_training)


def _column_order(model_classes: tuple[str, ...], data_classes: tuple[str, ...]) -> list[int]:
    """Logit columns in the data's class order; the two class lists must be the same set."""
    if sorted(model_classes) != sorted(data_classes):
        raise ValueError(f"model classes {model_classes} do not match the data's {data_classes}")
    return [model_classes.index(name) for name in data_classes]


def evaluate(
    model: nn.Module,
    data: FaceArrays,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str | None = None,
    contract: InputContract | None = None,
) -> EvalReport:
    """Score `model` (a FERMam, or anything with `.config.contract` and `.config.class_names`) on `data`.

    The input contract comes from the model's config unless given, so eval preprocesses exactly as
    the checkpoint was trained; logits are matched to the data's classes by name. The decision is
    the checkpoint's scoring rule (model/scoring.py: its logit adjustment), as the service makes it.
    """
    config = model.config
    contract = contract or config.contract
    order = _column_order(tuple(config.class_names), data.class_names)
    logits = predict_logits(model, data.images, contract, batch_size=batch_size, device=device)
    if not len(data):
        return compute_report(data.labels, np.zeros(0, np.int64), data.class_names, data.exact_dup)
    predictions = adjusted_logits(logits, config)[:, order].argmax(dim=1).numpy()
    return compute_report(data.labels, predictions, data.class_names, data.exact_dup)


def save_confusion_png(report: EvalReport, path: str | Path, *, title: str | None = None) -> Path:
    """Confusion matrix as a PNG: cells coloured by row share (recall), annotated with counts."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, no display needed

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = report.confusion
    rows = counts.sum(axis=1, keepdims=True)
    shares = counts / np.where(rows > 0, rows, 1)
    c = len(report.class_names)
    side = 1.6 + 0.75 * c
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    for i in range(c):
        for j in range(c):
            ax.text(
                j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                color="white" if shares[i, j] > 0.5 else "black",
            )  # fmt: skip
    ax.set_xticks(range(c), report.class_names, rotation=45, ha="right")
    ax.set_yticks(range(c), report.class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"accuracy {report.accuracy:.4f}, macro-F1 {report.macro_f1:.4f} (n={report.n})")
    fig.savefig(path, dpi=120)
    return path


def _fmt(value: float | None) -> str:
    return "  -   " if value is None else f"{value:.4f}"


def format_report(report: EvalReport) -> str:
    """Human-readable tables for the terminal."""
    lines = [f"accuracy         {report.accuracy:.4f}  (n={report.n})"]
    if report.accuracy_dedup is not None:
        lines.append(
            f"accuracy (dedup) {_fmt(report.accuracy_dedup)}  (n={report.n_dedup}, rows duplicated "
            "in another split left out)"
        )
    lines.append(f"macro-F1         {report.macro_f1:.4f}")
    width = max(len(n) for n in report.class_names)
    lines += ["", f"{'class':<{width}}  recall  precision  f1      support"]
    for name, support in report.support.items():
        recall, precision = report.per_class_recall[name], report.per_class_precision[name]
        f1 = report.per_class_f1[name]
        lines.append(f"{name:<{width}}  {_fmt(recall)}  {_fmt(precision)}     {_fmt(f1)}  {support}")
    lines += ["", "confusion (rows: true, columns: predicted)"]
    cell = max(width, max(len(str(v)) for v in report.confusion.flat)) + 1
    lines.append(" " * (width + 1) + "".join(f"{n:>{cell}}" for n in report.class_names))
    for name, row in zip(report.class_names, report.confusion, strict=True):
        lines.append(f"{name:<{width}} " + "".join(f"{v:>{cell}}" for v in row))
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fermam eval", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help=f"labelled split: {SPEC_HELP}")
    parser.add_argument("--weights", type=Path, help="checkpoint (default: the shipped model)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--confusion", type=Path, metavar="PNG", help="write the confusion matrix here")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="compute dtype (autocast, as the service runs it); auto is the service's choice",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    weights = args.weights
    if weights is None:
        from model.weights import default_weights_path

        weights = default_weights_path()
    weights = Path(weights)
    if not weights.is_file():
        print(f"fermam eval: no checkpoint at {weights}", file=sys.stderr)
        return 1
    from model.checkpoint import load_checkpoint

    device = resolve_device(args.device)
    data = load_dataset(args.data)
    model, _metadata = load_checkpoint(weights, map_location=device)
    dtype = resolve_dtype(args.dtype, device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        report = evaluate(model, data, batch_size=args.batch_size, device=device)
    png = None
    if args.confusion is not None:
        png = save_confusion_png(report, args.confusion)
    if args.json:
        summary = report.to_dict() | {
            "weights": str(weights),
            "data": data.source,
            "dtype": str(dtype).removeprefix("torch."),
            "confusion_png": None if png is None else str(png),
        }
        print(json.dumps(_json_safe(summary)))
    else:
        print(f"weights  {weights}\ndata     {data.source}\n")
        print(format_report(report))
        if png is not None:
            print(f"\nconfusion matrix written to {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
