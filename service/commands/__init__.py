"""The `fermam` subcommands that run the service or its engine, one module a command.

Each exposes `main(argv: list[str]) -> int`; `service/cli.py` maps command names to modules and
imports one only when its command runs. The model's own commands (`train`, `contract`,
`complexity`) live in `model/`, which must not import `service/`.
"""
