"""`POST /v1/videos`'s two paths on one clip: tracked (faces followed between detections) against
per-frame (every sampled frame detected and classified), A/B interleaved in one run.

The clip: a real photo with faces (`--photo`, default three people) fitted into 640x480 without
distortion (black bars), with a slow pan and zoom swept forward and back (tests/service/
media_clips.py), encoded at 10 fps with PyAV, `--seconds` long. Each repetition analyses it with
`analyse_video` on the engine (no HTTP), tracking on and off, alternating which goes first. Per
path: wall time per video and per sampled frame (median over repetitions), frames with faces,
frames followed, the share of points classified fresh, and the tracked path's expression agreement
with the per-frame path's. The run fails (exit 1) if either path found faces in fewer than 95% of
its sampled frames, a sampled frame lacks a point for a person, or a path raised.

    python bench/video_tracked.py                                # 20 s clip at 5 fps, 5 repetitions
    python bench/video_tracked.py --seconds 2 --repeats 1       # a dry run
    python bench/video_tracked.py --fps 10 --photo two_people.jpg --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "service"))

from machine import device_name  # noqa: E402  (bench/machine.py, beside this script)
from media_clips import letterboxed_frames, make_clip  # noqa: E402  (real photos, panned and zoomed)

from model.weights import default_weights_path  # noqa: E402
from service.engine.pipeline import Engine  # noqa: E402
from service.engine.video import VideoOptions, VideoResult, analyse_video  # noqa: E402
from service.settings import Settings  # noqa: E402

PEOPLE = {"obama.jpg": 1, "two_people.jpg": 2, "2008_001322.jpg": 3}  # photo: people in it
SOURCE_FPS = 10
SWEEP_FRAMES = 20  # one pan-and-zoom sweep (2 s at SOURCE_FPS); played forward, then back
MIN_FACE_SHARE = 0.95


def clip(photo: str, seconds: float) -> bytes:
    sweep = letterboxed_frames(photo, SWEEP_FRAMES)
    frames = []
    while len(frames) < seconds * SOURCE_FPS:
        frames += sweep if len(frames) // SWEEP_FRAMES % 2 == 0 else sweep[::-1]
    return make_clip(frames[: round(seconds * SOURCE_FPS)], SOURCE_FPS)


def by_frame(result: VideoResult) -> dict[int, list]:
    out: dict[int, list] = {}
    for track in result.tracks:
        for point in track.points:
            out.setdefault(point.frame_index, []).append(point)
    return out


def agreement(tracked: VideoResult, full: VideoResult) -> tuple[int, int]:
    """Faces of the per-frame path whose tracked twin (the same frame, the closest box) has the
    same expression, and all faces of the per-frame path."""
    agree = total = 0
    followed = by_frame(tracked)
    for index, points in by_frame(full).items():
        for point in points:
            total += 1
            twins = followed.get(index, [])
            if twins:
                x, y, _, _ = point.face.box
                twin = min(twins, key=lambda p: (p.face.box[0] - x) ** 2 + (p.face.box[1] - y) ** 2)
                agree += twin.face.expression == point.face.expression
    return agree, total


def problems(result: VideoResult, people: int) -> list[str]:
    found = []
    if result.frames_with_faces < MIN_FACE_SHARE * result.frames_sampled:
        found.append(f"faces in {result.frames_with_faces} of {result.frames_sampled} frames")
    frames = by_frame(result)
    short = [i for i in range(result.frames_sampled) if len(frames.get(i, [])) < people]
    if short:
        found.append(f"{len(short)} sampled frames lack a person's point (first: {short[0]})")
    return found


async def run(args: argparse.Namespace) -> int:
    settings = Settings(weights=args.weights or default_weights_path(), device=args.device)
    engine = Engine(settings)
    await engine.start()
    data = clip(args.photo, args.seconds)
    people = PEOPLE.get(args.photo, 1)
    walls: dict[bool, list[float]] = {True: [], False: []}
    last: dict[bool, VideoResult] = {}
    failures: list[str] = []
    try:
        for rep in range(args.repeats):
            for track in (True, False) if rep % 2 == 0 else (False, True):
                options = VideoOptions(fps=args.fps, track=track)
                started = time.perf_counter()
                try:
                    result = await analyse_video(engine, io.BytesIO(data), options)
                except Exception as error:  # a missing answer fails the run, with its reason
                    failures.append(f"{'tracked' if track else 'per-frame'} rep {rep}: {error!r}")
                    continue
                walls[track].append(time.perf_counter() - started)
                last[track] = result
                failures += [
                    f"{'tracked' if track else 'per-frame'} rep {rep}: {p}" for p in problems(result, people)
                ]
    finally:
        await engine.stop()

    print(
        f"machine: {device_name(args.device)}, {os.cpu_count()} cores; face backend {settings.face_backend}; "
        f"clip {args.photo} ({people} people) {args.seconds:g} s 640x480 at {SOURCE_FPS} fps, sampled at "
        f"{args.fps:g} fps; {args.repeats} repetitions, interleaved"
    )
    for track in (True, False):
        if track not in last:
            continue
        result, wall = last[track], statistics.median(walls[track])
        points = [p for t in result.tracks for p in t.points]
        fresh = sum(p.fresh for p in points) / max(1, len(points))
        print(
            f"  {'tracked  ' if track else 'per-frame'}  {wall:7.2f} s/video  "
            f"{wall / max(1, result.frames_sampled) * 1000:7.1f} ms/sampled frame  "
            f"faces in {result.frames_with_faces}/{result.frames_sampled} frames  "
            f"followed {result.frames_followed}  fresh {fresh:.0%}  tracks {len(result.tracks)}"
        )
    if True in last and False in last:
        agree, total = agreement(last[True], last[False])
        speedup = statistics.median(walls[False]) / statistics.median(walls[True])
        print(f"  tracked/per-frame: {speedup:.2f}x faster; expression agreement {agree}/{total}")
    print(f"  load average {os.getloadavg()[0]:.1f} at end")
    for failure in failures:
        print(f"FAIL {failure}")
    return 1 if failures or len(last) < 2 else 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photo", default="2008_001322.jpg", choices=sorted(PEOPLE))
    parser.add_argument("--seconds", type=float, default=20.0, help="clip length")
    parser.add_argument("--fps", type=float, default=5.0, help="sampling rate")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions of each path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", type=Path, default=None)
    sys.exit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
