"""Overload: does the service shed early instead of collapsing? (issue 13)

1. Sustainable rate: closed loop, `--concurrency` clients for `--sustain-s` seconds.
2. Open loop at 3x that rate for 60 s, then 10x for 30 s (`--phases`), every request with the
   deadline `--timeout-ms` (header X-Request-Timeout-Ms).
3. After each storm, one normal request: how long until it is answered.

Per phase it reports successful answers per second (goal >= 90% of the sustainable rate), p50 /
p99 latency of the 200s (goal p99 within the deadline), refusals by status and code, the slowest
429 (goal < 50 ms, each with Retry-After), requests that got no answer (goal 0: exactly one
answer per request), and the after-storm request's latency (goal < 2 s). Loopback only, bounded
in time. Starts its own server unless `--url` is given.

    python bench/overload.py                         # CPU, defaults of `fermam serve`
    python bench/overload.py --server-args "--max-queue-wait-ms 1500"
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
from load import PHOTOS, Server, closed_loop, machine_description  # bench/load.py, beside this script


@dataclass
class Answer:
    sent_at: float
    latency_s: float
    status: int  # 0: no answer (connection error or client timeout)
    code: str = ""
    retry_after: str | None = None


@dataclass
class Phase:
    label: str
    rate: float
    duration_s: float
    answers: list[Answer] = field(default_factory=list)
    after_storm_s: float = float("nan")  # latency of the first request sent right after the storm
    after_storm_status: int = 0
    recovered_s: float = float("nan")  # from the storm's end until a normal request got a 200


async def one(client: httpx.AsyncClient, url: str, payload: bytes, timeout_ms: int, t0: float) -> Answer:
    sent = time.perf_counter()
    try:
        response = await client.post(
            url,
            files=[("files", ("g.jpg", payload, "image/jpeg"))],
            headers={"x-request-timeout-ms": str(timeout_ms)},
        )
    except httpx.HTTPError:
        return Answer(sent - t0, time.perf_counter() - sent, 0)
    latency = time.perf_counter() - sent
    code = ""
    if response.status_code != 200:
        try:
            code = response.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = "?"
    return Answer(sent - t0, latency, response.status_code, code, response.headers.get("retry-after"))


async def storm(base: str, payload: bytes, phase: Phase, timeout_ms: int) -> None:
    url = f"{base}/v1/expressions"
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=timeout_ms / 1000 + 30, limits=limits) as client:
        t0 = time.perf_counter()
        tasks = []
        for k in range(int(phase.rate * phase.duration_s)):
            delay = t0 + k / phase.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(client, url, payload, timeout_ms, t0)))
        # The storm is over when the last request leaves: a normal request now, and again every
        # 0.25 s until one gets a 200 (the storm's admitted work is still ahead of it).
        ended = time.perf_counter()
        probe = await one(client, url, payload, timeout_ms, t0)
        phase.after_storm_s, phase.after_storm_status = probe.latency_s, probe.status
        while probe.status != 200 and time.perf_counter() - ended < 60:
            await asyncio.sleep(0.25)
            probe = await one(client, url, payload, timeout_ms, t0)
        if probe.status == 200:
            phase.recovered_s = time.perf_counter() - ended
        phase.answers = list(await asyncio.gather(*tasks))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values)) - 1))]


def report(phase: Phase, sustainable: float, timeout_ms: int) -> list[str]:
    ok = [a for a in phase.answers if a.status == 200]
    refused = [a for a in phase.answers if a.status == 429]
    lost = [a for a in phase.answers if a.status == 0]
    others = Counter(f"{a.status}:{a.code}" for a in phase.answers if a.status not in (200, 429, 0))
    goodput = len(ok) / phase.duration_s
    p99 = percentile([a.latency_s for a in ok], 99)
    slowest_429 = max((a.latency_s for a in refused), default=float("nan"))
    no_retry = sum(1 for a in refused if not a.retry_after)
    return [
        f"### {phase.label}: {phase.rate:.1f} req/s offered for {phase.duration_s:g} s, "
        f"{len(phase.answers)} requests",
        f"- 200s: {len(ok)} = {goodput:.2f}/s ({goodput / sustainable:.0%} of sustainable; goal >= 90%)",
        f"- 200 latency p50 {percentile([a.latency_s for a in ok], 50):.2f} s, p99 {p99:.2f} s "
        f"(deadline {timeout_ms / 1000:g} s)",
        f"- 429s: {len(refused)} ({dict(Counter(a.code for a in refused))}), answered in p50 "
        f"{percentile([a.latency_s for a in refused], 50) * 1000:.1f} ms, p99 "
        f"{percentile([a.latency_s for a in refused], 99) * 1000:.1f} ms, slowest "
        f"{slowest_429 * 1000:.1f} ms (goal < 50), {no_retry} without Retry-After",
        f"- other statuses: {dict(others) or 'none'}; no answer: {len(lost)} (goal 0)",
        f"- a normal request right after the storm: {phase.after_storm_status} in "
        f"{phase.after_storm_s:.2f} s; first 200 {phase.recovered_s:.2f} s after the storm (goal < 2 s)",
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="an already running server (default: start one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--server-args", default="", help="extra `fermam serve` flags, one string")
    parser.add_argument("--photo", default="2008_001322.jpg", help="photo in shared/data/photos")
    parser.add_argument(
        "--concurrency", type=int, default=2, help="clients measuring the sustainable rate (one per stage)"
    )
    parser.add_argument("--sustain-s", type=float, default=20)
    parser.add_argument("--phases", default="3x60,10x30", help="MULTIPLExSECONDS, comma-separated")
    parser.add_argument("--timeout-ms", type=int, default=10_000, help="each request's deadline")
    return parser.parse_args(argv)


async def run(base: str, args: argparse.Namespace) -> list[str]:
    payload = (PHOTOS / args.photo).read_bytes()
    await closed_loop(base, payload, args.photo, args.concurrency, 3)  # warm-up
    sustained = await closed_loop(base, payload, args.photo, args.concurrency, args.sustain_s)
    rate = sustained.throughput
    lines = [
        f"Machine: {machine_description(args.device)}",
        f"Photo {args.photo}; server args: {args.server_args or '(defaults)'}",
        f"Sustainable rate (closed loop, {args.concurrency} clients, {args.sustain_s:g} s): "
        f"{rate:.2f} req/s, "
        f"p50 {sustained.percentile_ms(50):.0f} ms, p99 {sustained.percentile_ms(99):.0f} ms, "
        f"refusals {sustained.errors()}",
    ]
    for spec in args.phases.split(","):
        multiple, seconds = spec.split("x")
        phase = Phase(f"{multiple}x", float(multiple) * rate, float(seconds))
        await storm(base, payload, phase, args.timeout_ms)
        lines += report(phase, rate, args.timeout_ms)
        await asyncio.sleep(args.timeout_ms / 1000)  # let the queue empty before the next phase
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.url:
        lines = asyncio.run(run(args.url, args))
    else:
        server_args = ["--device", args.device, "--log-level", "warning", *shlex.split(args.server_args)]
        with Server(server_args) as server:
            lines = asyncio.run(run(server.base, args))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
