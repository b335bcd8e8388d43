"""`fermam calibrate`: fit the scoring rule (logit adjustment and temperature) on labelled real
photos through the whole pipeline, report it before and after there and on a validation split
(never fitted on), cross-validate the fit over the photos, and write a checkpoint that carries it.

The rule is fitted on photos because that is where the service is used and where the training
labels' lean towards neutral costs recall (docs/model-card.md); the validation split shows what
the same rule does to faces like the training ones. It lives in service/ because the photos run
through the service's engine; the fit itself is model.calibration and needs nothing of the service.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import numpy as np

if TYPE_CHECKING:  # torch-backed modules load when a fit runs, so `--help` stays fast
    from model.config import FERMamConfig


def photo_logits(
    weights: Path, photos: Path, settings: dict[str, Any], limit: int | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The network's logits for the largest face of every photo as the engine computed them (NaN
    rows where no face was found), the labels in the model's class order, and how they were run."""
    from model.scoring import raw_logits_from_scores
    from service.commands.photo_eval import evaluate_photos
    from service.engine.pipeline import Engine
    from service.settings import Settings

    engine = Engine(Settings(weights=weights, **settings))
    result = evaluate_photos(engine, photos, limit=limit)
    classes = list(engine.class_names)
    logits = np.full((len(result.predictions), len(classes)), np.nan)
    for row, p in enumerate(result.predictions):
        if p["prediction"] is not None:
            scores = np.array([[p["scores"][name] for name in classes]])
            # The engine's scores carry the checkpoint's rule; undo it to refit from scratch.
            logits[row] = raw_logits_from_scores(scores, engine.config)[0]
    labels = np.array([classes.index(p["label"]) for p in result.predictions], dtype=np.int64)
    run = {"engine_dtype": engine.info.dtype, "engine_device": engine.info.device}
    return logits, labels, run


def rule_figures(
    logits: np.ndarray, labels: np.ndarray, config: FERMamConfig
) -> tuple[dict[str, Any], np.ndarray]:
    """What `config`'s scoring rule gives on (logits, labels): accuracy, macro recalls and per-class
    recall over every row (NaN rows are wrong), ECE and what a score of 0.9 means over the rows
    with logits; and those rows' probabilities."""
    import torch

    from model.calibration import accuracy_near, expected_calibration_error
    from model.evaluate import COMMON_CLASS_MIN_SUPPORT, macro_recall, recall_per_class
    from model.scoring import class_scores

    found = ~np.isnan(logits).any(axis=1)
    probs = class_scores(torch.from_numpy(logits[found]), config).double().numpy()
    decided = np.full(len(labels), -1)
    decided[found] = probs.argmax(axis=1)
    c = config.num_classes
    recall = recall_per_class(labels, decided, c)
    figures = {
        "accuracy": float((decided == labels).mean()),
        "macro_recall": macro_recall(labels, decided, c),
        "macro_recall_common": macro_recall(labels, decided, c, min_support=COMMON_CLASS_MIN_SUPPORT),
        "per_class_recall": {
            name: None if np.isnan(r) else float(r)
            for name, r in zip(config.class_names, recall, strict=True)
        },
        "ece": expected_calibration_error(probs, labels[found]),
        "accuracy_at_score_0.9": accuracy_near(probs, labels[found], 0.9),
    }
    return figures, probs


def _training_prior(spec: str, class_names: tuple[str, ...]) -> tuple[float, ...]:
    """The label shares of a training split, in the model's class order."""
    from model.calibration import class_prior
    from model.data import load_dataset

    data = load_dataset(spec)
    shares = dict(zip(data.class_names, class_prior(data.labels, len(data.class_names)), strict=True))
    missing = sorted(set(class_names) - set(shares))
    if missing:
        raise ValueError(f"{spec} has no labels for the model's classes {missing}")
    return tuple(shares[name] for name in class_names)


def build_parser() -> argparse.ArgumentParser:
    from model.data import SPEC_HELP
    from service.settings import Settings

    parser = argparse.ArgumentParser(prog="fermam calibrate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--photos",
        type=Path,
        required=True,
        metavar="DIR",
        help="labelled photos to fit on (DIR/manifest.csv)",
    )
    parser.add_argument(
        "--prior-from",
        metavar="SPEC",
        help=f"the training split whose label shares are the prior (default: the checkpoint's): {SPEC_HELP}",
    )
    parser.add_argument(
        "--data", metavar="SPEC", help="a validation split to report the rule on (not fitted on)"
    )
    parser.add_argument("--exponent", type=float, help="use this prior exponent instead of searching for one")
    parser.add_argument("--weights", type=Path, help="checkpoint (default: the shipped model)")
    parser.add_argument("--out", type=Path, help="write the checkpoint with the fitted rule here")
    parser.add_argument("--version", help="model version written into --out's metadata")
    parser.add_argument("--reliability", type=Path, metavar="PNG", help="write a reliability diagram")
    parser.add_argument("--limit", type=int, help="the first N photos of the manifest")
    parser.add_argument(
        "--cv-repeats", type=int, default=20, help="repeats of 5-fold cross-validation (0: none)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--dtype",
        choices=get_args(Settings.model_fields["dtype"].annotation),
        help="the engine's compute dtype for the photos (default: the service's)",
    )
    parser.add_argument("--batch-size", type=int, default=128, help="--data only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from model.calibration import cross_validate_rule, fit_scoring_rule, save_reliability_png
    from model.checkpoint import load_checkpoint, provenance_of, save_checkpoint
    from model.weights import default_weights_path

    weights = Path(args.weights or default_weights_path())
    if not weights.is_file():
        print(f"fermam calibrate: no checkpoint at {weights}", file=sys.stderr)
        return 1
    if not (args.photos / "manifest.csv").is_file():
        print(f"fermam calibrate: no manifest.csv in {args.photos}", file=sys.stderr)
        return 1
    model, metadata = load_checkpoint(weights, map_location="cpu")
    before = model.config
    if args.prior_from:
        prior = _training_prior(args.prior_from, tuple(before.class_names))
    elif before.class_prior is not None:
        prior = before.class_prior
    else:
        print("fermam calibrate: the checkpoint has no class prior; pass --prior-from TRAIN", file=sys.stderr)
        return 2
    log_prior = np.log(np.asarray(prior))

    settings = {"device": args.device} | ({"dtype": args.dtype} if args.dtype else {})
    logits, labels, run = photo_logits(weights, args.photos, settings, args.limit)
    fit = fit_scoring_rule(logits, labels, log_prior, exponent=args.exponent)
    after = dataclasses.replace(
        before, temperature=fit.temperature, class_prior=tuple(prior), prior_exponent=fit.prior_exponent
    )
    photos_before, probs_before = rule_figures(logits, labels, before)
    photos_after, probs_after = rule_figures(logits, labels, after)
    found = ~np.isnan(logits).any(axis=1)
    summary: dict[str, Any] = {
        "photos": str(args.photos),
        "photos_n": len(labels),
        "photos_with_face": int(found.sum()),
        **run,
        "prior": dict(zip(before.class_names, prior, strict=True)),
        "prior_from": args.prior_from or "the checkpoint",
        "prior_exponent": fit.prior_exponent,
        "exponent_searched": args.exponent is None,
        "temperature": fit.temperature,
        "rule_before": {"temperature": before.temperature, "prior_exponent": before.prior_exponent},
        "photos_before": photos_before,
        "photos_after": photos_after,
        # What shipping needs (the rule): more macro recall, no less accuracy.
        "raises_macro_recall": photos_after["macro_recall"] > photos_before["macro_recall"],
        "keeps_accuracy": photos_after["accuracy"] >= photos_before["accuracy"],
        "scan": fit.scan.rows(),
    }
    print(json.dumps({k: summary[k] for k in ("prior_exponent", "temperature")}), file=sys.stderr, flush=True)
    if args.cv_repeats > 0:
        summary["cross_validation"] = cross_validate_rule(logits, labels, log_prior, repeats=args.cv_repeats)
    curves = {
        f"photos, before (T={before.temperature:.2f}, a={before.prior_exponent:.2f})": (
            probs_before,
            labels[found],
        ),
        f"photos, after (T={after.temperature:.2f}, a={after.prior_exponent:.2f})": (
            probs_after,
            labels[found],
        ),
    }
    if args.data:
        from model.data import load_dataset
        from model.device import resolve_device
        from model.evaluate import _column_order, predict_logits

        data = load_dataset(args.data)
        device = resolve_device(args.device)
        model.to(device)
        raw = predict_logits(model, data.images, before.contract, batch_size=args.batch_size, device=device)
        # Labels into the model's class order, where the rule's prior lives.
        to_model = np.asarray(_column_order(tuple(before.class_names), data.class_names))
        val_labels = to_model[data.labels]
        val_logits = raw.double().numpy()
        summary["data"] = data.source
        summary["data_before"], val_before = rule_figures(val_logits, val_labels, before)
        summary["data_after"], val_after = rule_figures(val_logits, val_labels, after)
        curves |= {"val, before": (val_before, val_labels), "val, after": (val_after, val_labels)}
        model.cpu()
    if args.reliability is not None:
        save_reliability_png(curves, args.reliability)
        summary["reliability_png"] = str(args.reliability)
    if args.out is not None:
        model.config = after
        kept = provenance_of(metadata) | {
            "calibration": (
                f"scoring rule fitted on {args.photos.name} ({len(labels)} photos through the engine, "
                f"{run['engine_dtype']}): prior exponent {fit.prior_exponent:.2f}, temperature "
                f"{fit.temperature:.4f}; prior = label shares of {args.prior_from or 'the checkpoint'}"
            )
        }
        if args.version:
            kept["version"] = args.version
        save_checkpoint(args.out, model, metadata=kept, dtype=torch.float16)
        summary["out"] = str(args.out)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
