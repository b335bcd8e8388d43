"""`WS /v1/stream` against clients that misbehave, on a real `fermam serve` (issue 23): floods over
the rate limit, a client that never reads, deeply nested JSON, non-finite timestamps, keys in the
query string, foreign origins."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import sys
import time
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from media_clips import NO_FACE, frames_of, jpeg  # noqa: E402
from server_process import port_of, start_server  # noqa: E402

KEY = "stream-key-0123456789"
SESSION_S = 8.0
SEND_TIMEOUT_S = 1.0
MAX_FPS = 5


@pytest.fixture(scope="module")
def server(weights_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("stream") / "server.log"
    base, process = start_server(
        weights_path, "--api-keys", KEY, "--stream-max-fps", str(MAX_FPS),
        "--stream-max-session-s", str(SESSION_S), "--stream-send-timeout-s", str(SEND_TIMEOUT_S),
        "--log-level", "info", log_path=log,
    )  # fmt: skip
    yield base, log
    process.kill()
    process.wait(10)


def ws_url(base: str, query: str = "") -> str:
    return base.replace("http://", "ws://") + "/v1/stream" + (f"?{query}" if query else "")


def strict_json(text: str) -> dict:
    """JSON as browsers parse it: NaN and Infinity are not JSON."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def until_end(ws) -> list[dict]:
    messages = []
    while True:
        message = strict_json(ws.recv(timeout=60))
        messages.append(message)
        if message["type"] == "session_end":
            return messages


def metric(base: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{base}/metrics").text
    line = next(line for line in text.splitlines() if line.startswith(name + labels + " "))
    return float(line.rsplit(" ", 1)[1])


def test_a_flood_over_the_rate_limit_is_counted_not_listed(server) -> None:
    base, _ = server
    flood = 3000
    with connect(ws_url(base), additional_headers={"X-API-Key": KEY}) as ws:
        assert strict_json(ws.recv(timeout=30))["type"] == "session"
        for _ in range(flood):
            ws.send(b"x")
        ws.send('{"type": "end"}')
        messages = until_end(ws)
    end = messages[-1]
    # Every frame is accounted for: answered with an error (1 byte is no image), or dropped.
    errors = [m for m in messages if m["type"] == "error"]
    counts = [m.get("dropped_counts", {}) for m in messages]
    rate_limited = sum(c.get("rate_limit", 0) for c in counts)
    assert end["frames_received"] == flood
    assert end["frames_refused"] == len(errors) and {e["code"] for e in errors} == {"not_an_image"}
    assert sum(sum(c.values()) for c in counts) == end["dropped_total"]
    assert rate_limited >= flood - 10 * MAX_FPS
    assert len(errors) + end["dropped_total"] == flood
    # ... but no reply lists more than a few: the drops are counted, not kept (was 57 MB of JSON).
    assert all(len(m.get("dropped", [])) <= 32 for m in messages)
    assert len(json.dumps(end)) < 4096
    assert metric(base, "fermam_stream_frames_dropped_total", '{reason="rate_limit"}') >= rate_limited
    assert metric(base, "fermam_stream_frames_received_total") >= flood
    assert metric(base, "fermam_stream_frame_errors_total", '{code="not_an_image"}') >= len(errors)


def raw_handshake(base: str, path: str, headers: dict[str, str]) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill up soon: we never read
    sock.connect(("127.0.0.1", port_of(base)))
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    key = base64.b64encode(os.urandom(16)).decode()
    head = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port_of(base)}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    sock.sendall(head.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)  # byte by byte: leave the first WebSocket messages unread
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def text_frame(payload: bytes) -> bytes:
    """A masked client text frame (RFC 6455), payload under 126 bytes."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x81, 0x80 | len(payload)) + mask + masked


def test_a_client_that_never_reads_is_disconnected_by_the_session_limit(server) -> None:
    """Before: a raw client flooding 1-byte messages without reading stayed 70 s against a 5 s limit."""
    base, _ = server
    sock = raw_handshake(base, "/v1/stream", {"X-API-Key": KEY})
    started = time.monotonic()
    limit = SESSION_S + SEND_TIMEOUT_S + 2.0 + 15.0  # session, a send's timeout, the close wait, slack
    message = text_frame(b"x")  # each one is answered with an error the client never reads
    sock.settimeout(0.5)
    try:
        while time.monotonic() - started < limit:
            try:
                sock.sendall(message * 64)
            except TimeoutError:
                continue  # the server stopped reading us: it is stuck in a send, or about to cut us
            except (BrokenPipeError, ConnectionResetError):
                break
        else:
            pytest.fail(f"still connected after {limit:.0f} s")
    finally:
        sock.close()
    assert time.monotonic() - started < limit
    stalled = metric(base, "fermam_stream_sessions_total", '{reason="stalled"}')
    timed_out = metric(base, "fermam_stream_sessions_total", '{reason="max_duration"}')
    assert stalled + timed_out >= 1


def test_deeply_nested_json_gets_an_error_and_the_session_goes_on(server) -> None:
    base, _ = server
    with connect(ws_url(base), additional_headers={"X-API-Key": KEY}) as ws:
        assert strict_json(ws.recv(timeout=30))["type"] == "session"
        ws.send("[" * 100_000)  # RecursionError in the parser: was a dropped socket, no close frame
        error = strict_json(ws.recv(timeout=30))
        assert (error["type"], error["code"], error["frame_id"]) == ("error", "invalid_request", None)
        ws.send('{"type": "end"}')
        assert until_end(ws)[-1]["reason"] == "client_end"


def test_timestamps_must_be_finite_numbers(server) -> None:
    base, _ = server
    image = base64.b64encode(jpeg(frames_of(NO_FACE, 1, size=(96, 72))[0])).decode()
    bad = ["NaN", "Infinity", "-Infinity", "true", '"12"', "1e400"]
    with connect(ws_url(base), additional_headers={"X-API-Key": KEY}) as ws:
        assert strict_json(ws.recv(timeout=30))["type"] == "session"
        for stamp in bad:
            ws.send(f'{{"type": "frame", "data": "{image}", "timestamp_ms": {stamp}}}')
        ws.send(json.dumps({"type": "frame", "data": image, "timestamp_ms": 5.0}))
        ws.send('{"type": "end"}')
        messages = until_end(ws)  # strict_json: every reply is JSON a browser can parse
    errors = [m for m in messages if m["type"] == "error"]
    assert [(e["frame_id"], e["code"]) for e in errors] == [(i, "invalid_request") for i in range(len(bad))]
    (result,) = [m for m in messages if m["type"] == "result"]
    assert (result["frame_id"], result["timestamp_ms"]) == (len(bad), 5.0)  # not refused as "decreased"
    assert messages[-1]["frames_refused"] == len(bad)


def test_a_key_in_the_query_is_not_logged_and_the_close_is(server) -> None:
    base, log = server
    with connect(ws_url(base, f"api_key={KEY}&top_k=2")) as ws:
        hello = strict_json(ws.recv(timeout=30))
        assert hello["type"] == "session" and hello["options"]["top_k"] == 2
        ws.send('{"type": "end"}')
        until_end(ws)
    time.sleep(0.5)
    text = log.read_text()
    assert KEY not in text
    assert '"WebSocket /v1/stream?api_key=REDACTED&top_k=2" [accepted]' in text
    assert '"WebSocket /v1/stream?api_key=REDACTED&top_k=2" closed: client_end (code 1000)' in text


def test_only_the_servers_own_origin_may_open_a_stream(server) -> None:
    base, _ = server
    headers = {"X-API-Key": KEY}
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(base), additional_headers=headers, origin="http://evil.example")
    assert refused.value.response.status_code == 403
    for origin in (None, f"http://127.0.0.1:{port_of(base)}"):  # no Origin: not a browser
        with connect(ws_url(base), additional_headers=headers, origin=origin) as ws:
            assert strict_json(ws.recv(timeout=30))["type"] == "session"
