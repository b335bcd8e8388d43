"""Load generator for the expression service, in the manner of perf_analyzer.

Closed loop: N clients each send a request as soon as their previous one returns (a concurrency
sweep); after a 429 or 503 a client first waits its Retry-After, as fermam_client does
(`--retry-at-once` to send again at once). Open loop: requests leave at a constant arrival rate
whatever the server does (so queueing shows up as latency, not as politely reduced load). Each
run reports throughput, p50/p95/p99 latency, errors by status and the server's own queue /
inference split (x-queue-time and x-inference-time headers). By default it starts the server
twice, with batching on (the settings' defaults) and off (max batch size 1 in both stages), and
prints the batching gain as a ratio of throughputs from the same run. `--server-repo` starts the
servers from another checkout (a worktree of an older commit), for before/after tables.

    python bench/load.py                                   # CPU, start servers, sweep 1,4,8
    python bench/load.py --device cuda --face-backend face-alignment --concurrency 1,8,32,64
    python bench/load.py --url http://host:8000 --concurrency 4   # an already running server
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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from machine import cpu_model  # bench/machine.py, beside this script

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / ".." / "shared" / "data" / "photos"


@dataclass
class Sample:
    latency_s: float
    status: int
    queue_ms: float | None = None
    inference_ms: float | None = None
    retry_after_s: float | None = None  # a 429/503's Retry-After


@dataclass
class RunResult:
    label: str
    duration_s: float
    samples: list[Sample] = field(default_factory=list)

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.status == 200]

    @property
    def throughput(self) -> float:
        return len(self.ok) / self.duration_s if self.duration_s else 0.0

    def percentile_ms(self, q: float) -> float:
        latencies = sorted(s.latency_s for s in self.ok)
        if not latencies:
            return float("nan")
        index = min(len(latencies) - 1, max(0, round(q / 100 * len(latencies)) - 1))
        return latencies[index] * 1000

    def mean_header(self, name: str) -> float:
        values = [getattr(s, name) for s in self.ok if getattr(s, name) is not None]
        return statistics.fmean(values) if values else float("nan")

    def errors(self) -> str:
        counts = Counter(s.status for s in self.samples if s.status != 200)
        return ",".join(f"{k}:{v}" for k, v in sorted(counts.items())) or "-"


def machine_description(device: str) -> str:
    cpu = f"{cpu_model()} ({os.cpu_count()} logical CPUs visible)"
    if device.startswith("cuda"):
        try:
            name = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            return f"GPU {name or device}; host {cpu}"
        except (OSError, subprocess.SubprocessError):
            return f"GPU ({device}); host {cpu}"
    return f"CPU {cpu}"


async def one_request(client: httpx.AsyncClient, url: str, payload: bytes, filename: str) -> Sample:
    started = time.perf_counter()
    try:
        response = await client.post(url, files=[("files", (filename, payload, "application/octet-stream"))])
    except httpx.HTTPError:
        return Sample(time.perf_counter() - started, 0)
    latency = time.perf_counter() - started

    def header(name: str) -> float | None:
        value = response.headers.get(name)
        return float(value) if value is not None else None

    retry_after = header("retry-after") if response.status_code in (429, 503) else None
    return Sample(
        latency, response.status_code, header("x-queue-time"), header("x-inference-time"), retry_after
    )


async def closed_loop(
    base: str, payload: bytes, filename: str, concurrency: int, duration_s: float, honour_retry: bool = True
) -> RunResult:
    url = f"{base}/v1/expressions"
    result = RunResult(f"closed c={concurrency}", duration_s)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        stop_at = time.perf_counter() + duration_s

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                sample = await one_request(client, url, payload, filename)
                result.samples.append(sample)
                if honour_retry and sample.retry_after_s:
                    # As fermam_client does: a client that retried a 429 at once would measure
                    # the rejection path (and keep the queue estimate over its bound), not the service.
                    await asyncio.sleep(min(sample.retry_after_s, max(0.0, stop_at - time.perf_counter())))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        # Requests in flight at the stop time finish and count; so does the time they took.
        result.duration_s = time.perf_counter() - started
    return result


async def open_loop(base: str, payload: bytes, filename: str, rate: float, duration_s: float) -> RunResult:
    url = f"{base}/v1/expressions"
    result = RunResult(f"open {rate:g}/s", duration_s)
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=1000)) as client:
        started = time.perf_counter()
        tasks = []
        for k in range(max(1, int(rate * duration_s))):
            delay = started + k / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(client, url, payload, filename)))
        result.samples = list(await asyncio.gather(*tasks))
        result.duration_s = time.perf_counter() - started
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`fermam serve` in a subprocess, for as long as the `with` block lasts."""

    def __init__(self, extra_args: list[str], repo: Path = REPO) -> None:
        self.repo = repo
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port), *extra_args]
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        env = os.environ | {"PYTHONPATH": str(self.repo)}
        self.process = subprocess.Popen(self.args, cwd=self.repo, env=env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with status {self.process.returncode}")
            try:
                if httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError("server did not become ready in 300 s")

    def __exit__(self, *exc: object) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def print_table(title: str, machine: str, results: list[RunResult]) -> None:
    print(f"\n## {title}  [{machine}]")
    print(
        f"{'run':<14}{'ok':>6}{'req/s':>9}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}"
        f"{'queue ms':>10}{'infer ms':>10}  errors"
    )
    for r in results:
        print(
            f"{r.label:<14}{len(r.ok):>6}{r.throughput:>9.2f}{r.percentile_ms(50):>10.0f}"
            f"{r.percentile_ms(95):>10.0f}{r.percentile_ms(99):>10.0f}"
            f"{r.mean_header('queue_ms'):>10.1f}{r.mean_header('inference_ms'):>10.1f}  {r.errors()}"
        )


async def sweep(base: str, payload: bytes, args: argparse.Namespace) -> list[RunResult]:
    # One request first so connection set-up and any lazy work stay out of the figures.
    async with httpx.AsyncClient(timeout=300) as client:
        warm = await one_request(client, f"{base}/v1/expressions", payload, args.photo)
        if warm.status != 200:
            raise RuntimeError(f"warm-up request failed with status {warm.status}")
    results = []
    for concurrency in args.concurrency:
        results.append(
            await closed_loop(base, payload, args.photo, concurrency, args.duration, not args.retry_at_once)
        )
    for rate in args.rate:
        results.append(await open_loop(base, payload, args.photo, rate, args.duration))
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="benchmark this running server instead of starting one")
    parser.add_argument("--photo", default="aflw-test.jpg", help="photo from ../shared/data/photos to send")
    parser.add_argument("--concurrency", default="1,4,8", help="closed-loop client counts, comma-separated")
    parser.add_argument("--rate", default="", help="open-loop arrival rates (req/s), comma-separated")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per run")
    parser.add_argument(
        "--retry-at-once",
        action="store_true",
        help="closed loop: send again at once after a 429/503 instead of waiting its Retry-After",
    )
    parser.add_argument("--no-unbatched", action="store_true", help="skip the batching-off comparison")
    parser.add_argument("--weights", help="FERMam checkpoint for the started servers (default: shipped)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--face-backend", default="dlib")
    parser.add_argument(
        "--server-repo",
        type=Path,
        default=REPO,
        help="start the servers from this checkout (e.g. a git worktree of an older commit: before/after)",
    )
    parser.add_argument("--server-arg", action="append", default=[], help="extra `fermam serve` argument")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.rate = [float(r) for r in args.rate.split(",") if r]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    payload = (PHOTOS / args.photo).read_bytes()
    if args.url:
        device = httpx.get(f"{args.url}/v1/models", timeout=10).json()["models"][0]["device"]
        machine = machine_description(device)
        print_table(f"{args.url}, {args.photo}", machine, asyncio.run(sweep(args.url, payload, args)))
        return 0

    common = ["--device", args.device, "--face-backend", args.face_backend, "--log-level", "warning"]
    if args.weights:
        common += ["--weights", args.weights]
    common += args.server_arg
    machine = machine_description(args.device)
    configs = [("batching on (defaults)", [])]
    if not args.no_unbatched:
        configs.append(
            (
                "batching off (max_batch_size=1)",
                ["--detect-max-batch-size", "1", "--classify-max-batch-size", "1"],
            )
        )
    outcomes: dict[str, list[RunResult]] = {}
    for title, extra in configs:
        with Server(common + extra, args.server_repo) as server:
            outcomes[title] = asyncio.run(sweep(server.base, payload, args))
        print_table(f"{title}, {args.photo}", machine, outcomes[title])
    if len(outcomes) == 2:
        on, off = outcomes.values()
        print(f"\n## batching gain (throughput on / off)  [{machine}]")
        for a, b in zip(on, off, strict=True):
            ratio = a.throughput / b.throughput if b.throughput else float("nan")
            print(f"{a.label:<14}{ratio:>8.2f}x   ({a.throughput:.2f} vs {b.throughput:.2f} req/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
