"""The selective scan shared by SS2D and ASFR, with two interchangeable backends.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t = C_t . h_t + D * u_t            (then optionally y_t * silu(z_t))

Shapes follow mamba-ssm's ``selective_scan_fn``: u, delta, z: (b, d, l); A: (d, n);
B, C: (b, n, l) or grouped (b, g, n, l) where channel c uses group c // (d / g); D, delta_bias: (d,).

Backends: "mamba" (mamba-ssm's fused CUDA kernel; optional, needs its compiled extension and CUDA
tensors) and "torch" (a loop over l vectorised over batch, channels and states; l is at most 49
here, so the loop is short). Both compute in float32 whatever the autocast state and return float32
(float64 inputs are scanned in float64, by the torch backend).
The backend is chosen per call: an explicit ``backend`` argument, else the one forced with
:func:`set_scan_backend` or the ``FERMAM_SCAN_BACKEND`` environment variable (read at import), else
"auto" (mamba-ssm for CUDA tensors when it imports, torch otherwise).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

BACKEND_ENV_VAR = "FERMAM_SCAN_BACKEND"
BACKENDS = ("auto", "torch", "mamba")


def _validated(name: str | None) -> str:
    name = (name or "auto").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {name!r}; expected one of {BACKENDS}")
    return name


_forced_backend: str = _validated(os.environ.get(BACKEND_ENV_VAR))
# torch.compile unrolls the torch backend's loop (49 steps, forward and backward): the result is
# fast but takes minutes to compile. Setting FERMAM_SCAN_COMPILE=0 (or set_scan_compile(False))
# keeps the scan eager inside compiled models, so only the rest of the network is compiled.
COMPILE_ENV_VAR = "FERMAM_SCAN_COMPILE"
_compile_scan: bool = os.environ.get(COMPILE_ENV_VAR, "1").strip().lower() not in {"0", "false", "no"}


_UNRESOLVED = object()
_mamba_fn: Any = _UNRESOLVED


def _mamba_scan_fn() -> Callable[..., torch.Tensor] | None:
    """mamba-ssm's selective_scan_fn, or None where it cannot be imported (looked up once).

    `import mamba_ssm` raises more than ImportError without its compiled extension (OSError for a
    missing CUDA library, RuntimeError for an ABI mismatch), so any exception means "not here".
    The SSM modules call this when they are built, so the import never happens inside a
    torch.compile'd forward (a plain global read is all the compiled code sees).
    """
    global _mamba_fn
    if _mamba_fn is _UNRESOLVED:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        except Exception:
            _mamba_fn = None
        else:
            _mamba_fn = selective_scan_fn
    return _mamba_fn


def available_backends() -> list[str]:
    """Concrete backends usable in this process ("torch" always; "mamba" when mamba-ssm imports)."""
    return ["torch"] + (["mamba"] if _mamba_scan_fn() is not None else [])


def set_scan_backend(name: str | None) -> None:
    """Force a backend for every later call ("torch", "mamba"), or back to "auto" with None."""
    global _forced_backend
    _forced_backend = _validated(name)


def set_scan_compile(enabled: bool) -> None:
    """Whether torch.compile may trace into the torch backend (True) or must call it eagerly."""
    global _compile_scan
    _compile_scan = bool(enabled)


def scan_compile_enabled() -> bool:
    return _compile_scan


def get_scan_backend() -> str:
    """The backend currently forced ("auto" when none is)."""
    return _forced_backend


def resolve_backend(u: torch.Tensor, backend: str | None = None) -> str:
    """The concrete backend a call with these tensors would use."""
    name = _validated(backend) if backend is not None else _forced_backend
    fused_ok = u.is_cuda and u.dtype != torch.float64  # the kernel has no float64 variant
    if name == "auto":
        return "mamba" if fused_ok and _mamba_scan_fn() is not None else "torch"
    if name == "mamba":
        if _mamba_scan_fn() is None:
            raise RuntimeError("selective-scan backend 'mamba' requested but mamba_ssm cannot be imported")
        if not fused_ok:
            raise RuntimeError("selective-scan backend 'mamba' needs CUDA tensors (float32 or narrower)")
    return name


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Autocast off for this device type (meta tensors, used for counting, have no autocast)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Run the selective scan; returns y of shape (b, d, l) in float32 (float64 for float64 u)."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (b, d, l); got {tuple(u.shape)} and {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(f"A must be (d, n) with d = {u.shape[1]}; got {tuple(A.shape)}")
    if B.dim() not in (3, 4) or C.dim() not in (3, 4):
        raise ValueError("B and C must be (b, n, l) or (b, g, n, l)")
    chosen = resolve_backend(u, backend)
    with _no_autocast(u.device):
        compute = torch.promote_types(u.dtype, torch.float32)
        args = [t.to(compute) if t is not None else None for t in (u, delta, A, B, C, D, z, delta_bias)]
        if chosen == "mamba":
            scan_fn = _mamba_scan_fn()
            assert scan_fn is not None  # resolve_backend checked
            u_, delta_, A_, B_, C_, D_, z_, bias_ = args
            return scan_fn(
                u_.contiguous(),
                delta_.contiguous(),
                A_.contiguous(),
                B_.contiguous(),
                C_.contiguous(),
                D=D_,
                z=z_,
                delta_bias=bias_,
                delta_softplus=delta_softplus,
                return_last_state=False,
            )
        scan_torch = _selective_scan_torch if _compile_scan else _selective_scan_torch_eager
        return scan_torch(*args, delta_softplus=delta_softplus)


def _selective_scan_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> torch.Tensor:
    """Pure-PyTorch scan: step-size transform, skip and gate through autograd; the recurrence itself
    through :class:`_LinearRecurrence` with a hand-written backward."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B4 = B if B.dim() == 4 else B.unsqueeze(1)  # (b, g, n, l)
    C4 = C if C.dim() == 4 else C.unsqueeze(1)
    groups = B4.shape[1]
    if u.shape[1] % groups or C4.shape[1] != groups:
        raise ValueError(f"d = {u.shape[1]} is not divisible into {groups} groups of B and C")
    y = _LinearRecurrence.apply(u, delta, A, B4, C4)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y


class _LinearRecurrence(torch.autograd.Function):
    """y_t = C_t . h_t with h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t, h_{-1} = 0.

    Works in a position-major (l, b, d, n) layout so each step is one in-place multiply-add on a
    contiguous slice. Autograd through a Python loop would keep every intermediate and launch
    several kernels a step; here the forward keeps only the states H, the backward recomputes the
    decays and runs the adjoint recurrence backwards (one multiply-add a step), and everything
    else is done in bulk.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B4, C4):
        batch, dim, length = u.shape
        groups, n_states = B4.shape[1], A.shape[1]
        per_group = dim // groups
        decay = torch.exp(delta.permute(2, 0, 1).unsqueeze(-1) * A)  # (l, b, d, n)
        drive = (delta * u).permute(2, 0, 1).reshape(length, batch, groups, per_group, 1)
        # Allocated explicitly so the layout is the contiguous one the in-place steps rely on,
        # whatever the strides of the inputs.
        H = u.new_empty(length, batch, groups, per_group, n_states)
        torch.mul(drive, B4.permute(3, 0, 1, 2).unsqueeze(3), out=H)  # delta u B
        H_flat = H.view(length, batch, dim, n_states)
        for t in range(1, length):
            H_flat[t].addcmul_(decay[t], H_flat[t - 1])
        # y_t = C_t . h_t as a batched (dg x n) @ (n x 1) product.
        y = torch.matmul(H, C4.permute(3, 0, 1, 2).unsqueeze(-1))  # (l, b, g, dg, 1)
        ctx.save_for_backward(u, delta, A, B4, C4, H)
        return y.view(length, batch, dim).permute(1, 2, 0).contiguous()

    @staticmethod
    def backward(ctx, grad_y):
        u, delta, A, B4, C4, H = ctx.saved_tensors
        batch, dim, length = u.shape
        groups, n_states = B4.shape[1], A.shape[1]
        per_group = dim // groups
        lbgd1 = (length, batch, groups, per_group, 1)
        gy = grad_y.permute(2, 0, 1).reshape(lbgd1)
        B_l = B4.permute(3, 0, 1, 2).unsqueeze(-1)  # (l, b, g, n, 1)
        C_l = C4.permute(3, 0, 1, 2).unsqueeze(-1)
        grad_C = torch.matmul(H.transpose(-1, -2), gy)  # (l, b, g, n, 1)

        # Adjoint states: G_t = C_t gy_t + exp(delta_{t+1} A) G_{t+1}.
        delta_l = delta.permute(2, 0, 1)  # (l, b, d)
        decay = torch.exp(delta_l.unsqueeze(-1) * A)  # (l, b, d, n)
        G = H.new_empty(H.shape)  # (l, b, g, dg, n), contiguous
        torch.mul(gy, C_l.transpose(-1, -2), out=G)
        G_flat = G.view(length, batch, dim, n_states)
        for t in range(length - 2, -1, -1):
            G_flat[t].addcmul_(decay[t + 1], G_flat[t + 1])

        drive = (delta * u).permute(2, 0, 1).reshape(lbgd1)
        grad_drive = torch.matmul(G, B_l).view(length, batch, dim)  # d loss / d (delta u)
        grad_B = torch.matmul(G.transpose(-1, -2), drive)  # (l, b, g, n, 1)
        # d loss / d (delta A) at step t >= 1 is G_t * h_{t-1} * exp(delta_t A); h_{-1} = 0.
        H_flat = H.view(length, batch, dim, n_states)
        grad_exponent = decay[1:].mul_(G_flat[1:]).mul_(H_flat[:-1])  # (l - 1, b, d, n)
        grad_A = torch.einsum("lbdn,lbd->dn", grad_exponent, delta_l[1:])
        grad_delta = grad_drive * u.permute(2, 0, 1)
        grad_delta[1:] += torch.einsum("lbdn,dn->lbd", grad_exponent, A)
        grad_u = grad_drive * delta_l

        def to_bdl(t: torch.Tensor) -> torch.Tensor:
            return t.permute(1, 2, 0).contiguous()

        def to_bgnl(t: torch.Tensor) -> torch.Tensor:
            return t.squeeze(-1).permute(1, 2, 3, 0).contiguous()

        return to_bdl(grad_u), to_bdl(grad_delta), grad_A, to_bgnl(grad_B), to_bgnl(grad_C)


_selective_scan_torch_eager = torch.compiler.disable(_selective_scan_torch)
