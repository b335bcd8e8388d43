"""FERMam on the CPU through a faster runtime than eager PyTorch, behind the same contract.

Every runtime takes the same (B, 3, S, S) float32 batch the engine builds from aligned crops and
returns (B, classes) float32 logits; plain PyTorch (`torch`) is the reference the others are held
to (tests/service/engine/test_cpu_runtime.py). The checkpoint is the same safetensors file: the
ONNX / OpenVINO graph is exported from the loaded model at the first start and cached in the
temporary folder under the weights' sha256, never shipped beside the weights, so it cannot drift
from them.

`openvino-int8` is the one runtime whose file is made once, not at start: `fermam quantize`
(service/commands/quantize.py) runs NNCF's post-training quantisation on calibration faces and writes an
OpenVINO IR that records the sha256 of the weights it came from; the engine refuses an IR made from
other weights, so the int8 file cannot drift from the checkpoint either.

The selective scan exports cleanly: its torch backend is a fixed 49-step loop of in-place
multiply-adds that torch.export functionalises and unrolls (static sequence length), so no custom
operator is needed. The mamba-ssm CUDA kernel is never used on the CPU.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

CPU_RUNTIMES = ("torch", "torch-compile", "onnx", "openvino", "openvino-int8")
OPTIONAL_RUNTIME_PACKAGES = {
    "onnx": "onnxruntime, onnx, onnxscript",
    "openvino": "openvino, onnx, onnxscript",
    "openvino-int8": "openvino (and nncf, onnx, onnxscript to make the file)",
}
# Where an int8 IR records the weights it was quantised from (OpenVINO rt_info path).
INT8_SHA_KEY = ["fermam", "weights_sha256"]
INT8_CALIBRATION_KEY = ["fermam", "calibration"]


class Int8ModelMismatch(RuntimeError):
    """An int8 IR that was not quantised from the loaded weights (or carries no record of them)."""


Classifier = Callable[[torch.Tensor], torch.Tensor]


def _autocast(dtype: torch.dtype) -> torch.autocast:
    return torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)


def torch_classifier(model: nn.Module, dtype: torch.dtype = torch.float32) -> Classifier:
    """The reference: eager PyTorch, narrower dtypes as autocast (weights stay float32)."""

    @torch.inference_mode()
    def run(batch: torch.Tensor) -> torch.Tensor:
        with _autocast(dtype):
            return model(batch).float()

    return run


def compiled_classifier(model: nn.Module, dtype: torch.dtype = torch.float32) -> Classifier:
    """torch.compile (inductor); the first call of each new batch size compiles (minutes)."""
    compiled = torch.compile(model, dynamic=False)

    @torch.inference_mode()
    def run(batch: torch.Tensor) -> torch.Tensor:
        with _autocast(dtype):
            return compiled(batch).float()

    return run


def export_onnx(model: nn.Module, path: Path, input_size: int, *, optimize: bool = True) -> Path:
    """The network as an ONNX graph with a dynamic batch dimension (torch.export based exporter).

    `optimize=False` skips onnxscript's graph optimiser: 0.7 instead of ~2.3 minutes on two cores,
    and OpenVINO fuses the graph itself (same faces/s, docs/benchmarks.md); ONNX Runtime wants it.
    """
    example = torch.zeros(2, 3, input_size, input_size)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            model.eval(),
            (example,),
            dynamo=True,
            dynamic_shapes=({0: batch},),
            input_names=["faces"],
            output_names=["logits"],
            optimize=optimize,
        )
    program.save(str(path))
    return path


def exported_onnx(model: nn.Module, input_size: int, cache_key: str, *, optimize: bool = True) -> Path:
    """The ONNX export of `model`, cached in the temporary folder under `cache_key` (the weights'
    sha256): exporting the unrolled scan takes minutes on two cores, so only the first start pays."""
    suffix = ".onnx" if optimize else ".raw.onnx"
    path = Path(tempfile.gettempdir()) / f"fermam-{cache_key[:16]}{suffix}"
    if not path.is_file():
        partial = path.with_suffix(f".{os.getpid()}.partial")
        export_onnx(model, partial, input_size, optimize=optimize)
        partial.replace(path)  # atomic: a concurrent start never reads half a file
    return path


def onnx_session_classifier(path: Path, threads: int = 0) -> Classifier:
    """ONNX Runtime's CPU provider, all graph optimisations, `threads` intra-op threads (0: all cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(batch: torch.Tensor) -> torch.Tensor:
        (logits,) = session.run(["logits"], {"faces": batch.float().contiguous().numpy()})
        return torch.from_numpy(logits)

    return run


def openvino_file_classifier(
    path: Path | Any, threads: int = 0, dtype: torch.dtype = torch.float32
) -> Classifier:
    """OpenVINO's CPU plugin on the exported ONNX graph (a path, or an already read `ov.Model`),
    latency hint; float32 unless asked for bf16 (OpenVINO would otherwise pick bf16 by itself on
    CPUs that have it). An int8 IR runs its quantised layers in int8 whatever the hint."""
    import openvino as ov

    core = ov.Core()
    graph = core.read_model(str(path)) if isinstance(path, str | Path) else path
    config = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "bf16" if dtype == torch.bfloat16 else "f32",
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    compiled = core.compile_model(graph, "CPU", config)
    request = compiled.create_infer_request()

    def run(batch: torch.Tensor) -> torch.Tensor:
        result = request.infer({0: batch.float().contiguous().numpy()})
        return torch.from_numpy(result[compiled.output(0)].copy())

    return run


def quantize_openvino_int8(
    model: nn.Module,
    calibration: torch.Tensor,
    out: Path,
    *,
    weights_sha256: str,
    description: str,
) -> Path:
    """An OpenVINO IR of `model` with int8 convolutions and matrix products, written to `out`.

    NNCF's post-training quantisation (min-max statistics of every quantised input over the
    calibration faces, symmetric int8 weights, asymmetric int8 activations because PReLU outputs go
    negative, then fast bias correction) on the unoptimised ONNX export. `calibration` is (N, 3, S,
    S) model input, the same preprocessing as at inference; a few hundred faces are enough.
    """
    import nncf
    import openvino as ov

    size = int(calibration.shape[-1])
    onnx_path = exported_onnx(model, size, weights_sha256, optimize=False)
    graph = ov.Core().read_model(str(onnx_path))
    faces = calibration.float().contiguous().numpy()
    dataset = nncf.Dataset([faces[i : i + 1] for i in range(len(faces))])
    quantized = nncf.quantize(graph, dataset, subset_size=len(faces), preset=nncf.QuantizationPreset.MIXED)
    quantized.set_rt_info(weights_sha256, INT8_SHA_KEY)
    quantized.set_rt_info(description, INT8_CALIBRATION_KEY)
    out.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(out))  # also writes out.with_suffix(".bin")
    return out


def read_int8_model(path: Path, weights_sha256: str) -> Any:
    """The int8 IR at `path` as an `ov.Model`, after checking it was made from these weights."""
    import openvino as ov

    if not path.is_file():
        raise FileNotFoundError(
            f"int8 model not found: {path}; make it with `fermam quantize --data ... --out {path}`"
        )
    graph = ov.Core().read_model(str(path))
    recorded = graph.get_rt_info(INT8_SHA_KEY).astype(str) if graph.has_rt_info(INT8_SHA_KEY) else ""
    if recorded != weights_sha256:
        raise Int8ModelMismatch(
            f"{path} was quantised from weights {recorded[:16] or '(unrecorded)'}, not the loaded "
            f"{weights_sha256[:16]}; run `fermam quantize` again for these weights"
        )
    return graph


def build_classifier(
    model: nn.Module,
    runtime: str,
    *,
    input_size: int,
    dtype: torch.dtype = torch.float32,
    threads: int = 0,
    cache_key: str = "nokey",
    int8_model: Path | None = None,
) -> Classifier:
    """The classifier for `runtime` (one of CPU_RUNTIMES). A runtime whose package is missing fails
    here, at start-up, with the extra to install, not on the first request; so does an int8 file
    that is missing or was made from other weights (`cache_key` is the weights' sha256)."""
    if runtime == "torch":
        return torch_classifier(model, dtype)
    if runtime == "torch-compile":
        return compiled_classifier(model, dtype)
    try:
        if runtime == "onnx":
            import onnxruntime  # noqa: F401  (fail before the minutes of export)

            return onnx_session_classifier(exported_onnx(model, input_size, cache_key), threads)
        if runtime == "openvino":
            import openvino  # noqa: F401

            onnx_path = exported_onnx(model, input_size, cache_key, optimize=False)
            return openvino_file_classifier(onnx_path, threads, dtype)
        if runtime == "openvino-int8":
            if int8_model is None:
                raise ValueError(
                    "cpu_runtime 'openvino-int8' needs cpu_int8_model (FERMAM_CPU_INT8_MODEL): "
                    "the file `fermam quantize --data ... --out FILE` writes"
                )
            import openvino  # noqa: F401

            return openvino_file_classifier(read_int8_model(int8_model, cache_key), threads)
    except ImportError as error:
        raise RuntimeError(
            f"cpu_runtime {runtime!r} needs {OPTIONAL_RUNTIME_PACKAGES[runtime]}: "
            "pip install 'fermam-service[cpu-runtimes]'"
        ) from error
    raise ValueError(f"unknown cpu_runtime {runtime!r}; expected one of {CPU_RUNTIMES}")
