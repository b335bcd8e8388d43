"""`--dtype auto`: bf16 exactly where the CPU runs it natively."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.device import cpu_has_native_bf16, resolve_dtype

FLAGS = "fpu vme de pse tsc msr pae mce cx8 apic sse sse2 avx avx2 fma"


def cpuinfo(tmp_path: Path, flags: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\n")
    return str(path)


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_bf16_flags_mean_native_bf16(tmp_path: Path, flag: str) -> None:
    assert cpu_has_native_bf16(cpuinfo(tmp_path, f"{FLAGS} avx512f {flag}"))


def test_avx2_or_plain_avx512_is_not_native_bf16(tmp_path: Path) -> None:
    if "AMX" in torch.backends.cpu.get_cpu_capability():
        pytest.skip("this CPU has AMX: torch's own probe answers before the flags")
    assert not cpu_has_native_bf16(cpuinfo(tmp_path, FLAGS))
    assert not cpu_has_native_bf16(cpuinfo(tmp_path, f"{FLAGS} avx512f avx512_vnni"))
    assert not cpu_has_native_bf16(str(tmp_path / "missing"))


def test_auto_dtype_follows_this_cpu_and_explicit_names_win() -> None:
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
