"""The `fermam` command: one entry point, subcommands implemented in their own modules.

Each subcommand module exposes ``main(argv: list[str]) -> int`` and builds its own argument
parser, so adding a command never touches another's options and `fermam --help` stays fast
(modules are imported only when their command runs).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("service.commands.serve", "run the HTTP service"),
    "predict": (
        "service.commands.predict",
        "faces and expressions of photos, locally; --annotate draws them",
    ),
    "train": ("model.train_cli", "train FERMam (or its landmark branch)"),
    "eval": ("service.commands.photo_eval", "score weights on an npz split, or the pipeline on photos"),
    "calibrate": ("service.commands.calibrate", "fit the score temperature and report calibration error"),
    "contract": ("model.contract_edit", "show a checkpoint's input contract, or write it changed"),
    "quantize": ("service.commands.quantize", "write an int8 OpenVINO file of a checkpoint (openvino-int8)"),
    "complexity": ("model.complexity", "parameters and MACs per module"),
    "pseudo-landmarks": (
        "service.commands.pseudo_landmarks",
        "place 68-point pseudo-labels on training faces",
    ),
}


def _usage() -> str:
    lines = ["usage: fermam [--version] <command> [options]", "", "commands:"]
    lines += [f"  {name:<18}{help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("\n`fermam <command> --help` shows a command's options.")
    return "\n".join(lines)


def _version() -> str:
    try:
        return importlib.metadata.version("fermam-service")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout without installing
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        # A command is required: say so as argparse does (usage on stderr, status 2).
        print(f"{_usage()}\n\nfermam: a command is required", file=sys.stderr)
        return 2
    if args[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if args[0] in {"-V", "--version"}:
        print(f"fermam-service {_version()}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"fermam: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
