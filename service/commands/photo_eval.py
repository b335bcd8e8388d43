"""`fermam eval`: the network alone on an npz split (model.evaluate), or with `--photos DIR` the
whole pipeline on labelled real photos, scored as realfaces-dev's README prescribes.

The photo path drives the service's own `Engine` (decode, face stage, alignment, classifier, the
same batchers), never a copy of its steps, so the figure is what a user of the service gets: one
request per photo, the largest face is the prediction, a photo with no face counts as wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import numpy as np

if TYPE_CHECKING:  # model.evaluate imports torch: loaded when a score is computed, not for --help
    from model.evaluate import EvalReport

NO_FACE = -1  # prediction index of a photo where no face was found


@dataclass(frozen=True, eq=False)
class PhotoReport:
    """A whole-pipeline score: the classification report over every photo (no face = wrong) plus
    the face-found rate and macro recall that the dev set's README asks for, the latter also over
    the classes with enough photos to mean something (`common_classes`)."""

    report: EvalReport
    face_found_rate: float
    macro_recall: float
    predictions: list[dict[str, Any]]
    macro_recall_common: float = float("nan")
    common_classes: tuple[str, ...] = ()
    common_min_photos: int = 0  # model.evaluate.COMMON_CLASS_MIN_SUPPORT

    def to_dict(self) -> dict[str, Any]:
        return self.report.to_dict() | {
            "macro_recall": self.macro_recall,
            "macro_recall_common": None if np.isnan(self.macro_recall_common) else self.macro_recall_common,
            "common_classes": list(self.common_classes),
            "common_class_min_photos": self.common_min_photos,
            "face_found_rate": self.face_found_rate,
        }


def read_manifest(folder: Path) -> list[tuple[str, str]]:
    """(image file name, label) rows of `folder/manifest.csv`; images live in `folder/images/`."""
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"no manifest.csv in {folder}")
    with manifest.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"image", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{manifest} needs the columns image,label")
        return [(row["image"], row["label"].strip()) for row in reader]


async def _score_photos(
    engine: Any, folder: Path, rows: list[tuple[str, str]], concurrency: int
) -> list[dict]:
    from service.engine.pipeline import RequestOptions

    options = RequestOptions(return_landmarks=False)
    limit = asyncio.Semaphore(concurrency)

    async def one(name: str, label: str) -> dict[str, Any]:
        data = (folder / "images" / name).read_bytes()
        async with limit:
            # An offline measurement, not traffic: its own concurrency bounds it, and admission
            # control (sized for serving) would refuse photos on a busy machine.
            result = await engine.infer([data], options, shed=False)
        faces = result.images[0].faces
        # Faces come largest first: the first is the prediction.
        if not faces:
            return {"image": name, "label": label, "prediction": None, "faces": 0}
        return {
            "image": name,
            "label": label,
            "prediction": faces[0].expression,
            "scores": faces[0].scores,
            "faces": len(faces),
        }

    await engine.start()
    try:
        return list(await asyncio.gather(*(one(name, label) for name, label in rows)))
    finally:
        await engine.stop()


def evaluate_photos(
    engine: Any, folder: Path, *, limit: int | None = None, concurrency: int = 4
) -> PhotoReport:
    """Run every labelled photo of `folder` through `engine` (an unstarted `Engine`) and score it."""
    from model.evaluate import COMMON_CLASS_MIN_SUPPORT, EvalReport, compute_report, macro_recall

    rows = read_manifest(folder)[:limit]
    classes = tuple(engine.class_names)
    unknown = sorted({label for _, label in rows} - set(classes))
    if unknown:
        raise ValueError(f"labels {unknown} are not classes of the model {classes}")
    predictions = asyncio.run(_score_photos(engine, folder, rows, concurrency))
    labels = np.array([classes.index(p["label"]) for p in predictions], dtype=np.int64)
    predicted = np.array(
        [NO_FACE if p["prediction"] is None else classes.index(p["prediction"]) for p in predictions],
        dtype=np.int64,
    )
    found = predicted != NO_FACE
    # The confusion matrix holds the photos with a face; accuracy and recall count the others
    # as wrong, as the scoring convention says.
    report = compute_report(labels[found], predicted[found], classes)
    n = len(labels)
    hits = int((predicted == labels).sum())
    recall: dict[str, float | None] = {}
    for k, name in enumerate(classes):
        support = int((labels == k).sum())
        recall[name] = float((predicted[labels == k] == k).mean()) if support else None
    report = EvalReport(
        class_names=classes,
        confusion=report.confusion,
        accuracy=hits / n if n else 0.0,
        macro_f1=report.macro_f1,
        per_class_recall=recall,
        per_class_precision=report.per_class_precision,
        per_class_f1=report.per_class_f1,
        n=n,
    )
    values = [r for name, r in recall.items() if r is not None]
    support = np.bincount(labels, minlength=len(classes))
    return PhotoReport(
        report=report,
        face_found_rate=float(found.mean()) if n else 0.0,
        macro_recall=float(np.mean(values)) if values else 0.0,
        predictions=predictions,
        macro_recall_common=macro_recall(
            labels, predicted, len(classes), min_support=COMMON_CLASS_MIN_SUPPORT
        ),
        common_classes=tuple(
            name for name, count in zip(classes, support, strict=True) if count >= COMMON_CLASS_MIN_SUPPORT
        ),
        common_min_photos=COMMON_CLASS_MIN_SUPPORT,
    )


def build_parser() -> argparse.ArgumentParser:
    from model.data import SPEC_HELP
    from service.settings import Settings

    parser = argparse.ArgumentParser(prog="fermam eval", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help=f"labelled split for the network alone: {SPEC_HELP}")
    source.add_argument(
        "--photos",
        type=Path,
        metavar="DIR",
        help="labelled photos (DIR/manifest.csv, DIR/images/)",
    )
    parser.add_argument("--weights", type=Path, help="checkpoint (default: the shipped model)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--confusion", type=Path, metavar="PNG", help="write the confusion matrix here")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=256, help="--data only")
    parser.add_argument(
        "--dtype",
        choices=get_args(Settings.model_fields["dtype"].annotation),
        help="FERMam's compute dtype (autocast): --data defaults to float32, --photos to the service's",
    )
    parser.add_argument("--limit", type=int, help="--photos only: the first N photos of the manifest")
    parser.add_argument("--predictions", type=Path, metavar="JSONL", help="--photos only: one line per photo")
    parser.add_argument(
        "--face-backend", choices=["dlib", "face-alignment"], help="--photos only (default: the service's)"
    )
    parser.add_argument(
        "--cpu-runtime",
        choices=get_args(Settings.model_fields["cpu_runtime"].annotation),
        help="--photos only: what runs FERMam on the CPU (the service's setting)",
    )
    parser.add_argument(
        "--cpu-int8-model", type=Path, help="--photos only: the file for --cpu-runtime openvino-int8"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.data is not None:
        from model import evaluate

        forwarded = ["--data", args.data, "--device", args.device, "--batch-size", str(args.batch_size)]
        forwarded += ["--weights", str(args.weights)] if args.weights else []
        forwarded += ["--json"] if args.json else []
        forwarded += ["--confusion", str(args.confusion)] if args.confusion else []
        forwarded += ["--dtype", args.dtype] if args.dtype else []
        return evaluate.main(forwarded)
    if not (args.photos / "manifest.csv").is_file():
        print(f"fermam eval: no manifest.csv in {args.photos}", file=sys.stderr)
        return 1
    from model.evaluate import format_report, save_confusion_png
    from service.engine.pipeline import Engine
    from service.settings import Settings

    overrides: dict[str, Any] = {"device": args.device}
    if args.weights:
        overrides["weights"] = args.weights
    if args.face_backend:
        overrides["face_backend"] = args.face_backend
    if args.cpu_runtime:
        overrides["cpu_runtime"] = args.cpu_runtime
    if args.cpu_int8_model:
        overrides["cpu_int8_model"] = args.cpu_int8_model
    if args.dtype:
        overrides["dtype"] = args.dtype
    engine = Engine(Settings(**overrides))
    result = evaluate_photos(engine, args.photos, limit=args.limit)
    if args.predictions:
        with args.predictions.open("w") as handle:
            handle.writelines(json.dumps(p) + "\n" for p in result.predictions)
    png = save_confusion_png(result.report, args.confusion) if args.confusion else None
    if args.json:
        print(json.dumps(result.to_dict() | {"photos": str(args.photos), "model": engine.info.version}))
    else:
        print(f"model    {engine.info.name} {engine.info.version}\nphotos   {args.photos}\n")
        print(f"face found       {result.face_found_rate:.4f}  (no face counts as wrong)")
        print(f"macro recall     {result.macro_recall:.4f}  (all {len(result.report.class_names)} classes)")
        print(
            f"macro recall     {result.macro_recall_common:.4f}  (the {len(result.common_classes)} classes "
            f"with >= {result.common_min_photos} photos: {', '.join(result.common_classes)})"
        )
        print(format_report(result.report))
        if png is not None:
            print(f"\nconfusion matrix written to {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
