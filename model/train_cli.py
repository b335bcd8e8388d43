"""`fermam train`'s command line: argument parsing without torch, so `--help` answers at once;
the stages themselves (model.train) are imported only when one runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from model.recipe import Recipe

# ---------------------------------------------------------------------------------------------
# Command line


def add_common(parser: argparse.ArgumentParser, defaults: Recipe) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder (weights, log.jsonl, last.pt)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="at most this many epochs")
    parser.add_argument(
        "--time-budget",
        dest="time_budget_s",
        type=float,
        default=None,
        help="seconds; the epoch count is fitted to it after each of the first two epochs",
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs)
    parser.add_argument("--ema-decay", type=float, default=defaults.ema_decay)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--epoch-size",
        type=int,
        default=None,
        help="faces per epoch, a fresh random sample each epoch (default: all); validates more often",
    )
    parser.add_argument("--limit", type=int, default=None, help="use only the first N faces (smoke runs)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fermam train", description="pretrain the landmark branch, then train FERMam, from scratch"
    )
    stages = parser.add_subparsers(dest="stage", required=True)

    lm = stages.add_parser("landmarks", help="pretrain the MobileFaceNet landmark branch on pseudo-labels")
    lm.add_argument("--data", required=True, help="training faces (dataset spec, e.g. train.npz)")
    lm.add_argument(
        "--labels", type=Path, required=True, help="pseudo-labels of --data (fermam pseudo-landmarks)"
    )
    lm.add_argument("--val-data", required=True, help="held-out faces")
    lm.add_argument("--val-labels", type=Path, required=True, help="pseudo-labels of --val-data")
    lm.add_argument("--val-limit", type=int, default=None)
    add_common(lm, Recipe(epochs=30, lr=2e-3, weight_decay=1e-4, ema_decay=0.998))

    fm = stages.add_parser("fermam", help="train FERMam with the landmark branch frozen")
    fm.add_argument("--train", required=True, help="training split (dataset spec, e.g. train.npz)")
    fm.add_argument("--val", required=True, help="validation split, picks the best epoch")
    fm.add_argument("--landmark-weights", type=Path, default=None, help="landmarks.safetensors from stage 1")
    fm.add_argument(
        "--template-from",
        type=Path,
        default=None,
        help="pseudo-labels whose mean sets the alignment template",
    )
    fm.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from this FERMam checkpoint instead of random weights",
    )
    fm.add_argument("--model-version", default=None, help="version the service reports (default: data-date)")
    fm.add_argument("--label-smoothing", type=float, default=0.0)
    fm.add_argument(
        "--ir-units",
        type=int,
        nargs=3,
        default=None,
        help="IR-50 units per stage (default 3 4 14; fewer for quick runs)",
    )
    fm.add_argument(
        "--bn-recalibration",
        type=int,
        default=0,
        metavar="FACES",
        help="recompute the averaged model's batch-norm statistics on this many training faces "
        "before each validation (0: keep the averaged statistics)",
    )
    fm.add_argument(
        "--hard-labels", dest="soft_labels", action="store_false", help="ignore vote distributions"
    )
    add_common(fm, Recipe())

    bn = stages.add_parser("recalibrate-bn", help="re-measure a checkpoint's batch-norm statistics")
    bn.add_argument("--weights", type=Path, required=True, help="FERMam checkpoint to start from")
    bn.add_argument("--data", required=True, help="training faces (dataset spec, e.g. train.npz)")
    bn.add_argument("--faces", type=int, default=2048, help="how many training faces to measure on")
    bn.add_argument("--val", default=None, help="validation split: record the new accuracy")
    bn.add_argument("--model-version", default=None, help="version the service reports")
    bn.add_argument("--out", type=Path, required=True, help="where to write the new checkpoint")
    bn.add_argument("--seed", type=int, default=0)
    bn.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from model.train import recalibrate_checkpoint, train_fermam, train_landmarks

    if args.stage == "recalibrate-bn":
        print(json.dumps(recalibrate_checkpoint(args)))
        return 0
    summary = train_landmarks(args) if args.stage == "landmarks" else train_fermam(args)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0
