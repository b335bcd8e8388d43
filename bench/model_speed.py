"""Faces per second of the whole FERMam network (random weights: speed only).

CPU: fp32 inference. CUDA (where present): bf16 autocast inference with each selective-scan backend
available, optionally compiled with torch.compile (--compile) and optionally a training step
(--train: forward + backward + AdamW, bf16 autocast). Every figure is printed with the device name.

    python bench/model_speed.py --devices cpu --batches 1,8 --iters 3          # a short CPU run
    python bench/model_speed.py --devices cuda --compile --train --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import device_name  # noqa: E402  (bench/machine.py, beside this script)

from model import scan  # noqa: E402
from model.fermam import FERMam  # noqa: E402

DEFAULT_ITERS = {"cpu": 3, "cuda": 30}
DEFAULT_WARMUP = {"cpu": 1, "cuda": 5}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_it(step: Callable[[], Any], device: str, warmup: int, iters: int) -> float:
    """Seconds per call, after warm-up calls (which also absorb compilation)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def build(device: str, train: bool) -> FERMam:
    torch.manual_seed(0)
    model = FERMam().to(device).to(memory_format=torch.channels_last)
    return model.train(train)


def inference_step(
    model: torch.nn.Module, batch: int, device: str, dtype: torch.dtype | None
) -> Callable[[], Any]:
    x = torch.randn(batch, 3, 112, 112, device=device).to(memory_format=torch.channels_last)

    def step() -> Any:
        with (
            torch.inference_mode(),
            torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None),
        ):
            return model(x)

    return step


def train_step(
    model: torch.nn.Module, batch: int, device: str, dtype: torch.dtype | None
) -> Callable[[], Any]:
    x = torch.randn(batch, 3, 112, 112, device=device).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 8, (batch,), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")

    def step() -> Any:
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def run_one(
    results: list[dict[str, Any]],
    *,
    device: str,
    mode: str,
    backend: str,
    compiled: bool,
    batches: list[int],
    iters: int,
    warmup: int,
) -> None:
    dtype = torch.bfloat16 if device == "cuda" else None
    scan.set_scan_backend(backend)
    model = build(device, train=mode == "train")
    runner: torch.nn.Module = model
    if compiled:
        torch._dynamo.reset()
        runner = torch.compile(model)
    name = device_name(device)
    label = f"{mode} {'bf16' if dtype else 'fp32'} scan={backend}{' compiled' if compiled else ''}"
    if compiled and backend == "torch" and not scan.scan_compile_enabled():
        label += " (scan eager)"
    for batch in batches:
        make_step = train_step if mode == "train" else inference_step
        row: dict[str, Any] = {
            "device": device,
            "device_name": name,
            "mode": mode,
            "dtype": "bf16" if dtype else "fp32",
            "backend": backend,
            "compiled": compiled,
            "scan_compiled": compiled and backend == "torch" and scan.scan_compile_enabled(),
            "batch": batch,
        }
        try:
            seconds = time_it(make_step(runner, batch, device, dtype), device, warmup, iters)
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
            print(f"[{name}] {label} batch {batch}: out of memory", flush=True)
            torch.cuda.empty_cache()
        else:
            row.update(faces_per_s=batch / seconds, ms_per_batch=1000 * seconds, iters=iters)
            speed = f"{batch / seconds:,.1f} faces/s ({1000 * seconds:.2f} ms/batch)"
            print(f"[{name}] {label} batch {batch}: {speed}", flush=True)
        results.append(row)
    del runner, model
    if device == "cuda":
        torch.cuda.empty_cache()
    scan.set_scan_backend(None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--devices", default="cpu,cuda", help="comma list of cpu,cuda (cuda skipped if absent)"
    )
    parser.add_argument("--batches", default="1,8,32,256", help="comma list of batch sizes")
    parser.add_argument("--iters", type=int, help="timed iterations per figure (default: cpu 3, cuda 30)")
    parser.add_argument("--warmup", type=int, help="untimed iterations first (default: cpu 1, cuda 5)")
    parser.add_argument("--backends", default="", help="scan backends on CUDA (default: all available)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models on CUDA")
    parser.add_argument("--train", action="store_true", help="also time training steps on CUDA")
    parser.add_argument(
        "--eager-scan",
        action="store_true",
        help="with --compile: keep the torch scan backend out of the compiled graph (much faster to compile)",
    )
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    scan.set_scan_compile(not args.eager_scan)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",") if b]
    devices = [d for d in args.devices.split(",") if d]
    if "cuda" in devices and not torch.cuda.is_available():
        print("CUDA not available: skipping the GPU figures", flush=True)
        devices.remove("cuda")
    print(f"torch {torch.__version__}; scan backends available: {scan.available_backends()}", flush=True)

    results: list[dict[str, Any]] = []
    for device in devices:
        iters = args.iters or DEFAULT_ITERS[device]
        warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP[device]
        common = {"device": device, "batches": batches, "iters": iters, "warmup": warmup}
        if device == "cpu":
            run_one(results, mode="inference", backend="torch", compiled=False, **common)
            continue
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        backends = [b for b in args.backends.split(",") if b] or scan.available_backends()
        for backend in backends:
            for compiled in [False, True] if args.compile else [False]:
                run_one(results, mode="inference", backend=backend, compiled=compiled, **common)
                if args.train:
                    train_batches = [b for b in batches if b > 1]
                    run_one(
                        results,
                        mode="train",
                        backend=backend,
                        compiled=compiled,
                        **{**common, "batches": train_batches},
                    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=2))
        print(f"wrote {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
