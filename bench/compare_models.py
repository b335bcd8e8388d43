"""FERMam beside POSTER++ and POSTER: parameters, MACs and faces/s on one machine, in one run.

Counts use `fermam complexity`'s own counter (model.complexity.count: PyTorch's flop counter on the
meta device, one MAC per multiply-add of a convolution, linear layer or matrix product) on all three
networks, so that they differ only by the networks. The reference networks (bench/reference_nets)
are built at their published configurations with random weights, including the modules their
released checkpoints carry and never run; ``params_used`` counts only the parameters a forward pass
reads. Speed: every network at every batch size, round-robin within each round (the order rotating
from round to round), after untimed warm-up calls; each call's output is checked for shape and
finiteness (and bf16 dtype under bf16 autocast). bf16 is measured only where the CPU has native bf16
(avx512_bf16 or amx_bf16), since PyTorch would otherwise emulate it and time the emulation.

    python bench/compare_models.py                       # table: counts and CPU speed
    python bench/compare_models.py --json                # one JSON object
    python bench/compare_models.py --no-speed --json     # counts alone (a second or two)
    python bench/compare_models.py --device cuda --json  # speed on the GPU instead
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_model, device_name  # noqa: E402
from bench.reference_nets import poster, posterv2  # noqa: E402
from model.complexity import REFERENCE_MACS, REFERENCE_PARAMS, count, default_class_names  # noqa: E402
from model.config import FERMamConfig  # noqa: E402
from model.fermam import FERMam  # noqa: E402

INPUT_SIZE = 112  # all three networks see a 112x112 face (the POSTERs resize their 224 input to it)
NETWORKS = ("fermam", "posterv2", "poster")
LABELS = {"fermam": "FERMam", "posterv2": "POSTER++", "poster": "POSTER"}
DEFAULT_ROUNDS = {"cpu": 3, "cuda": 20}
DEFAULT_WARMUP = {"cpu": 1, "cuda": 5}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
ATTENTION_OPERATORS = ("aten.bmm",)  # activation x activation products: what thop's module hooks miss

PUBLISHED: dict[str, dict[str, Any]] = {
    "fermam": {"params": REFERENCE_PARAMS, "macs": REFERENCE_MACS, "source": "FERMam released code (thop)"},
    "posterv2": posterv2.PUBLISHED,
    "poster": poster.PUBLISHED,
}


def build(name: str, num_classes: int) -> nn.Module:
    """One network in eval mode, on the current default device."""
    if name == "fermam":
        return FERMam(FERMamConfig(class_names=default_class_names(num_classes))).eval()
    if name == "posterv2":
        return posterv2.PosterV2(num_classes).eval()
    if name == "poster":
        return poster.Poster(num_classes).eval()
    raise ValueError(f"unknown network {name!r}")


class ParameterReads(TorchFunctionMode):
    """Records which of a network's parameters any torch function reads during a forward pass."""

    def __init__(self, parameters: Sequence[nn.Parameter]) -> None:
        super().__init__()
        self.ids = {id(p) for p in parameters}
        self.read: set[int] = set()

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: Sequence[Any] = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        for leaf in _pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and id(leaf) in self.ids:
                self.read.add(id(leaf))
        return func(*args, **kwargs)


def used_params(model: nn.Module, example: torch.Tensor) -> int:
    """Parameters a forward pass reads: what thop counts (it adds a module's parameters when it runs)."""
    parameters = list(model.parameters())
    reads = ParameterReads(parameters)
    with reads, torch.no_grad():
        model(example)
    return sum(p.numel() for p in parameters if id(p) in reads.read)


def counts(name: str, num_classes: int) -> dict[str, Any]:
    """Params (all, used) and MACs of one network, with the published figures and the differences."""
    with torch.device("meta"):  # shapes only: nothing is allocated, nothing computed
        model = build(name, num_classes)
        example = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)
    result = count(model, example)
    by_operator: dict[str, int] = result["macs_by_operator"]  # type: ignore[assignment]
    params, macs = int(result["params"]), int(result["macs"])  # type: ignore[arg-type]
    used = used_params(model, example)
    attention = sum(n for op, n in by_operator.items() if op in ATTENTION_OPERATORS)
    published = PUBLISHED[name]
    return {
        "params": params,
        "params_used": used,
        "macs": macs,
        "macs_attention": attention,  # the bmm part of macs
        "macs_by_operator": by_operator,
        "modules": result["modules"],
        "published": published,
        "vs_published": {
            "params": params / published["params"] - 1,
            "params_used": used / published["params"] - 1,
            "macs": macs / published["macs"] - 1,
            "macs_without_attention": (macs - attention) / published["macs"] - 1,
        },
    }


def cpu_bf16_flags() -> list[str]:
    """The CPU's native bf16 instruction-set flags (empty where it has none, or off Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    return sorted({flag for flag in flags if flag in CPU_BF16_FLAGS})


def dtypes_for(device: str) -> tuple[list[str], str | None]:
    """Dtypes to time on ``device`` and, where bf16 is left out, why."""
    if device == "cpu":
        if cpu_bf16_flags():
            return ["float32", "bf16"], None
        return ["float32"], (
            "bf16 not measured on this CPU: no native bf16 (neither avx512_bf16 nor amx_bf16 in "
            "/proc/cpuinfo); PyTorch would emulate it, and the figure would time the emulation"
        )
    if torch.cuda.is_bf16_supported():
        return ["float32", "bf16"], None
    return ["float32"], f"bf16 not measured: {torch.cuda.get_device_name()} has no bf16"


def check_output(name: str, out: torch.Tensor, batch: int, num_classes: int, dtype: str) -> None:
    """Fail loudly unless the call produced what a real forward pass produces."""
    if out.shape != (batch, num_classes):
        raise RuntimeError(f"{name}: output {tuple(out.shape)}, expected {(batch, num_classes)}")
    if dtype == "bf16" and out.dtype != torch.bfloat16:
        raise RuntimeError(f"{name}: bf16 autocast produced {out.dtype}: autocast did not engage")
    if not torch.isfinite(out).all():
        raise RuntimeError(f"{name}: non-finite outputs")


def speed(
    models: dict[str, nn.Module],
    *,
    device: str,
    dtype: str,
    batches: Sequence[int],
    rounds: int,
    warmup: int,
    num_classes: int,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Faces/s of every network at every batch, interleaved: round r runs each network once, the
    order rotated by r so that none always runs first or after the same neighbour."""
    names = list(models)

    def call(name: str, x: torch.Tensor) -> float:
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=dtype == "bf16"):
            out = models[name](x)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        check_output(name, out, x.shape[0], num_classes, dtype)
        return seconds

    rows: list[dict[str, Any]] = []
    label = device_name(device)
    for batch in batches:
        torch.manual_seed(batch)
        x = torch.randn(batch, 3, INPUT_SIZE, INPUT_SIZE, device=device)
        x = x.contiguous(memory_format=torch.channels_last)
        for _ in range(warmup):
            for name in names:
                call(name, x)
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                times[name].append(call(name, x))
        for name in names:
            seconds = statistics.median(times[name])
            rows.append(
                {
                    "network": name,
                    "device": device,
                    "device_name": label,
                    "dtype": dtype,
                    "batch": batch,
                    "faces_per_s": batch / seconds,
                    "ms_per_batch": 1000 * seconds,
                    "rounds": rounds,
                }
            )
            log(f"[{label}] {dtype} batch {batch} {LABELS.get(name, name)}: {batch / seconds:,.1f} faces/s")
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Faces/s relative to FERMam's, per device, dtype and batch."""
    out: list[dict[str, Any]] = []
    keys = sorted({(r["device"], r["dtype"], r["batch"]) for r in rows})
    for device, dtype, batch in keys:
        same = {
            r["network"]: r["faces_per_s"]
            for r in rows
            if (r["device"], r["dtype"], r["batch"]) == (device, dtype, batch)
        }
        out.append(
            {"device": device, "dtype": dtype, "batch": batch}
            | {name: same[name] / same["fermam"] for name in NETWORKS if name in same}
        )
    return out


def format_report(report: dict[str, Any]) -> str:
    """The JSON report as two plain tables."""
    lines = [
        f"{'network':<10}{'params':>10}{'used':>10}{'MACs':>10}{'attn':>8}   published (source)",
    ]
    for name in NETWORKS:
        row = report[name]
        pub = row["published"]
        lines.append(
            f"{LABELS[name]:<10}{row['params'] / 1e6:>9.2f}M{row['params_used'] / 1e6:>9.2f}M"
            f"{row['macs'] / 1e9:>9.2f}G{row['macs_attention'] / 1e9:>7.2f}G   "
            f"{pub['params'] / 1e6:.2f} M / {pub['macs'] / 1e9:.2f} G ({pub['source']})"
        )
    lines.append(
        "params: every parameter; used: those a forward pass reads; MACs: conv / linear / matmul "
        "multiply-adds, attn: the attention-matmul (bmm) part, which thop does not see."
    )
    for note in report["run"]["notes"]:
        lines.append(note)
    if "load_average_after" in report["run"]:
        run = report["run"]
        lines.append(
            f"{run['cpu']}, {run['torch_threads']} torch threads; 1-min load average "
            f"{run['load_average_before']:.2f} before, {run['load_average_after']:.2f} after"
        )
    for ratio in report["run"].get("speed_ratios", []):
        faces = {
            name: next(
                r["faces_per_s"]
                for r in report[name]["speed"]
                if (r["device"], r["dtype"], r["batch"]) == (ratio["device"], ratio["dtype"], ratio["batch"])
            )
            for name in NETWORKS
        }
        lines.append(
            f"{ratio['device']} {ratio['dtype']} batch {ratio['batch']:>3}: "
            + "  ".join(f"{LABELS[n]} {faces[n]:,.1f}" for n in NETWORKS)
            + " faces/s; ratio "
            + " : ".join(f"{ratio[n]:.2f}" for n in NETWORKS)
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object (progress on stderr)")
    parser.add_argument("--no-speed", action="store_true", help="counts alone")
    parser.add_argument("--device", default="cpu", help="where to time: cpu, cuda or cpu,cuda (default cpu)")
    parser.add_argument("--batches", default="1,8,64", help="comma list of batch sizes (default 1,8,64)")
    parser.add_argument("--rounds", type=int, help="timed rounds per batch (default: cpu 3, cuda 20)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default: cpu 1, cuda 5)")
    parser.add_argument("--classes", type=int, default=7, help="classes (default 7, the papers' RAF-DB)")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args(argv)

    devices = [d for d in args.device.split(",") if d]
    if unknown := set(devices) - {"cpu", "cuda"}:
        parser.error(f"unknown device(s): {', '.join(sorted(unknown))}")
    if "cuda" in devices and not args.no_speed and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.classes < 1:
        parser.error("--classes must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",") if b]

    def log(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    report: dict[str, Any] = {
        "run": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "cpu": cpu_model(),
            "torch_threads": torch.get_num_threads(),
            # Other work on the machine slows every figure; the ratios suffer less (interleaved).
            "load_average_before": os.getloadavg()[0],
            "classes": args.classes,
            "input": [3, INPUT_SIZE, INPUT_SIZE],
            "counting": "model.complexity.count (fermam complexity's counter), meta device, batch 1",
            "notes": [],
        }
    }
    for name in NETWORKS:
        report[name] = counts(name, args.classes)

    if not args.no_speed:
        rows: list[dict[str, Any]] = []
        for device in devices:
            torch.manual_seed(0)
            with torch.device(device):
                models = {name: build(name, args.classes) for name in NETWORKS}
            models = {n: m.to(memory_format=torch.channels_last) for n, m in models.items()}
            dtypes, skipped = dtypes_for(device)
            if skipped:
                report["run"]["notes"].append(f"{device}: {skipped}")
                log(f"[{device_name(device)}] {skipped}")
            rounds = args.rounds or DEFAULT_ROUNDS[device]
            warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP[device]
            for dtype in dtypes:
                rows += speed(
                    models,
                    device=device,
                    dtype=dtype,
                    batches=batches,
                    rounds=rounds,
                    warmup=warmup,
                    num_classes=args.classes,
                    log=log,
                )
            del models
        for name in NETWORKS:
            report[name]["speed"] = [
                {k: v for k, v in r.items() if k != "network"} for r in rows if r["network"] == name
            ]
        report["run"]["speed_ratios"] = ratios(rows)
        report["run"]["load_average_after"] = os.getloadavg()[0]

    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
