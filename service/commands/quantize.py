"""`fermam quantize`: an int8 OpenVINO file of a checkpoint, for `cpu_runtime=openvino-int8`.

Post-training quantisation needs calibration faces (the activations' ranges come from them), and
no dataset ships with the package, so the int8 file is made once by the operator, here, from a
labelled split (FER+ train for the shipped model) and served with
`fermam serve --cpu-runtime openvino-int8 --cpu-int8-model FILE`. The file records the sha256 of
the weights it came from; the engine refuses it for any other weights. With --check, the new file
and the float32 reference are scored on a held-out split, so the operator sees what int8 costs
before serving it (docs/benchmarks.md has the shipped model's figures).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported when quantising, so `fermam quantize --help` stays fast
    import torch

    from model.config import FERMamConfig

DEFAULT_FACES = 300  # NNCF's default subset size: ranges settle well before it


def build_parser() -> argparse.ArgumentParser:
    from model.data import SPEC_HELP

    parser = argparse.ArgumentParser(prog="fermam quantize", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help=f"calibration split (e.g. FER+ train): {SPEC_HELP}")
    parser.add_argument("--out", type=Path, required=True, help="the int8 IR to write (FILE.xml + FILE.bin)")
    parser.add_argument("--weights", type=Path, help="checkpoint (default: the shipped model)")
    parser.add_argument("--faces", type=int, default=DEFAULT_FACES, help="calibration faces, drawn at random")
    parser.add_argument("--seed", type=int, default=0, help="which faces are drawn")
    parser.add_argument("--check", metavar="SPEC", help="held-out split to score float32 and int8 on")
    parser.add_argument("--check-faces", type=int, default=1024, help="first N faces of --check")
    parser.add_argument("--threads", type=int, default=0, help="inference threads for --check (0: all)")
    return parser


def _score(
    run: Callable[[torch.Tensor], torch.Tensor],
    faces: torch.Tensor,
    labels: torch.Tensor,
    order: list[int],
    config: FERMamConfig,
) -> tuple[float, torch.Tensor]:
    """Accuracy and top-1 of `run` on faces, decided by the checkpoint's scoring rule as the
    service decides (columns reordered to the split's class order)."""
    import torch

    from model.scoring import adjusted_logits

    logits = torch.cat([run(faces[i : i + 32]) for i in range(0, len(faces), 32)])
    top1 = adjusted_logits(logits, config)[:, order].argmax(1)
    return float((top1 == labels).float().mean()), top1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.faces < 1 or args.check_faces < 1:
        print("fermam quantize: --faces and --check-faces must be >= 1", file=sys.stderr)
        return 2
    if args.out.suffix != ".xml":
        print("fermam quantize: --out must name an OpenVINO IR file ending in .xml", file=sys.stderr)
        return 2
    import numpy as np
    import torch

    from model.checkpoint import load_checkpoint
    from model.data import load_dataset, to_model_input
    from model.weights import default_weights_path
    from service.engine import cpu_runtime as rt
    from service.engine.pipeline import file_sha256

    weights = args.weights or default_weights_path()
    model, _ = load_checkpoint(weights, map_location="cpu")
    model.eval()
    contract = model.config.contract
    split = load_dataset(args.data)
    rng = np.random.default_rng(args.seed)
    count = min(args.faces, len(split.images))
    chosen = np.sort(rng.choice(len(split.images), count, replace=False))
    calibration = to_model_input(split.images[chosen], contract)
    sha = file_sha256(weights)
    started = time.perf_counter()
    rt.quantize_openvino_int8(
        model,
        calibration,
        args.out,
        weights_sha256=sha,
        description=f"{count} faces of {args.data} (seed {args.seed})",
    )
    print(
        f"wrote {args.out} (+ .bin) from {weights.name} ({sha[:16]}), {count} calibration faces, "
        f"{time.perf_counter() - started:.0f} s"
    )
    if args.check:
        if args.threads:
            torch.set_num_threads(args.threads)
        held = load_dataset(args.check)
        faces = to_model_input(held.images[: args.check_faces], contract)
        labels = torch.from_numpy(held.labels[: args.check_faces])
        order = [list(model.config.class_names).index(n) for n in held.class_names]
        ref_acc, ref_top1 = _score(rt.torch_classifier(model), faces, labels, order, model.config)
        int8 = rt.openvino_file_classifier(rt.read_int8_model(args.out, sha), args.threads)
        acc, top1 = _score(int8, faces, labels, order, model.config)
        agree = float((top1 == ref_top1).float().mean())
        print(
            f"{args.check} ({len(faces)} faces): float32 {100 * ref_acc:.2f}%, int8 {100 * acc:.2f}% "
            f"({100 * (acc - ref_acc):+.2f} points), top-1 agreement {100 * agree:.1f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
