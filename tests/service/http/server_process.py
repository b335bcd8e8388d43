"""Start `fermam serve` as a real process on a loopback port, and talk to it over raw sockets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    weights: Path, *flags: str, ready_timeout_s: float = 180, log_path: Path | None = None
) -> tuple[str, subprocess.Popen]:
    """A ready server (readyz 200) and its process; the caller ends it. With `log_path`, its output
    goes to that file (a pipe nobody reads would block a server that logs a lot)."""
    port = free_port()
    command = [
        sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--weights", str(weights),
        "--device", "cpu", "--log-level", "warning", *flags,
    ]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO)}
    output = subprocess.PIPE if log_path is None else open(log_path, "wb")  # noqa: SIM115 - the child owns it
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
    if log_path is not None:
        output.close()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = process.stdout.read() if process.stdout else Path(log_path).read_bytes()
            raise RuntimeError(f"server exited with {process.returncode}: {text.decode()[-2000:]}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return base, process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server never became ready")


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


class RawResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> dict:
        return json.loads(self.body)


def read_response(sock: socket.socket, timeout_s: float) -> RawResponse:
    """Read one HTTP/1.1 response (Content-Length bodies, as the service sends them)."""
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return RawResponse(status, headers, body[:length])


def raw_request(
    base: str, head: bytes, body_part: bytes, *, timeout_s: float = 30
) -> tuple[RawResponse, float]:
    """Send the head and (part of) a body, then wait for the answer without sending more.

    Returns the response and the seconds from the last byte sent to the response.
    """
    with socket.create_connection(("127.0.0.1", port_of(base)), timeout=timeout_s) as sock:
        sock.sendall(head + body_part)
        sent = time.monotonic()
        response = read_response(sock, timeout_s)
        return response, time.monotonic() - sent


def post_head(path: str, content_type: str, length: int, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()
