"""FERMam on the CPU through a faster runtime than eager PyTorch, behind the same contract.

Every runtime takes the same (B, 3, S, S) float32 batch the engine builds from aligned crops and
returns (B, classes) float32 logits; plain PyTorch (`torch`) is the reference the others are held
to (tests/service/engine/test_cpu_runtime.py). The checkpoint is the same safetensors file: the
ONNX / OpenVINO graph is exported from the loaded model at the first start and cached in the
temporary folder under the weights' sha256, never shipped beside the weights, so it cannot drift
from them.

The selective scan exports cleanly: its torch backend is a fixed 49-step loop of in-place
multiply-adds that torch.export functionalises and unrolls (static sequence length), so no custom
operator is needed. The mamba-ssm CUDA kernel is never used on the CPU.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

CPU_RUNTIMES = ("torch", "torch-compile", "onnx", "openvino")
OPTIONAL_RUNTIME_PACKAGES = {
    "onnx": "onnxruntime, onnx, onnxscript",
    "openvino": "openvino, onnx, onnxscript",
}

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


def export_onnx(model: nn.Module, path: Path, input_size: int) -> Path:
    """The network as an ONNX graph with a dynamic batch dimension (torch.export based exporter)."""
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
            optimize=True,
        )
    program.save(str(path))
    return path


def exported_onnx(model: nn.Module, input_size: int, cache_key: str) -> Path:
    """The ONNX export of `model`, cached in the temporary folder under `cache_key` (the weights'
    sha256): exporting the unrolled scan takes minutes on two cores, so only the first start pays."""
    path = Path(tempfile.gettempdir()) / f"fermam-{cache_key[:16]}.onnx"
    if not path.is_file():
        partial = path.with_suffix(f".{os.getpid()}.partial")
        export_onnx(model, partial, input_size)
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


def openvino_file_classifier(path: Path, threads: int = 0, dtype: torch.dtype = torch.float32) -> Classifier:
    """OpenVINO's CPU plugin on the exported ONNX graph, latency hint; float32 unless asked for bf16
    (OpenVINO would otherwise pick bf16 by itself on CPUs that have it)."""
    import openvino as ov

    core = ov.Core()
    config = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "bf16" if dtype == torch.bfloat16 else "f32",
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()

    def run(batch: torch.Tensor) -> torch.Tensor:
        result = request.infer({0: batch.float().contiguous().numpy()})
        return torch.from_numpy(result[compiled.output(0)].copy())

    return run


def build_classifier(
    model: nn.Module,
    runtime: str,
    *,
    input_size: int,
    dtype: torch.dtype = torch.float32,
    threads: int = 0,
    cache_key: str = "nokey",
) -> Classifier:
    """The classifier for `runtime` (one of CPU_RUNTIMES). A runtime whose package is missing fails
    here, at start-up, with the extra to install, not on the first request."""
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

            return openvino_file_classifier(exported_onnx(model, input_size, cache_key), threads, dtype)
    except ImportError as error:
        raise RuntimeError(
            f"cpu_runtime {runtime!r} needs {OPTIONAL_RUNTIME_PACKAGES[runtime]}: "
            "pip install 'fermam-service[cpu-runtimes]'"
        ) from error
    raise ValueError(f"unknown cpu_runtime {runtime!r}; expected one of {CPU_RUNTIMES}")
