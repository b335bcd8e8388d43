"""Soak: is resident memory flat under steady load, and does it come back after large images?

1. Start the server, measure the sustainable rate briefly (closed loop, 2 clients), then send
   open-loop traffic at `--load` (default half) of it for `--duration-s` (default 600 s),
   sampling the server's resident memory (VmRSS) every `--sample-s` seconds.
2. Warm level: the median RSS between `--warmup-s`/2 and `--warmup-s` seconds of the steady
   load; the goal is that RSS at the end is at most 5% above it.
3. A burst of large images (`--burst` requests of four ~6000x4500 photos each, made here by
   upscaling a shared photo), then `--settle-s` seconds idle: RSS should return to within 20% of
   the warm level (the server trims its heap after work, `--memory-trim-interval-s`).

Loopback only, bounded in time: about duration + 90 s. Starts its own server.

    python bench/soak.py                     # 10 minutes
    python bench/soak.py --duration-s 180    # a shorter run
"""

from __future__ import annotations

import argparse
import asyncio
import io
import shlex
import statistics
import time
from pathlib import Path

import httpx
from load import PHOTOS, Server, closed_loop, machine_description  # bench/load.py, beside this script
from PIL import Image


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def large_jpeg(name: str, width: int) -> bytes:
    with Image.open(PHOTOS / name) as image:
        rgb = image.convert("RGB")
        height = round(rgb.height * width / rgb.width)
        buffer = io.BytesIO()
        rgb.resize((width, height), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


async def steady(base: str, payload: bytes, rate: float, duration_s: float, pid: int, sample_s: float):
    url = f"{base}/v1/expressions"
    statuses: dict[int, int] = {}
    samples: list[tuple[float, float]] = []
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=500)) as client:

        async def one() -> None:
            try:
                response = await client.post(url, files=[("files", ("g.jpg", payload, "image/jpeg"))])
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            except httpx.HTTPError:
                statuses[0] = statuses.get(0, 0) + 1

        t0 = time.perf_counter()
        tasks, next_sample = [], t0
        k = 0
        while (now := time.perf_counter()) < t0 + duration_s:
            if now >= next_sample:
                samples.append((now - t0, rss_mb(pid)))
                next_sample += sample_s
            due = t0 + k / rate
            if now >= due:
                tasks.append(asyncio.create_task(one()))
                k += 1
            await asyncio.sleep(max(0.0, min(due, next_sample) - time.perf_counter()))
        await asyncio.gather(*tasks)
    return statuses, samples


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--server-args", default="", help="extra `fermam serve` flags, one string")
    parser.add_argument("--photo", default="2008_001322.jpg")
    parser.add_argument("--load", type=float, default=0.5, help="fraction of the sustainable rate")
    parser.add_argument("--duration-s", type=float, default=600)
    parser.add_argument("--warmup-s", type=float, default=60)
    parser.add_argument("--sample-s", type=float, default=5)
    parser.add_argument("--burst", type=int, default=6, help="requests of four large photos each")
    parser.add_argument("--settle-s", type=float, default=20)
    return parser.parse_args(argv)


async def run(server: Server, args: argparse.Namespace) -> list[str]:
    pid = server.process.pid
    payload = (PHOTOS / args.photo).read_bytes()
    start_rss = rss_mb(pid)
    await closed_loop(server.base, payload, args.photo, 2, 3)
    rate = (await closed_loop(server.base, payload, args.photo, 2, 15)).throughput
    statuses, samples = await steady(
        server.base, payload, args.load * rate, args.duration_s, pid, args.sample_s
    )
    warm = statistics.median(r for t, r in samples if args.warmup_s / 2 <= t <= args.warmup_s)
    end = statistics.median(r for t, r in samples[-3:])
    peak = max(r for _, r in samples)

    big = large_jpeg("group_selfie.jpg", 6000)
    burst_status: dict[int, int] = {}
    burst_peak = 0.0
    async with httpx.AsyncClient(timeout=300) as client:
        for _ in range(args.burst):
            files = [("files", (f"big{k}.jpg", big, "image/jpeg")) for k in range(4)]
            response = await client.post(f"{server.base}/v1/expressions", files=files)
            burst_status[response.status_code] = burst_status.get(response.status_code, 0) + 1
            burst_peak = max(burst_peak, rss_mb(pid))
    await asyncio.sleep(args.settle_s)
    settled = rss_mb(pid)
    return [
        f"Machine: {machine_description(args.device)}; server args: {args.server_args or '(defaults)'}",
        f"RSS at start {start_rss:.0f} MB; sustainable {rate:.2f} req/s; "
        f"steady load {args.load * rate:.2f} req/s "
        f"for {args.duration_s:g} s: statuses {dict(sorted(statuses.items()))}",
        f"RSS warm (median {args.warmup_s / 2:g}-{args.warmup_s:g} s) {warm:.0f} MB, end {end:.0f} MB "
        f"({(end - warm) / warm:+.1%}; goal <= +5%), peak {peak:.0f} MB",
        f"Burst: {args.burst} requests x 4 photos of {len(big) / 1e6:.1f} MB (6000 px wide): "
        f"statuses {burst_status}, RSS peak {burst_peak:.0f} MB",
        f"RSS {args.settle_s:g} s after the burst: {settled:.0f} MB ({(settled - warm) / warm:+.1%} of warm; "
        "goal within 20%)",
        "RSS samples (s, MB): "
        + " ".join(f"{t:.0f}:{r:.0f}" for t, r in samples[:: max(1, len(samples) // 24)]),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server_args = ["--device", args.device, "--log-level", "warning", *shlex.split(args.server_args)]
    with Server(server_args) as server:
        lines = asyncio.run(run(server, args))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
