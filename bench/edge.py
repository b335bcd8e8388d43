"""The HTTP edge under abuse: what a huge header, many headers, slow headers and idle connections
cost the server (issue 23). Loopback only; starts its own server.

1. One request to /livez with a `--big-header-mb` header value: the answer, its time, and the
   server's resident memory before, after and at its peak (VmHWM).
2. One request with `--many-headers` headers: the answer.
3. Slowloris: `--slow-connections` connections sending one header line every `--slow-every-s`
   for `--slow-for-s`: how many the server still holds at the end.
4. `--idle-connections` connections that send nothing for `--idle-for-s`: how many it closed.

    python bench/edge.py
    python bench/edge.py --repo /path/to/older/checkout     # the same probes against older code
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import socket
import time
from pathlib import Path

from load import REPO, Server, machine_description  # bench/load.py, beside this script


def memory_mb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    return -1


def status_line(sock: socket.socket, timeout_s: float) -> str:
    sock.settimeout(timeout_s)
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError as error:
        return f"no answer ({type(error).__name__})"
    return data.split(b"\r\n", 1)[0].decode("latin-1") or "closed without an answer"


def big_header(port: int, pid: int, megabytes: int) -> str:
    rss_before = memory_mb(pid, "VmRSS")
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: ")
        chunk = b"a" * 2**20
        sent = 0
        try:
            for _ in range(megabytes):
                sock.sendall(chunk)
                sent += 1
            sock.sendall(b"\r\n\r\n")
        except OSError:
            pass
        answer = status_line(sock, 120)
    elapsed = time.monotonic() - started
    return (
        f"{megabytes} MB header: '{answer}' after {elapsed:.2f} s ({sent} MB sent); "
        f"RSS {rss_before} -> {memory_mb(pid, 'VmRSS')} MB, peak {memory_mb(pid, 'VmHWM')} MB"
    )


def many_headers(port: int, count: int) -> str:
    head = b"GET /livez HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % k for k in range(count))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(head + b"\r\n")
        return f"{count} headers: '{status_line(sock, 30)}'"


def slow_headers(port: int, connections: int, every_s: float, for_s: float) -> str:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    started = time.monotonic()
    line = 0
    open_ = connections
    while time.monotonic() - started < for_s and open_:
        payload = b"GET /livez HTTP/1.1\r\n" if line == 0 else b"X-T%d: v\r\n" % line
        open_ = 0
        for sock in socks:
            try:
                sock.sendall(payload)
                open_ += 1
            except OSError:
                pass
        line += 1
        time.sleep(every_s)
    held_s = time.monotonic() - started
    answers = {status_line(sock, 0.05) for sock in socks}
    for sock in socks:
        sock.close()
    return (
        f"slow headers: {connections} connections, one line every {every_s:g} s: {open_} still held "
        f"after {held_s:.1f} s; answers {sorted(answers)}"
    )


def idle(port: int, connections: int, for_s: float) -> str:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    time.sleep(for_s)
    closed = 0
    for sock in socks:
        sock.settimeout(0.05)
        try:
            sock.recv(1)
            closed += 1  # data or end of stream: the server acted
        except TimeoutError:
            pass
        except OSError:
            closed += 1
        sock.close()
    return f"idle: {closed} of {connections} connections that sent nothing closed after {for_s:g} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big-header-mb", type=int, default=199)
    parser.add_argument("--many-headers", type=int, default=10_000)
    parser.add_argument("--slow-connections", type=int, default=200)
    parser.add_argument("--slow-every-s", type=float, default=2.0)
    parser.add_argument("--slow-for-s", type=float, default=30.0)
    parser.add_argument("--idle-connections", type=int, default=5)
    parser.add_argument("--idle-for-s", type=float, default=12.0)
    parser.add_argument("--server-args", default="", help="extra flags of fermam serve")
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout to run the server from")
    args = parser.parse_args(argv)
    server_args = ["--device", "cpu", "--log-level", "error", *shlex.split(args.server_args)]
    described = args.server_args or "(defaults)"
    print(f"Machine: {machine_description('cpu')}; server from {args.repo}; args: {described}")
    with Server(server_args, repo=args.repo) as server:
        assert server.process is not None
        port, pid = server.port, server.process.pid
        print(big_header(port, pid, args.big_header_mb), flush=True)
        print(many_headers(port, args.many_headers), flush=True)
        print(slow_headers(port, args.slow_connections, args.slow_every_s, args.slow_for_s), flush=True)
        print(idle(port, args.idle_connections, args.idle_for_s), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
