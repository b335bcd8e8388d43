"""`fermam calibrate`: fit the softmax temperature on a validation split, report the expected
calibration error before and after (also on labelled photos through the whole pipeline, with
--photos), draw a reliability diagram, and write a checkpoint that carries the temperature.

It lives in service/ because --photos runs the service's engine; the fit itself is
model.calibration and needs nothing of the service.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _photo_probabilities(
    weights: Path, photos: Path, device: str
) -> tuple[np.ndarray, np.ndarray, float, dict[str, Any]]:
    """The engine's probabilities for the largest face of every photo with a face, with labels,
    the temperature those probabilities were made with, and the photos' whole-pipeline scores."""
    from service.commands.photo_eval import evaluate_photos
    from service.engine.pipeline import Engine
    from service.settings import Settings

    engine = Engine(Settings(weights=weights, device=device))
    result = evaluate_photos(engine, photos)
    classes = list(engine.class_names)
    with_face = [p for p in result.predictions if p["prediction"] is not None]
    probs = np.array([[p["scores"][name] for name in classes] for p in with_face], dtype=np.float64)
    labels = np.array([classes.index(p["label"]) for p in with_face], dtype=np.int64)
    scores = {
        "photos_accuracy": result.report.accuracy,
        "photos_macro_recall": result.macro_recall,
        "photos_face_found_rate": result.face_found_rate,
        "photos_per_class_recall": result.report.per_class_recall,
    }
    return probs, labels, float(engine.config.temperature), scores


def build_parser() -> argparse.ArgumentParser:
    from model.data import SPEC_HELP

    parser = argparse.ArgumentParser(prog="fermam calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help=f"validation split to fit on: {SPEC_HELP}")
    parser.add_argument("--weights", type=Path, help="checkpoint (default: the shipped model)")
    parser.add_argument("--out", type=Path, help="write the calibrated checkpoint here")
    parser.add_argument("--version", help="model version written into --out's metadata")
    parser.add_argument("--photos", type=Path, metavar="DIR", help="also report ECE on labelled photos")
    parser.add_argument("--reliability", type=Path, metavar="PNG", help="write a reliability diagram")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from model.calibration import (
        accuracy_near,
        expected_calibration_error,
        fit_temperature,
        save_reliability_png,
        softmax_t,
    )
    from model.checkpoint import load_checkpoint, provenance_of, save_checkpoint
    from model.data import load_dataset
    from model.device import resolve_device
    from model.evaluate import _column_order, predict_logits
    from model.weights import default_weights_path

    weights = Path(args.weights or default_weights_path())
    if not weights.is_file():
        print(f"fermam calibrate: no checkpoint at {weights}", file=sys.stderr)
        return 1
    device = resolve_device(args.device)
    model, metadata = load_checkpoint(weights, map_location=device)
    data = load_dataset(args.data)
    order = _column_order(tuple(model.config.class_names), data.class_names)
    logits = predict_logits(
        model, data.images, model.config.contract, batch_size=args.batch_size, device=device
    )
    logits = logits[:, order].numpy()
    temperature = fit_temperature(logits, data.labels)
    before, after = softmax_t(logits, 1.0), softmax_t(logits, temperature)
    summary: dict[str, Any] = {
        "temperature": temperature,
        "data": data.source,
        "accuracy": float((logits.argmax(1) == data.labels).mean()),
        "ece_before": expected_calibration_error(before, data.labels),
        "ece_after": expected_calibration_error(after, data.labels),
        "accuracy_at_score_0.9_after": accuracy_near(after, data.labels, 0.9),
    }
    print(json.dumps(summary), file=sys.stderr, flush=True)  # the fit's figures before the slower photo pass
    curves = {"val, T=1": (before, data.labels), f"val, T={temperature:.2f}": (after, data.labels)}
    if args.photos is not None:
        probs, labels, used_t, photo_scores = _photo_probabilities(weights, args.photos, str(device))
        summary |= photo_scores
        # The engine's probabilities are softmax(logits / used_t): their logs are those logits
        # over used_t up to a constant per row, which the softmax ignores.
        photo_logits = np.log(np.clip(probs, 1e-12, None)) * used_t
        photos_before, photos_after = softmax_t(photo_logits, 1.0), softmax_t(photo_logits, temperature)
        summary |= {
            "photos": str(args.photos),
            "photos_with_face": len(labels),
            "photos_ece_before": expected_calibration_error(photos_before, labels),
            "photos_ece_after": expected_calibration_error(photos_after, labels),
            "photos_accuracy_at_score_0.9_after": accuracy_near(photos_after, labels, 0.9),
        }
        curves |= {
            "photos, T=1": (photos_before, labels),
            f"photos, T={temperature:.2f}": (photos_after, labels),
        }
    if args.reliability is not None:
        save_reliability_png(curves, args.reliability)
        summary["reliability_png"] = str(args.reliability)
    if args.out is not None:
        model.config = dataclasses.replace(model.config, temperature=temperature)
        kept = provenance_of(metadata) | {"calibration": f"temperature fitted on {Path(data.source).name}"}
        if args.version:
            kept["version"] = args.version
        save_checkpoint(args.out, model.cpu(), metadata=kept, dtype=torch.float16)
        summary["out"] = str(args.out)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
