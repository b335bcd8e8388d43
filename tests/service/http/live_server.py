"""Start a real `fermam serve` on a loopback port for end-to-end tests (shared by test modules)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def live_server(weights_path: Path, *extra: str) -> Iterator[str]:
    """The base URL of a ready server; killed on exit."""
    port = free_port()
    command = [
        sys.executable, "-m", "service.cli", "serve", "--port", str(port),
        "--weights", str(weights_path), "--device", "cpu", "--log-level", "warning", *extra,
    ]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"server exited with {process.returncode}: {process.stdout.read().decode()[-2000:]}"
                )
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server never became ready")
            time.sleep(0.2)
        yield base
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
