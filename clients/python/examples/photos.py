"""Faces and expressions of photos: `POST /v1/expressions` through `fermam_client.Client`.

    python examples/photos.py photo.jpg [more.jpg ...] [--url http://127.0.0.1:8000]

The API key, if the server wants one, comes from FERMAM_API_KEY.
"""

from __future__ import annotations

import argparse
import os
import sys

from fermam_client import Client, FermamError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", nargs="+", help="image files (JPEG, PNG, WebP, ...)")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds, queueing and retries included")
    args = parser.parse_args()

    with Client(args.url, api_key=os.environ.get("FERMAM_API_KEY"), timeout_s=args.timeout) as client:
        try:
            result = client.expressions(args.photos, top_k=3)
        except FermamError as error:  # 4xx/5xx after retries, or the deadline passed (status 0)
            print(f"the service refused: {error}", file=sys.stderr)
            return 1
    for photo, image in zip(args.photos, result.images, strict=True):
        print(f"{photo}: {len(image.faces)} face(s)")
        for face in image.faces:
            top = ", ".join(f"{label} {score:.2f}" for label, score in face.top or [])
            print(f"  at ({face.box.x:.0f}, {face.box.y:.0f}) {face.box.width:.0f}px wide: {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
