"""The HTTP/1.1 edge against a real `fermam serve` over raw sockets (issue 23): header size and
count limits (431), the header read timeout (408), idle connections closed, the connection cap
(503), each answered in the API's error shape and closed, and the server still serving after.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import pytest
from server_process import port_of, read_response, start_server

MAX_HEADER_BYTES = 4096
MAX_HEADER_COUNT = 20
HEADER_TIMEOUT_S = 1.5
MAX_CONNECTIONS = 40
# Slack for a loaded 2-core machine on every "answered within" below.
SLACK_S = 2.0


@pytest.fixture(scope="module")
def server(weights_path):
    base, process = start_server(
        weights_path,
        *("--max-header-bytes", str(MAX_HEADER_BYTES), "--max-header-count", str(MAX_HEADER_COUNT)),
        *("--header-timeout-s", str(HEADER_TIMEOUT_S), "--max-connections", str(MAX_CONNECTIONS)),
    )
    yield base
    process.kill()
    process.wait(10)


def connect(base: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port_of(base)), timeout=30)


def head_with(headers: list[tuple[str, str]]) -> bytes:
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return f"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n{lines}\r\n".encode()


def closed_by_server(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the server closes the connection within `timeout_s`, discarding what it sends."""
    sock.settimeout(timeout_s)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass  # a reset is a close too
    return True


def assert_refused(response, status: int, code: str) -> None:
    assert response.status == status
    assert response.headers["content-type"] == "application/json"
    assert response.headers["connection"] == "close"
    assert response.json()["error"]["code"] == code


def test_a_head_within_the_limits_is_served(server) -> None:
    headers = [(f"X-Pad-{k}", "a" * 150) for k in range(MAX_HEADER_COUNT - 2)]  # ~3.1 kB, 19 headers
    with connect(server) as sock:
        sock.sendall(head_with(headers))
        assert read_response(sock, 10).status == 200


def test_a_header_too_large_is_refused_431_before_it_ends(server) -> None:
    # 8 MB of one header value, never finished: the server must answer without waiting for the
    # end of the line (it buffered 199 MB and answered 200 before). It reads and drops the rest
    # for a while after answering, so the client can send it all and still read the answer.
    with connect(server) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        sock.sendall(b"a" * (8 * 1024 * 1024))
        assert_refused(read_response(sock, 10), 431, "headers_too_large")
        assert closed_by_server(sock, 5)
    # A head just over the limit, complete, is refused too, and the answer reaches the client.
    with connect(server) as sock:
        sock.sendall(head_with([("X-Big", "a" * MAX_HEADER_BYTES)]))
        assert_refused(read_response(sock, 10), 431, "headers_too_large")
        assert closed_by_server(sock, 5)
    assert httpx.get(f"{server}/livez", timeout=10).status_code == 200


def test_too_many_headers_are_refused_431(server) -> None:
    with connect(server) as sock:
        sock.sendall(head_with([(f"X-H{k}", "v") for k in range(10_000)]))
        assert_refused(read_response(sock, 10), 431, "too_many_headers")
        assert closed_by_server(sock, 5)
    assert httpx.get(f"{server}/livez", timeout=10).status_code == 200


def test_slow_headers_get_408_within_the_header_timeout(server) -> None:
    # Slowloris: connections trickling one header line at a time, never finishing the head.
    count = 20
    socks = [connect(server) for _ in range(count)]
    started = time.monotonic()
    stop = threading.Event()

    def trickle() -> None:
        line = 0
        while not stop.wait(0.3):
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.sendall(b"GET /livez HTTP/1.1\r\n" if line == 0 else b"X-T%d: v\r\n" % line)
            line += 1

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        for sock in socks:
            response = read_response(sock, HEADER_TIMEOUT_S + SLACK_S)
            assert_refused(response, 408, "header_timeout")
        elapsed = time.monotonic() - started
        assert HEADER_TIMEOUT_S - 0.2 <= elapsed <= HEADER_TIMEOUT_S + SLACK_S
        # The server kept serving others meanwhile.
        assert httpx.get(f"{server}/livez", timeout=10).status_code == 200
    finally:
        stop.set()
        sender.join(5)
        for sock in socks:
            sock.close()


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(server) -> None:
    with connect(server) as sock:
        started = time.monotonic()
        assert closed_by_server(sock, HEADER_TIMEOUT_S + SLACK_S)
        assert time.monotonic() - started >= HEADER_TIMEOUT_S - 0.2


def test_a_connection_beyond_the_cap_gets_503_at_once(server) -> None:
    held = [connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)  # let the server accept them all
        with connect(server) as extra:
            extra.sendall(head_with([]))
            response = read_response(extra, 5)
            assert_refused(response, 503, "too_many_connections")
            assert response.headers["retry-after"] == "1"
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert httpx.get(f"{server}/livez", timeout=10).status_code == 200
