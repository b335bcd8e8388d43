"""Load on `WS /v1/stream`: per-frame latency at given frame rates, and concurrent streams held.

Frames: real photos with faces (`PHOTOS`: one, two and three people), fitted into 640x480 without
distortion (black bars) with a slow pan and zoom across the frames, played forward and back; stream
k shows photo k mod 3. Each stream sends frames at a fixed rate in real time (open loop, as a
camera does, whatever the server answers) for `--duration` seconds, then `end`. Per run: frames
answered, dropped (the server's back-pressure and rate limit), latency from sending a frame to its
result, the share of answered frames with a face, and the tracks per person. A run "holds" when
at least 95% of frames are answered and the p95 latency stays within `--max-p95-ms`.

A run in which faces were found in under 95% of answered frames exits non-zero: it measured the
no-face path (as this benchmark did before issue 24, on a squashed photo dlib found no face in).

    python bench/stream_load.py --fps 5,15 --streams 1                  # latency, one stream
    python bench/stream_load.py --fps 5 --streams 1,2,4                 # concurrent streams
    python bench/stream_load.py --url http://host:8000 --fps 5 --streams 8
    python bench/stream_load.py --server-args "--stream-detect-every 30"   # a server setting changed
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from machine import cpu_model  # bench/machine.py, beside this script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "service"))
sys.path.insert(0, str(REPO / "clients" / "python"))  # the client from this checkout, installed or not
from media_clips import jpeg, letterboxed_frames  # noqa: E402  (real photos, panned and zoomed)

from fermam_client import AsyncClient, FrameError, FrameResult  # noqa: E402

PHOTOS = {"obama.jpg": 1, "two_people.jpg": 2, "2008_001322.jpg": 3}  # photo: people in it
CLIP_FRAMES = 40  # one sweep of the pan; played forward then back
MIN_FACE_SHARE = 0.95


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_stream(base: str, frames: list[bytes], fps: float, duration_s: float) -> dict:
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    dropped = 0
    with_faces = 0
    errors: dict[str, int] = {}
    tracks: set[int] = set()
    async with AsyncClient(base, timeout_s=duration_s + 120) as client, client.stream() as session:

        async def reader() -> None:
            nonlocal dropped, with_faces
            while session.ended is None:
                message = await session.recv()
                if isinstance(message, FrameResult):
                    latencies.append((time.monotonic() - sent_at[message.frame_id]) * 1000)
                    dropped += sum(message.dropped_counts.values())
                    with_faces += bool(message.faces)
                    tracks.update(face.track_id for face in message.faces)
                elif isinstance(message, FrameError):
                    errors[message.code] = errors.get(message.code, 0) + 1
                elif hasattr(message, "dropped_counts") and session.ended is not None:
                    dropped += sum(message.dropped_counts.values())

        task = asyncio.ensure_future(reader())
        start = time.monotonic()
        count = int(duration_s * fps)
        for i in range(count):
            await asyncio.sleep(max(0.0, start + i / fps - time.monotonic()))
            sent_at[i] = time.monotonic()
            await session.send(frames[i % len(frames)])
        await session._ws.send('{"type": "end"}')
        await asyncio.wait_for(task, 300)
    return {
        "sent": count,
        "answered": len(latencies),
        "dropped": dropped,
        "errors": errors,
        "latencies": latencies,
        "with_faces": with_faces,
        "tracks": len(tracks),
    }


async def run(base: str, streams: int, fps: float, duration_s: float, clips: list[list[bytes]]) -> dict:
    results = await asyncio.gather(
        *(one_stream(base, clips[k % len(clips)], fps, duration_s) for k in range(streams))
    )
    lat = [x for r in results for x in r["latencies"]]
    sent = sum(r["sent"] for r in results)
    people = sum(list(PHOTOS.values())[k % len(clips)] for k in range(streams))
    return {
        "with_faces": sum(r["with_faces"] for r in results),
        "tracks": sum(r["tracks"] for r in results),
        "people": people,
        "streams": streams,
        "fps": fps,
        "sent": sent,
        "answered": sum(r["answered"] for r in results),
        "dropped": sum(r["dropped"] for r in results),
        "errors": sum(sum(r["errors"].values()) for r in results),
        "error_codes": {c: sum(r["errors"].get(c, 0) for r in results) for r in results for c in r["errors"]},
        "p50": percentile(lat, 0.5),
        "p95": percentile(lat, 0.95),
        "mean": statistics.fmean(lat) if lat else float("nan"),
    }


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--device", args.device,
               "--log-level", "warning", "--stream-max-fps", "60"]  # fmt: skip
    command += shlex.split(args.server_args)
    env = os.environ | {"PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env)
    base = f"http://127.0.0.1:{port}"
    for _ in range(900):
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("server never became ready")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="an already running server (default: start one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fps", default="5,15")
    parser.add_argument("--streams", default="1")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--max-p95-ms", type=float, default=250.0)
    parser.add_argument("--server-args", default="", help="more `fermam serve` flags for the started server")
    args = parser.parse_args()
    clips = []
    for name in PHOTOS:
        sweep = [jpeg(f) for f in letterboxed_frames(name, CLIP_FRAMES, size=(640, 480))]
        clips.append(sweep + sweep[-2:0:-1])  # forward and back: the motion never jumps
    process = None
    base = args.url
    if base is None:
        process, base = start_server(args)
    card = httpx.get(f"{base}/v1/models", timeout=30).json()["models"][0]
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores; model {card['version']} {card['dtype']} on"
        f" {card['device']}, faces {card['face_backend']}; load average {os.getloadavg()[0]:.1f} at start"
        + (f"; server flags {args.server_args}" if args.server_args else "")
    )
    print(
        "streams  fps  sent  answered  dropped  errors  faces%  tracks/people  p50_ms  p95_ms  mean_ms  holds"
    )
    measured_nothing = []
    try:
        for fps in (float(x) for x in args.fps.split(",")):
            for streams in (int(x) for x in args.streams.split(",")):
                r = asyncio.run(run(base, streams, fps, args.duration, clips))
                holds = r["answered"] >= 0.95 * r["sent"] and r["p95"] <= args.max_p95_ms
                share = r["with_faces"] / max(1, r["answered"])
                if share < MIN_FACE_SHARE:
                    measured_nothing.append(f"{streams} streams at {fps:g} fps: faces in {share:.0%}")
                print(
                    f"{r['streams']:>7} {r['fps']:>4g} {r['sent']:>5} {r['answered']:>9}"
                    f" {r['dropped']:>8} {r['errors']:>7}"
                    f" {share:>7.0%} {r['tracks']:>7}/{r['people']:<6} {r['p50']:>7.0f} {r['p95']:>7.0f}"
                    f" {r['mean']:>8.0f}  {'yes' if holds else 'no'}",
                    flush=True,
                )
                if r["error_codes"]:
                    print(f"        errors by code: {r['error_codes']}", flush=True)
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
        print(f"load average {os.getloadavg()[0]:.1f} at end")
    if measured_nothing:
        raise SystemExit(
            "faces found in under 95% of answered frames, the no-face path was measured: "
            + "; ".join(measured_nothing)
        )


if __name__ == "__main__":
    main()
