"""The selective scan: PyTorch backend against a float64 sequential reference, backend selection,
and (on a GPU with mamba-ssm) the fused kernel against the PyTorch backend."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from model import scan
from model.scan import available_backends, resolve_backend, selective_scan, set_scan_backend


def reference_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The recurrence written out step by step in float64, one batch element at a time."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = torch.log1p(torch.exp(delta))
    batch, dim, length = u.shape
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    per_group = dim // B.shape[1]
    group_of_channel = torch.arange(dim) // per_group
    outputs = []
    for b in range(batch):
        h = torch.zeros(dim, A.shape[1], dtype=torch.float64)
        ys = []
        for t in range(length):
            B_t = B[b, group_of_channel, :, t]  # (d, n): each channel's group's B at step t
            C_t = C[b, group_of_channel, :, t]
            h = torch.exp(delta[b, :, t, None] * A) * h + delta[b, :, t, None] * B_t * u[b, :, t, None]
            ys.append((h * C_t).sum(-1))
        outputs.append(torch.stack(ys, dim=-1))
    y = torch.stack(outputs)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return y


def random_inputs(batch, dim, length, n_states, groups, seed=0, full=True):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).requires_grad_()

    bc_shape = (batch, groups, n_states, length) if groups else (batch, n_states, length)
    inputs = {
        "u": rand(batch, dim, length),
        "delta": rand(batch, dim, length, scale=0.5),
        "A": (-torch.exp(torch.randn(dim, n_states, generator=gen) * 0.5)).requires_grad_(),
        "B": rand(*bc_shape),
        "C": rand(*bc_shape),
    }
    if full:
        inputs.update(
            D=rand(dim), z=rand(batch, dim, length), delta_bias=rand(dim, scale=0.5), delta_softplus=True
        )
    else:  # positive step sizes without softplus
        inputs["delta"] = (torch.rand(batch, dim, length, generator=gen) * 0.3).requires_grad_()
    return inputs


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


CASES = [
    # (batch, dim, length, n_states, groups, full)
    (2, 6, 1, 4, None, True),
    (3, 8, 9, 16, None, False),
    (2, 8, 9, 4, 4, True),
    (2, 16, 49, 16, None, True),
    (2, 16, 49, 16, 4, True),
    (1, 4, 49, 3, 2, False),
]


@pytest.mark.parametrize(("batch", "dim", "length", "n_states", "groups", "full"), CASES)
def test_torch_scan_matches_float64_reference(batch, dim, length, n_states, groups, full):
    inputs = random_inputs(batch, dim, length, n_states, groups, full=full)
    y = selective_scan(**inputs, backend="torch")
    expected = reference_scan(**inputs)
    assert y.dtype == torch.float32 and y.shape == (batch, dim, length)
    assert relative_error(y, expected) < 2e-6


@pytest.mark.parametrize(("batch", "dim", "length", "n_states", "groups", "full"), CASES)
def test_torch_scan_gradients_match_float64_reference(batch, dim, length, n_states, groups, full):
    inputs = random_inputs(batch, dim, length, n_states, groups, full=full)
    tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    weights = torch.randn(batch, dim, length, generator=torch.Generator().manual_seed(1))

    grads = torch.autograd.grad(
        (selective_scan(**inputs, backend="torch") * weights).sum(), list(tensors.values())
    )
    expected = torch.autograd.grad(
        (reference_scan(**inputs) * weights.double()).sum(), list(tensors.values())
    )
    for name, grad, ref in zip(tensors, grads, expected, strict=True):
        assert relative_error(grad, ref) < 1e-5, name


def test_torch_scan_handles_strided_inputs_and_broadcast_gradients():
    """Views with unusual strides in, an expanded (stride-0) gradient back from .sum()."""
    inputs = random_inputs(2, 8, 9, 4, 2)
    strided = dict(inputs)
    # Same values, channel-last storage: (b, l, d) memory viewed as (b, d, l).
    strided["u"] = inputs["u"].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    strided["B"] = inputs["B"].detach().permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1).requires_grad_()
    tensors = [strided[k] for k in ("u", "delta", "A", "B", "C")]
    grads = torch.autograd.grad(selective_scan(**strided, backend="torch").sum(), tensors)
    expected = torch.autograd.grad(reference_scan(**strided).sum(), tensors)
    for grad, ref in zip(grads, expected, strict=True):
        assert relative_error(grad, ref) < 1e-5


def test_torch_scan_is_float32_under_bf16_autocast():
    inputs = random_inputs(2, 8, 9, 4, None)
    bf16 = {k: v.detach().bfloat16() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = selective_scan(**bf16, backend="torch")
    assert y.dtype == torch.float32
    expected = reference_scan(**bf16)  # same bf16-rounded inputs, float64 arithmetic
    assert relative_error(y, expected) < 2e-6


def test_backend_selection_on_cpu():
    u = torch.zeros(1, 2, 3)
    assert "torch" in available_backends()
    assert resolve_backend(u) == "torch"
    assert resolve_backend(u, "auto") == "torch"
    with pytest.raises(RuntimeError):
        resolve_backend(u, "mamba")  # CPU tensors (and, here, no mamba-ssm)
    with pytest.raises(ValueError):
        resolve_backend(u, "cuda-please")


def test_forced_backend_by_function_and_environment():
    inputs = random_inputs(1, 4, 9, 4, None)
    try:
        set_scan_backend("torch")
        assert scan.get_scan_backend() == "torch"
        traced = selective_scan(**inputs)
        scan.set_scan_compile(False)  # the variant torch.compile must not trace into
        assert torch.equal(selective_scan(**inputs), traced)
    finally:
        set_scan_backend(None)
        scan.set_scan_compile(True)
    assert scan.get_scan_backend() == "auto"
    code = "from model.scan import get_scan_backend; print(get_scan_backend())"
    env = {**os.environ, scan.BACKEND_ENV_VAR: "torch"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"


needs_mamba = pytest.mark.skipif(
    not torch.cuda.is_available() or "mamba" not in available_backends(),
    reason="needs CUDA and mamba-ssm's compiled kernel",
)


@pytest.mark.gpu
@needs_mamba
@pytest.mark.parametrize(
    ("batch", "dim", "length", "n_states", "groups", "full"),
    [
        (8, 2048, 49, 16, 4, True),
        (8, 1024, 49, 16, None, False),
        (8, 1024, 9, 16, None, False),
        (4, 64, 1, 16, 2, True),
    ],
)
def test_mamba_backend_matches_torch_backend_forward_and_backward(batch, dim, length, n_states, groups, full):
    """SS2D shapes (4 directions x 512, grouped B/C) and ASFR shapes (one group, L = 49, 9, 1)."""
    cpu_inputs = random_inputs(batch, dim, length, n_states, groups, full=full)
    results = {}
    for backend in ("torch", "mamba"):
        inputs = {
            k: v.detach().cuda().requires_grad_() if isinstance(v, torch.Tensor) else v
            for k, v in cpu_inputs.items()
        }
        tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        y = selective_scan(**inputs, backend=backend)
        weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).cuda()
        grads = torch.autograd.grad((y * weights).sum(), list(tensors.values()))
        results[backend] = (y, dict(zip(tensors, grads, strict=True)))
    (y_t, g_t), (y_m, g_m) = results["torch"], results["mamba"]
    assert relative_error(y_m, y_t.double()) < 1e-4
    for name in g_t:
        assert relative_error(g_m[name], g_t[name].double()) < 1e-3, name
