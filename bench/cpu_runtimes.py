"""FERMam's CPU runtimes side by side, in one interleaved run, held to the same accuracy limits.

Variants: eager fp32 (the reference), eager channels-last, eager bf16 autocast, torch.compile,
ONNX Runtime, OpenVINO, ONNX Runtime's int8 (dynamic quantisation of the exported graph) and
OpenVINO int8 (NNCF post-training quantisation, the engine's `openvino-int8`: the file of --int8,
made with `fermam quantize` from 300 FER+ train faces when it is absent).
Speed: rounds of every variant in turn (A B C ... A B C ...), so a noisy shared machine slows all
of them alike; the median of the rounds is reported. Accuracy: the first --faces FER+ val faces
through every variant: accuracy, top-1 agreement with the reference and the largest probability
difference. A variant that moves accuracy by more than --max-accuracy-drop points fails.

    python bench/cpu_runtimes.py --faces 256 --rounds 5 --batch 8
    python bench/cpu_runtimes.py --variants eager,onnx --onnx /tmp/fermam.onnx  # reuse an export
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine import cpu_model  # noqa: E402  (bench/machine.py, beside this script)

from model.checkpoint import load_checkpoint  # noqa: E402
from model.data.transforms import to_model_input  # noqa: E402
from model.device import cpu_has_native_bf16  # noqa: E402
from model.scoring import class_scores  # noqa: E402
from model.weights import default_weights_path  # noqa: E402
from service.engine import cpu_runtime as rt  # noqa: E402

VAL = REPO / ".." / "shared" / "data" / "ferplus" / "val.npz"
TRAIN = REPO / ".." / "shared" / "data" / "ferplus" / "train.npz"
ALL = "eager,channels-last,bf16,compile,onnx,openvino,onnx-int8,openvino-int8"


def build(
    name: str, model: torch.nn.Module, onnx_path: Path, threads: int, int8_path: Path
) -> Callable[[torch.Tensor], torch.Tensor]:
    size = model.config.contract.input_size
    if name == "openvino-int8":
        from service.commands import quantize
        from service.engine.pipeline import file_sha256

        if not int8_path.is_file():
            quantize.main(["--data", str(TRAIN), "--out", str(int8_path)])
        sha = file_sha256(default_weights_path())
        return rt.openvino_file_classifier(rt.read_int8_model(int8_path, sha), threads)
    if name == "eager":
        return rt.torch_classifier(model)
    if name == "bf16":
        return rt.torch_classifier(model, torch.bfloat16)
    if name == "channels-last":
        import copy

        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        ref = rt.torch_classifier(cl)
        return lambda x: ref(x.contiguous(memory_format=torch.channels_last))
    if name == "compile":
        return rt.compiled_classifier(model)
    if not onnx_path.is_file():
        started = time.perf_counter()
        rt.export_onnx(model, onnx_path, size)
        print(f"# ONNX export: {time.perf_counter() - started:.0f} s", flush=True)
    if name == "onnx":
        return rt.onnx_session_classifier(onnx_path, threads)
    if name == "openvino":
        return rt.openvino_file_classifier(onnx_path, threads)
    if name == "onnx-int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        int8 = onnx_path.with_suffix(".int8.onnx")
        if not int8.is_file():
            quantize_dynamic(str(onnx_path), str(int8), weight_type=QuantType.QInt8)
        return rt.onnx_session_classifier(int8, threads)
    raise SystemExit(f"unknown variant {name!r}; choose from {ALL}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=ALL)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--faces", type=int, default=256, help="FER+ val faces for the accuracy check")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-accuracy-drop", type=float, default=0.3, help="points")
    parser.add_argument("--onnx", type=Path, default=Path("/tmp/fermam-bench.onnx"), help="export cache")
    parser.add_argument(
        "--int8", type=Path, default=Path("/tmp/fermam-bench.int8.xml"), help="int8 file (made if absent)"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, _ = load_checkpoint(default_weights_path(), map_location="cpu")
    model.eval()
    contract = model.config.contract
    data = np.load(VAL)
    faces = to_model_input(data["images"][: args.faces], contract)
    names = [str(n) for n in data["class_names"]]
    order = [list(model.config.class_names).index(n) for n in names]
    labels = torch.from_numpy(data["labels"][: args.faces])
    print(
        f"# {cpu_model()}, {args.threads} threads, torch {torch.__version__}, "
        f"native bf16: {cpu_has_native_bf16()}"
    )

    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for name in args.variants.split(","):
        started = time.perf_counter()
        try:
            variants[name] = build(name, model, args.onnx, args.threads, args.int8)
            variants[name](faces[: args.batch])  # first call: compiles / allocates
        except Exception as error:  # a runtime that cannot take the network is a result, not a crash
            print(f"{name}: FAILED to build: {type(error).__name__}: {str(error)[:300]}", flush=True)
            variants.pop(name, None)
            continue
        print(f"# {name}: ready in {time.perf_counter() - started:.1f} s", flush=True)

    reference = None
    accuracy: dict[str, tuple[float, float, float]] = {}
    for name, run in variants.items():
        logits = torch.cat([run(faces[i : i + 32]) for i in range(0, len(faces), 32)])
        probs = class_scores(logits, model.config)[:, order]  # the service's scores
        top1 = probs.argmax(1)
        if reference is None:
            reference = (probs, top1)
        acc = 100 * (top1 == labels).float().mean().item()
        agree = 100 * (top1 == reference[1]).float().mean().item()
        accuracy[name] = (acc, agree, (probs - reference[0]).abs().max().item())

    times: dict[str, list[float]] = {name: [] for name in variants}
    batch = faces[: args.batch]
    for _ in range(args.rounds):
        for name, run in variants.items():
            started = time.perf_counter()
            run(batch)
            times[name].append(time.perf_counter() - started)

    base = statistics.median(times[next(iter(variants))])
    ref_acc = accuracy[next(iter(variants))][0]
    print(
        f"\n| variant | faces/s at batch {args.batch} | vs first | FER+ val acc ({args.faces} faces) | "
        "top-1 agreement | max prob diff | accuracy limit |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in variants:
        median = statistics.median(times[name])
        acc, agree, diff = accuracy[name]
        ok = "ok" if ref_acc - acc <= args.max_accuracy_drop else "FAIL"
        print(
            f"| {name} | {args.batch / median:.1f} | {base / median:.2f}x | {acc:.1f}% | {agree:.1f}% | "
            f"{diff:.2e} | {ok} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
