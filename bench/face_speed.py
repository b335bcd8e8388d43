"""Face-stage speed: ms per 640x480 photo (detection) and per face (68 landmarks), per backend.

The photos are the nine annotated VOC photos from ../shared/data/photos resized to 640x480.
dlib: detect() (HOG + 68 points) per photo at each upsample setting, and the predictor alone per
face. face-alignment: S3FD per photo in batches (FAN skipped by an impossible min_face_size) and
FAN per face in one batch of boxes. Without real weights in --weights-dir the face-alignment
networks get RANDOM weights of the right architecture: timings are real, detections are not.

    python bench/face_speed.py                      # CPU, both backends
    python bench/face_speed.py --device cuda --backend face-alignment --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine import device_name  # noqa: E402  (bench/machine.py, beside this script)

from service.engine.faces import create_face_backend  # noqa: E402
from service.engine.faces.fan_backend import (  # noqa: E402
    FAN_FILE,
    S3FD_FILE,
    FanFaceBackend,
    default_weights_dir,
    write_untrained_weights,
)

PHOTOS = REPO / ".." / "shared" / "data" / "photos"
VOC_PHOTOS = sorted(p.name for p in PHOTOS.glob("20*.jpg"))
FRAME = (640, 480)


def frames() -> list[np.ndarray]:
    return [
        np.asarray(Image.open(PHOTOS / n).convert("RGB").resize(FRAME, Image.BILINEAR)) for n in VOC_PHOTOS
    ]


def timed(fn, repeats: int, sync: bool = False) -> float:
    """Best-of-`repeats` seconds of fn() (after one untimed warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def bench_dlib(images: list[np.ndarray], repeats: int) -> list[dict]:
    rows = []
    device = device_name("cpu")
    for upsample in (0, 1):
        backend = create_face_backend("dlib", upsample=upsample, min_face_size=0)
        found = backend.detect(images)
        faces = sum(len(f) for f in found)
        seconds = timed(lambda b=backend: b.detect(images), repeats)
        boxes = [(i, [f.box for f in fs]) for i, fs in enumerate(found) if fs]
        per_face = timed(
            lambda b=backend, bs=boxes: [b.landmarks_for_boxes(images[i], bx) for i, bx in bs], repeats
        )
        rows.append(
            {
                "backend": "dlib",
                "setting": f"upsample={upsample}",
                "device": device,
                "ms_per_photo": 1000 * seconds / len(images),
                "faces_found": faces,
                "ms_per_face_landmarks": 1000 * per_face / max(faces, 1),
                "weights": "bundled (face-recognition-models)",
            }
        )
    return rows


def fa_weights(weights_dir: Path | None) -> tuple[Path, str]:
    folder = weights_dir or default_weights_dir()
    if (folder / FAN_FILE).is_file() and (folder / S3FD_FILE).is_file():
        return folder, "real"
    tmp = Path(tempfile.mkdtemp(prefix="fa_random_"))
    write_untrained_weights(tmp)
    return tmp, "RANDOM (speed only, detections meaningless)"


def bench_face_alignment(
    images: list[np.ndarray], device: str, weights_dir: Path | None, batch: int, faces: int, repeats: int
) -> list[dict]:
    folder, kind = fa_weights(weights_dir)
    name = device_name(device)
    sync = device.startswith("cuda")
    rows = []
    for flip in (True, False):
        backend = FanFaceBackend(
            device=device, weights_dir=folder, flip_input=flip, fan_batch_size=max(faces, 1)
        )
        batch_images = (images * ((batch + len(images) - 1) // len(images)))[:batch]
        detect_s = timed(
            lambda b=backend, ims=batch_images: b.detect(ims, min_face_size=10**9), repeats, sync
        )
        # FAN alone on `faces` boxes spread over one frame, one batch.
        boxes = [(40.0 + 60 * (k % 9), 40.0 + 50 * (k // 9 % 8), 90.0, 100.0) for k in range(faces)]
        fan_s = timed(lambda b=backend, bs=boxes: b.landmarks_for_boxes(images[0], bs), repeats, sync)
        rows.append(
            {
                "backend": "face-alignment",
                "setting": f"S3FD batch={batch}, FAN batch={faces}, flip_input={flip}",
                "device": name,
                "ms_per_photo": 1000 * detect_s / len(batch_images),
                "faces_found": None,
                "ms_per_face_landmarks": 1000 * fan_s / faces,
                "weights": kind,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["dlib", "face-alignment", "all"], default="all")
    parser.add_argument("--device", default="cpu", help="device for face-alignment (dlib is CPU only)")
    parser.add_argument("--weights-dir", type=Path, default=None)
    parser.add_argument(
        "--batch", type=int, default=None, help="photos per S3FD batch (default 2 CPU, 16 GPU)"
    )
    parser.add_argument("--faces", type=int, default=None, help="faces per FAN batch (default 2 CPU, 32 GPU)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats, best kept (default 1 CPU, 5 GPU)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        parser.error("CUDA requested but not available")
    repeats = args.repeats or (5 if gpu else 1)
    images = frames()
    rows: list[dict] = []
    if args.backend in ("dlib", "all"):
        rows += bench_dlib(images, repeats)
    if args.backend in ("face-alignment", "all"):
        rows += bench_face_alignment(
            images,
            args.device,
            args.weights_dir,
            args.batch or (16 if gpu else 2),
            args.faces or (32 if gpu else 2),
            repeats,
        )
    if args.json:
        print(json.dumps({"frame": list(FRAME), "photos": VOC_PHOTOS, "results": rows}, indent=2))
        return 0
    print(f"face stage speed on {FRAME[0]}x{FRAME[1]} frames (nine VOC photos resized), best of {repeats}")
    for r in rows:
        found = "" if r["faces_found"] is None else f", {r['faces_found']} faces found"
        print(
            f"{r['backend']:15s} {r['setting']:45s} {r['ms_per_photo']:8.1f} ms/photo "
            f"{r['ms_per_face_landmarks']:8.1f} ms/face{found}  [{r['device']}; weights {r['weights']}]"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
