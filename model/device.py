"""Where the network runs: one resolution of "auto"/"cpu"/"cuda[:N]" for training, evaluation and serving."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """ "auto" is CUDA when present, else the CPU; asking for CUDA without it is an error, not a
    silent fall back to a CPU a hundred times slower."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


# CPU flags (as /proc/cpuinfo spells them) whose presence means bf16 matmuls and convolutions run
# in hardware: AVX512-BF16 (Cooper Lake, Zen 4 and later) or AMX (Sapphire Rapids and later). On
# CPUs without them oneDNN emulates bf16, and autocast runs slower than float32 (measured 3x slower
# on an AVX2-only AMD EPYC: docs/benchmarks.md).
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def _cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU runs bf16 natively: torch's own probe when it reports AMX, else the
    kernel's flags (torch's capability string says AVX512 for Zen 4 whether or not it has BF16)."""
    if "AMX" in torch.backends.cpu.get_cpu_capability():
        return True
    return bool(_cpu_flags(cpuinfo) & NATIVE_BF16_CPU_FLAGS)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """ "auto" is bfloat16 on CUDA and on CPUs with native bf16, float32 on other CPUs (where
    bf16 would be emulated, and slower than float32)."""
    if name == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
