"""Load on `WS /v1/stream`: per-frame latency at given frame rates, and concurrent streams held.

Each stream sends frames at a fixed rate in real time (open loop, as a camera does, whatever the
server answers) for `--duration` seconds, then `end`. Per stream: frames answered, dropped (the
server's back-pressure and rate limit), and latency from sending a frame to its result. A run
"holds" when under 5% of frames are dropped and the p95 latency stays under `--max-p95-ms`.

    python bench/stream_load.py --fps 5,15 --streams 1                  # latency, one stream
    python bench/stream_load.py --fps 5 --streams 1,2,4                 # concurrent streams
    python bench/stream_load.py --url http://host:8000 --fps 5 --streams 8
"""

from __future__ import annotations

import argparse
import asyncio
import os
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
from media_clips import frames_of, jpeg  # noqa: E402  (real photos, panned)

from fermam_client import AsyncClient, FrameResult  # noqa: E402

PHOTO = "obama.jpg"  # one face


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_stream(base: str, frames: list[bytes], fps: float, duration_s: float) -> dict:
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    dropped = 0
    async with AsyncClient(base, timeout_s=duration_s + 120) as client, client.stream() as session:

        async def reader() -> None:
            nonlocal dropped
            while session.ended is None:
                message = await session.recv()
                if isinstance(message, FrameResult):
                    latencies.append((time.monotonic() - sent_at[message.frame_id]) * 1000)
                    dropped += len(message.dropped)
                elif hasattr(message, "dropped") and session.ended is not None:
                    dropped += len(message.dropped)

        task = asyncio.ensure_future(reader())
        start = time.monotonic()
        count = int(duration_s * fps)
        for i in range(count):
            await asyncio.sleep(max(0.0, start + i / fps - time.monotonic()))
            sent_at[i] = time.monotonic()
            await session.send(frames[i % len(frames)])
        await session._ws.send('{"type": "end"}')
        await asyncio.wait_for(task, 300)
    return {"sent": count, "answered": len(latencies), "dropped": dropped, "latencies": latencies}


async def run(base: str, streams: int, fps: float, duration_s: float, frames: list[bytes]) -> dict:
    results = await asyncio.gather(*(one_stream(base, frames, fps, duration_s) for _ in range(streams)))
    lat = [x for r in results for x in r["latencies"]]
    sent = sum(r["sent"] for r in results)
    return {
        "streams": streams,
        "fps": fps,
        "sent": sent,
        "answered": sum(r["answered"] for r in results),
        "dropped": sum(r["dropped"] for r in results),
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
    parser.add_argument("--max-p95-ms", type=float, default=1000.0)
    args = parser.parse_args()
    frames = [jpeg(f) for f in frames_of(PHOTO, 30, shift_px=2, size=(640, 480))]
    process = None
    base = args.url
    if base is None:
        process, base = start_server(args)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at start")
    print("streams  fps  sent  answered  dropped  p50_ms  p95_ms  mean_ms  holds")
    try:
        for fps in (float(x) for x in args.fps.split(",")):
            for streams in (int(x) for x in args.streams.split(",")):
                r = asyncio.run(run(base, streams, fps, args.duration, frames))
                holds = r["dropped"] < 0.05 * r["sent"] and r["p95"] < args.max_p95_ms
                print(
                    f"{r['streams']:>7} {r['fps']:>4g} {r['sent']:>5} {r['answered']:>9} {r['dropped']:>8}"
                    f" {r['p50']:>7.0f} {r['p95']:>7.0f} {r['mean']:>8.0f}  {'yes' if holds else 'no'}",
                    flush=True,
                )
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
        print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
