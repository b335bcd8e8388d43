"""bf16 autocast's numbers at float32's speed, for measuring bf16 accuracy on CPUs without bf16.

On a CPU without AVX512-BF16 or AMX, oneDNN runs bf16 convolutions and matrix products through
slow fallback kernels: FERMam under bf16 autocast ran 0.25-0.4 faces/s on the 2-core AVX2 machine
(float32: ~10), so scoring FER+ val took hours. Native bf16 hardware computes those products
exactly (a bf16 x bf16 product fits in float32) and accumulates them in float32, then rounds the
result to bf16. The float32 kernels do the same on the bf16 values upcast, so this mode runs
every convolution and matrix product of bf16 operands that way and rounds its output to bf16;
all other ops run as autocast leaves them (bf16 elementwise ops are fast on any CPU). Only the
order of the float32 sums differs from native kernels: the test holds this mode to real bf16
autocast on FER+ faces (tests/model/test_bf16_emulation.py).

    with torch.autocast("cpu", dtype=torch.bfloat16), emulated_bf16():
        logits = model(batch)

The mode is thread-local (torch dispatch modes are): enter it on the thread that runs the model.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

aten = torch.ops.aten

# Under inference mode a dispatch mode sees composite ops whole (conv2d, linear, matmul, einsum),
# after autocast has cast their operands and before they decompose; the lower-level products are
# listed too for callers outside inference mode. einsum is special: autocast does not cast it, and
# the decomposition the mode runs then skips autocast, so its mixed bf16/float32 operands would
# fail; natively autocast casts them to bf16 at the inner bmm, and so does this mode.
PRODUCTS = frozenset(
    {
        aten.conv1d.default,
        aten.conv2d.default,
        aten.linear.default,
        aten.matmul.default,
        aten.einsum.default,
        aten.convolution.default,
        aten._convolution.default,
        aten.mm.default,
        aten.addmm.default,
        aten.bmm.default,
        aten.baddbmm.default,
        aten.addbmm.default,
    }
)


class EmulatedBF16(TorchDispatchMode):
    """Convolutions and matrix products of bf16 tensors in float32 kernels, rounded to bf16."""

    def __init__(self) -> None:
        super().__init__()
        self.emulated_calls = 0  # how many products ran emulated: a check that the mode saw them
        self.autocast_bf16 = False

    def __enter__(self) -> EmulatedBF16:
        # Autocast reads as off inside __torch_dispatch__, so its state is taken here: enter the
        # mode inside the autocast context.
        self.autocast_bf16 = (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        )
        return super().__enter__()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func not in PRODUCTS:
            return func(*args, **kwargs)
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]  # einsum: a list
        # einsum's operands arrive uncast (float32 ones too): under bf16 autocast its inner bmm
        # would run in bf16, so it is emulated whenever that autocast is on.
        if not any(t.dtype == torch.bfloat16 for t in tensors) and not (
            func is aten.einsum.default and self.autocast_bf16
        ):
            return func(*args, **kwargs)
        self.emulated_calls += 1

        def up(value: Any) -> Any:
            # Every floating operand as autocast would hand it to a bf16 kernel (rounded to bf16),
            # then widened: the float32 kernel multiplies exactly the values a bf16 kernel would.
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value.to(torch.bfloat16).float()
            return value

        out = func(*tree_map(up, args), **tree_map(up, kwargs))
        return out.to(torch.bfloat16)


@contextlib.contextmanager
def emulated_bf16() -> Iterator[EmulatedBF16]:
    with EmulatedBF16() as mode:
        yield mode


def with_emulated_bf16(forward: Callable[..., Any]) -> Callable[..., Any]:
    """`forward` run inside the mode on whichever thread calls it (the service's classify worker).

    The wrapper counts the products it emulated in `.emulated_calls`: a caller can check that the
    mode really ran (a forward that bypassed it would measure float32).
    """

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        with emulated_bf16() as mode:
            out = forward(*args, **kwargs)
        run.emulated_calls += mode.emulated_calls  # type: ignore[attr-defined]
        return out

    run.emulated_calls = 0  # type: ignore[attr-defined]
    return run
