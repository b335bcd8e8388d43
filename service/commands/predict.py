"""`fermam predict PHOTO...`: the engine run locally (no server) on photos, printed or drawn.

Faces, expressions, pose and quality for each photo, as text or (`--json`) as the JSON of
`POST /v1/expressions`; `--annotate OUT.png` draws the boxes, landmarks and top expressions.
Exit status: 0 when every photo was read, 1 when one could not be, 2 on bad options.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fermam predict", description="Faces and expressions of photos, run locally (no server)."
    )
    parser.add_argument("photos", nargs="+", type=Path, metavar="PHOTO", help="JPEG, PNG, WebP or BMP files")
    parser.add_argument(
        "--annotate",
        type=Path,
        metavar="OUT.png",
        help="draw the faces; with several photos OUT is a folder that gets one PNG per photo",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON of POST /v1/expressions")
    parser.add_argument("--top-k", type=int, default=3, help="expressions listed per face [default: 3]")
    parser.add_argument("--max-faces", type=int, default=None, help="most faces per photo")
    parser.add_argument("--min-face-size", type=int, default=None, help="smallest face side, pixels")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto [default: cpu]")
    parser.add_argument("--face-backend", choices=["dlib", "face-alignment"], default=None)
    parser.add_argument(
        "--weights", type=Path, default=None, help="FERMam checkpoint (default: the shipped one)"
    )
    return parser


def _outputs(photos: list[Path], annotate: Path | None) -> list[Path | None]:
    if annotate is None:
        return [None] * len(photos)
    if len(photos) == 1 and annotate.suffix:
        return [annotate]
    annotate.mkdir(parents=True, exist_ok=True)
    return [annotate / f"{index}-{photo.stem}.png" for index, photo in enumerate(photos)]


def _describe(name: str, image) -> list[str]:
    lines = [f"{name}: {image.width}x{image.height}, {len(image.faces)} face(s)"]
    for rank, face in enumerate(image.faces):
        x, y, w, h = face.box
        top = ", ".join(f"{label} {score:.2f}" for label, score in face.top or [])
        lines.append(f"  face {rank}: box ({x:.0f}, {y:.0f}, {w:.0f}, {h:.0f}) {top}")
        if face.pose is not None and face.quality is not None:
            p, q = face.pose, face.quality
            lines.append(
                f"    pose yaw {p.yaw:+.1f} pitch {p.pitch:+.1f} roll {p.roll:+.1f} deg; "
                f"sharpness {q.sharpness:.2f} brightness {q.brightness:.2f} size {q.size:.0f} px"
            )
    if image.skipped_small or image.skipped_over_max:
        lines.append(
            f"  not reported: {image.skipped_small} below min size, {image.skipped_over_max} over max"
        )
    return lines


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    missing = [str(p) for p in args.photos if not p.is_file()]
    if missing:
        print(f"fermam predict: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    overrides = {"device": args.device, "decode_threads": 1, "log_level": "warning"}
    for key in ("max_faces", "min_face_size", "face_backend", "weights"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    # Heavy imports (torch, the face backend) only once the command line is known to be good.
    import asyncio

    from pydantic import ValidationError

    from service.settings import Settings

    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        print(f"fermam predict: invalid options: {error.errors()[0]['msg']}", file=sys.stderr)
        return 2
    if not 1 <= args.top_k <= 8:
        print("fermam predict: --top-k must be between 1 and 8", file=sys.stderr)
        return 2
    return asyncio.run(_run(args, settings))


async def _run(args: argparse.Namespace, settings) -> int:
    from service.commands.annotate import annotate
    from service.engine.decode import decode_image
    from service.engine.pipeline import Engine, ImageRejected, RequestOptions
    from service.http.routes import _to_response  # the API's own JSON shape

    try:
        engine = Engine(settings)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"fermam predict: cannot load the models: {error}", file=sys.stderr)
        return 1
    await engine.start()
    status = 0
    options = RequestOptions(top_k=args.top_k)
    try:
        for path, out in zip(args.photos, _outputs(args.photos, args.annotate), strict=True):
            data = path.read_bytes()
            try:
                result = await engine.infer([data], options)
            except ImageRejected as error:
                print(f"fermam predict: {path}: {error.cause}", file=sys.stderr)
                status = 1
                continue
            image = result.images[0]
            if args.json:
                body = _to_response(engine, result).model_dump(mode="json")
                print(json.dumps({"file": str(path), **body}))
            else:
                print("\n".join(_describe(str(path), image)))
            if out is not None:
                pixels = decode_image(
                    data, max_bytes=len(data) + 1, max_pixels=settings.max_image_pixels
                ).pixels
                annotate(pixels, image.faces).save(out)
                if not args.json:
                    print(f"  drawn: {out}")
    finally:
        await engine.stop()
    return status
