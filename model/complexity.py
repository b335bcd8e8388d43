"""`fermam complexity`: parameters and multiply-accumulates (MACs) of FERMam, per module and in total.

MACs are counted as thop counts them for the paper's figure: one per multiply-add of a convolution,
linear layer or matrix product (PyTorch's flop counter reports 2 FLOPs for each). Normalisations,
activations, pooling and the element-wise part of the selective-scan recurrence are not counted.
Parameters are every parameter of the network, including the landmark branch's 68-point
regression head, which FERMam.forward does not run (the released model also carries, and thop
counts, a head on its MobileFaceNet: a 512-d one it runs and discards).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from model.config import AFFECTNET8_CLASSES, FERPLUS_CLASSES, RAFDB_CLASSES, FERMamConfig

if TYPE_CHECKING:  # torch is imported when counting, so `fermam complexity --help` stays fast
    import torch
    from torch import nn

    from model.fermam import FERMam

# The released code's figures (thop, 8 classes, 112x112 branches), which ours must stay near.
REFERENCE_PARAMS = 26_990_000
REFERENCE_MACS = 5_960_000_000


def default_class_names(count: int) -> tuple[str, ...]:
    """FER+ names for 8, RAF-DB names for 7, placeholders otherwise."""
    for names in (FERPLUS_CLASSES, RAFDB_CLASSES, AFFECTNET8_CLASSES):
        if len(names) == count:
            return names
    return tuple(f"class_{i}" for i in range(count))


def measure(model: FERMam) -> dict[str, object]:
    """{"params", "macs", "modules": {child: {"params", "macs"}}} for one face at the contract's size."""
    import torch

    size = model.config.contract.input_size
    device = next(model.parameters()).device
    return count(model, torch.zeros(1, 3, size, size, device=device))


def count(model: nn.Module, example: torch.Tensor) -> dict[str, object]:
    """Parameters and MACs of any network for one forward pass of ``example``, per child too.

    The one counting method of the project: bench/compare_models.py counts the reference networks
    with it, so their figures and FERMam's differ only by the networks. ``macs_by_operator`` splits
    the total by ATen operator (convolution, addmm, bmm, ...), which tells a caller how much comes
    from activation-by-activation products (attention's bmm) that thop, hooking modules, misses.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, depth=2)
    with counter, torch.no_grad():
        model(example)
    model.train(was_training)
    flops = counter.get_flop_counts()
    root = type(model).__name__

    def module_macs(name: str) -> int:
        return int(sum(flops.get(f"{root}.{name}", {}).values()) // 2)

    modules: dict[str, dict[str, int]] = {}
    for name, child in model.named_children():
        modules[name] = {"params": _count(child), "macs": module_macs(name)}
    by_operator = {str(op): int(n // 2) for op, n in flops.get("Global", {}).items()}
    return {
        "params": _count(model),
        "macs": int(counter.get_total_flops() // 2),
        "modules": modules,
        "macs_by_operator": by_operator,
    }


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def format_table(result: dict[str, object]) -> str:
    modules: dict[str, dict[str, int]] = result["modules"]  # type: ignore[assignment]
    lines = [f"{'module':<18}{'params':>14}{'MACs':>18}"]
    for name, row in modules.items():
        lines.append(f"{name:<18}{row['params']:>14,}{row['macs']:>18,}")
    params, macs = int(result["params"]), int(result["macs"])  # type: ignore[arg-type]
    lines.append(f"{'total':<18}{params:>14,}{macs:>18,}")
    lines.append(
        f"= {params / 1e6:.2f} M parameters, {macs / 1e9:.2f} G MACs per face "
        f"(released code, thop: {REFERENCE_PARAMS / 1e6:.2f} M, {REFERENCE_MACS / 1e9:.2f} G; "
        f"ours {100 * (params / REFERENCE_PARAMS - 1):+.1f}%, {100 * (macs / REFERENCE_MACS - 1):+.1f}%)"
    )
    lines.append(
        "MACs: conv / linear / matmul multiply-adds (thop's convention); parameters include the "
        "landmark branch's 68-point head, which FERMam.forward does not run."
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fermam complexity", description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=8, help="number of classes (default 8)")
    parser.add_argument("--weights", help="a FERMam checkpoint: use its config (classes) instead")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    if args.weights:
        from model.checkpoint import read_metadata

        config = read_metadata(args.weights)["config"]
    else:
        if args.classes < 1:
            parser.error("--classes must be positive")
        config = FERMamConfig(class_names=default_class_names(args.classes))
    import torch

    from model.fermam import FERMam

    # Counting needs shapes only: a meta-device network allocates nothing and runs in a blink.
    with torch.device("meta"):
        model = FERMam(config)
    result = measure(model)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
