"""Where one request's time goes: the engine's own per-stage timings over sequential requests.

In-process (no HTTP), one request at a time, so every figure is the latency of an idle service:
decode, detect (dlib or face-alignment), alignment and classification (FERMam), median of
--requests after 3 warm-up requests. Settings as `fermam serve` takes them, as KEY=VALUE.

    python bench/stage_breakdown.py
    python bench/stage_breakdown.py cpu_runtime=openvino-int8 cpu_int8_model=/tmp/fermam-int8.xml
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine import cpu_model  # noqa: E402  (bench/machine.py, beside this script)

from service.engine.pipeline import Engine, Timings  # noqa: E402
from service.settings import Settings  # noqa: E402

PHOTOS = REPO / ".." / "shared" / "data" / "photos"
STAGES = ("decode_s", "detect_queue_s", "detect_s", "align_s", "classify_queue_s", "classify_s", "total_s")


async def measure(engine: Engine, payload: bytes, requests: int) -> list[tuple[float, Timings]]:
    await engine.start()
    try:
        for _ in range(3):
            await engine.infer([payload])
        rows = []
        for _ in range(requests):
            started = time.perf_counter()
            result = await engine.infer([payload])
            rows.append((time.perf_counter() - started, result.timings))
        return rows
    finally:
        await engine.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="Settings overrides")
    parser.add_argument("--photo", default="aflw-test.jpg")
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.settings)
    engine = Engine(Settings(**overrides))
    rows = asyncio.run(measure(engine, (PHOTOS / args.photo).read_bytes(), args.requests))
    print(
        f"# {cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
        f"{args.photo}, {args.requests} sequential requests, settings {overrides or 'defaults'}"
    )
    print(f"{'stage':<18}{'median ms':>10}")
    for stage in STAGES:
        print(f"{stage:<18}{1000 * statistics.median(getattr(t, stage) for _, t in rows):>10.1f}")
    print(f"{'wall':<18}{1000 * statistics.median(wall for wall, _ in rows):>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
