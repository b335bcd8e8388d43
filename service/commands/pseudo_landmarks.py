"""`fermam pseudo-landmarks`: place 68-point pseudo-labels on training faces with the face stage.

FERMam's landmark branch must be geometry-aware, yet no landmark-annotated FER data exists here.
The dlib backend of the face stage labels the FER+ training faces instead; each label carries a
quality weight (detected by HOG, or placed inside a fallback box covering the crop) so training
can trust the reliable ones more. Points are stored as fractions of the face image side.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

# FER+ faces are 48 px: upsampled so dlib's HOG window (80 px) fits the face with room to spare.
WORK_SIDE = 192
# Fallback-box labels drift on rotated or occluded faces: trust them less than detected ones.
FALLBACK_QUALITY = 0.3
FALLBACK_MARGIN = 0.08


def _label_chunk(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from PIL import Image

    from service.engine.faces import create_face_backend, landmarks_in_crops

    backend = create_face_backend("dlib", min_face_size=40, upsample=0)
    big = [
        np.asarray(Image.fromarray(face).resize((WORK_SIDE, WORK_SIDE), Image.BILINEAR)) for face in images
    ]
    inner = 1 - 2 * FALLBACK_MARGIN
    faces = landmarks_in_crops(backend, big, fallback_box=(FALLBACK_MARGIN, FALLBACK_MARGIN, inner, inner))
    points = np.stack([f.landmarks for f in faces]) / WORK_SIDE
    detected = np.array([f.detected for f in faces])
    scores = np.array([f.score if f.detected else 0.0 for f in faces], np.float32)
    return points.astype(np.float32), detected, scores


def label_faces(images: np.ndarray, workers: int = 1, chunk: int = 512) -> dict[str, np.ndarray]:
    """Pseudo-label (N, H, W) uint8 faces; returns landmarks, detected, score and quality arrays."""
    parts = [images[i : i + chunk] for i in range(0, len(images), chunk)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_label_chunk, parts))
    else:
        results = [_label_chunk(p) for p in parts]
    points = np.concatenate([r[0] for r in results])
    detected = np.concatenate([r[1] for r in results])
    scores = np.concatenate([r[2] for r in results])
    quality = np.where(detected, 1.0, FALLBACK_QUALITY).astype(np.float32)
    return {"landmarks": points, "detected": detected, "score": scores, "quality": quality}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fermam pseudo-landmarks", description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="npz with an `images` array (N, H, W)")
    parser.add_argument("--out", type=Path, required=True, help="output npz")
    parser.add_argument("--limit", type=int, default=None, help="label only the first N faces")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)

    with np.load(args.data, allow_pickle=False) as data:
        images = data["images"][: args.limit]
    start = time.perf_counter()
    labels = label_faces(images, workers=args.workers)
    seconds = time.perf_counter() - start
    np.savez_compressed(args.out, source=np.asarray(f"dlib 68-point on {args.data.name}"), **labels)
    print(
        json.dumps(
            {
                "faces": len(images),
                "detected": int(labels["detected"].sum()),
                "seconds": round(seconds, 1),
                "out": str(args.out),
            }
        )
    )
    return 0
