"""What bf16 autocast does to FERMam's accuracy: FER+ val and realfaces-dev, float32 against bf16.

`--dtype auto` picks bf16 on CPUs that run it natively (AVX512-BF16, AMX) and on CUDA; the
issue's limit is 0.3 accuracy points. On a CPU without native bf16, oneDNN's bf16 fallback runs
FERMam at ~0.4 faces/s, so by default the bf16 arm runs *emulated* (model/bf16_emulation.py):
the numbers of bf16 autocast (operands rounded to bf16, products accumulated in float32, outputs
rounded to bf16, every other op in bf16 as autocast leaves it) at float32's speed. `--native`
runs real bf16 autocast instead (on a CPU with native bf16 it is the faster path anyway).

    python bench/bf16_accuracy.py                       # all 3,199 val faces and 585 photos
    python bench/bf16_accuracy.py --faces 256 --photos-limit 50 --native
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine import cpu_model  # noqa: E402  (bench/machine.py, beside this script)

from model.bf16_emulation import emulated_bf16, with_emulated_bf16  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from model.data import load_dataset  # noqa: E402
from model.device import cpu_has_native_bf16  # noqa: E402
from model.evaluate import compute_report, predict_logits  # noqa: E402
from model.scoring import class_scores  # noqa: E402
from model.weights import default_weights_path  # noqa: E402

DATA = REPO / ".." / "shared" / "data"


def val_arm(
    model: torch.nn.Module, data, *, bf16: bool, native: bool, batch: int
) -> tuple[np.ndarray, float]:
    """FER+ val probabilities (N, C) in the data's class order, and the seconds they took."""
    order = [model.config.class_names.index(name) for name in data.class_names]
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if bf16 and not native:
            with emulated_bf16() as mode:
                logits = predict_logits(model, data.images, model.config.contract, batch_size=batch)
            if mode.emulated_calls == 0:
                raise RuntimeError("the emulation saw no convolution: it measured float32")
        else:
            logits = predict_logits(model, data.images, model.config.contract, batch_size=batch)
    probs = class_scores(logits, model.config)[:, order].numpy()
    return probs, time.perf_counter() - start


def photos_arm(folder: Path, *, bf16: bool, native: bool, limit: int | None) -> tuple[dict, float]:
    """The whole engine (dlib, alignment, FERMam) over realfaces-dev, scored by its README."""
    from service.commands.photo_eval import evaluate_photos
    from service.engine.pipeline import Engine
    from service.settings import Settings

    engine = Engine(Settings(dtype="bfloat16" if bf16 else "float32"))
    if bf16 and not native:
        # The engine calls the model inside its bf16 autocast on the classify worker thread.
        engine.model.forward = with_emulated_bf16(engine.model.forward)
    start = time.perf_counter()
    result = evaluate_photos(engine, folder, limit=limit)
    if bf16 and not native and engine.model.forward.emulated_calls == 0:
        raise RuntimeError("the engine never ran the emulated forward: it measured float32")
    return result.to_dict() | {"predictions": result.predictions}, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--val", type=Path, default=DATA / "ferplus" / "val.npz")
    parser.add_argument("--photos", type=Path, default=DATA / "realfaces-dev")
    parser.add_argument("--faces", type=int, help="the first N val faces (default: all)")
    parser.add_argument("--photos-limit", type=int, help="the first N photos (default: all)")
    parser.add_argument("--skip-photos", action="store_true")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--native", action="store_true", help="real bf16 autocast, not the emulation")
    parser.add_argument("--max-drop", type=float, default=0.3, help="the limit, in accuracy points")
    parser.add_argument("--json", type=Path, help="write every figure here too")
    args = parser.parse_args(argv)

    mode = "native bf16 autocast" if args.native else "emulated bf16 (model/bf16_emulation.py)"
    print(
        f"machine: {cpu_model()}, {torch.get_num_threads()} torch threads, native bf16: "
        f"{cpu_has_native_bf16()}; torch {torch.__version__}; bf16 arm: {mode}"
    )
    model, _ = load_checkpoint(default_weights_path(), map_location="cpu")
    model.eval()
    data = load_dataset(args.val)
    if args.faces:
        data = data.subset(np.arange(min(args.faces, len(data))))
    figures: dict = {"machine": cpu_model(), "bf16": mode}

    fp32, t32 = val_arm(model, data, bf16=False, native=args.native, batch=args.batch)
    bf16, t16 = val_arm(model, data, bf16=True, native=args.native, batch=args.batch)
    ok = True
    reports = {}
    for name, probs in (("float32", fp32), ("bf16", bf16)):
        reports[name] = compute_report(data.labels, probs.argmax(1), data.class_names, data.exact_dup)
    drop = 100 * (reports["float32"].accuracy - reports["bf16"].accuracy)
    agree = float((fp32.argmax(1) == bf16.argmax(1)).mean())
    max_diff = float(np.abs(fp32 - bf16).max())
    ok &= abs(drop) <= args.max_drop
    print(f"\nFER+ val, {len(data)} faces (float32 {t32:.0f} s, bf16 {t16:.0f} s)")
    print(
        f"  accuracy float32 {100 * reports['float32'].accuracy:.2f}%  bf16 "
        f"{100 * reports['bf16'].accuracy:.2f}%  ({-drop:+.2f} points; limit {args.max_drop})"
    )
    print(f"  macro F1 float32 {reports['float32'].macro_f1:.4f}  bf16 {reports['bf16'].macro_f1:.4f}")
    print(f"  top-1 agreement {100 * agree:.2f}%  max probability difference {max_diff:.4f}")
    figures["ferplus_val"] = {
        "faces": len(data),
        "float32": reports["float32"].to_dict(),
        "bf16": reports["bf16"].to_dict(),
        "agreement": agree,
        "max_prob_diff": max_diff,
        "seconds": {"float32": t32, "bf16": t16},
    }

    if not args.skip_photos:
        p32, s32 = photos_arm(args.photos, bf16=False, native=args.native, limit=args.photos_limit)
        p16, s16 = photos_arm(args.photos, bf16=True, native=args.native, limit=args.photos_limit)
        same = np.mean(
            [
                a["prediction"] == b["prediction"]
                for a, b in zip(p32["predictions"], p16["predictions"], strict=True)
            ]
        )
        pdrop = 100 * (p32["accuracy"] - p16["accuracy"])
        ok &= abs(pdrop) <= args.max_drop
        print(f"\nrealfaces-dev, {p32['n']} photos (float32 {s32:.0f} s, bf16 {s16:.0f} s)")
        for key in ("accuracy", "macro_recall", "face_found_rate"):
            print(f"  {key:16s} float32 {p32[key]:.4f}  bf16 {p16[key]:.4f}")
        print(
            f"  accuracy {-pdrop:+.2f} points (limit {args.max_drop}); same prediction on "
            f"{100 * same:.1f}% of photos"
        )
        figures["realfaces_dev"] = {
            "float32": {k: v for k, v in p32.items() if k != "predictions"},
            "bf16": {k: v for k, v in p16.items() if k != "predictions"},
            "same_prediction": float(same),
            "seconds": {"float32": s32, "bf16": s16},
        }
    print(f"\nwithin {args.max_drop} points everywhere: {'yes' if ok else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=float))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
