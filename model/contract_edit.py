"""`fermam contract`: show a checkpoint's input contract and scoring rule, or write a copy with
some contract fields changed.

Preprocessing choices measured after training (the template's scale, what fills a crop's
corners) belong in the checkpoint, the one source of truth the service reads, not in service
settings; this writes them there without touching the weights. The scoring rule (temperature and
logit adjustment, model/scoring.py) travels in the same config; `fermam calibrate` writes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

from model.config import FERMamConfig, InputContract

# Fields a user may set; the template itself comes from training (`fermam pseudo-landmarks`).
EDITABLE = ("template_scale", "padding", "colour_mode")


def parse_assignment(text: str) -> tuple[str, Any]:
    """'name=value' for an editable contract field, the value converted to the field's type."""
    name, sep, raw = text.partition("=")
    if not sep or name not in EDITABLE:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME one of {', '.join(EDITABLE)}")
    kind = typing.get_type_hints(InputContract)[name]
    try:
        return name, float(raw) if kind is float else raw
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{name}: {error}") from None


def contract_summary(contract: InputContract) -> dict[str, Any]:
    """The contract without its 68 template points (what a person wants to read)."""
    summary = dataclasses.asdict(contract)
    summary["template"] = f"{len(contract.template)} points"
    return summary


def scoring_summary(config: FERMamConfig) -> dict[str, Any]:
    """How logits become scores: scores = softmax((logits - prior_exponent * log(class_prior)) /
    temperature); the prior per class name, or None where the checkpoint has none."""
    prior = config.class_prior
    return {
        "temperature": config.temperature,
        "prior_exponent": config.prior_exponent,
        "class_prior": None if prior is None else dict(zip(config.class_names, prior, strict=True)),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fermam contract", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="checkpoint (default: the shipped model)")
    parser.add_argument(
        "--set",
        dest="assignments",
        action="append",
        type=parse_assignment,
        default=[],
        metavar="NAME=VALUE",
        help=f"change a field ({', '.join(EDITABLE)}); needs --out",
    )
    parser.add_argument("--out", type=Path, help="write the changed checkpoint here")
    parser.add_argument("--version", help="model version written into --out's metadata")
    parser.add_argument("--note", help="why: stored as the 'preprocessing' metadata of --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.assignments and args.out is None:
        parser.error("--set needs --out (the shipped checkpoint is never changed in place)")
    import torch

    from model.checkpoint import load_checkpoint, provenance_of, save_checkpoint
    from model.weights import default_weights_path

    weights = Path(args.weights or default_weights_path())
    if not weights.is_file():
        print(f"fermam contract: no checkpoint at {weights}", file=sys.stderr)
        return 1
    model, metadata = load_checkpoint(weights, map_location="cpu")
    if args.out is None:
        summary = contract_summary(model.config.contract) | {"scoring": scoring_summary(model.config)}
        print(json.dumps(summary, indent=2))
        return 0
    try:
        contract = dataclasses.replace(model.config.contract, **dict(args.assignments))
    except ValueError as error:
        print(f"fermam contract: {error}", file=sys.stderr)
        return 2
    model.config = dataclasses.replace(model.config, contract=contract)
    kept = provenance_of(metadata)
    if args.version:
        kept["version"] = args.version
    if args.note:
        kept["preprocessing"] = args.note
    save_checkpoint(args.out, model, metadata=kept, dtype=torch.float16)
    print(json.dumps(contract_summary(contract) | {"out": str(args.out)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
