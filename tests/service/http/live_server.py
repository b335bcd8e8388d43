"""Start a real `fermam serve` on a loopback port for end-to-end tests (shared by test modules)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from server_process import REPO, free_port, start_server

__all__ = ["REPO", "free_port", "live_server"]


@contextmanager
def live_server(weights_path: Path, *extra: str) -> Iterator[str]:
    """The base URL of a ready server; killed on exit."""
    base, process = start_server(weights_path, *extra)
    try:
        yield base
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
