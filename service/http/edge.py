"""The HTTP/1.1 connection edge: the limits uvicorn's protocol lacks, before any request exists.

uvicorn[standard] serves HTTP/1.1 with httptools (llhttp), which has no limit on the size or
number of request headers (a 199 MB header to /livez was buffered and answered 200), no timeout
on reading them (200 connections trickling one header line every 2 s were held indefinitely; a
connection that sends nothing is never closed either: uvicorn arms its keep-alive timer only
after a response) and only a concurrency limit checked once the headers are complete (so it
never sees a connection still sending them). uvicorn's `h11_max_incomplete_event_size` bounds
the header size for the h11 protocol only. This subclass of uvicorn's httptools protocol adds:

- the request line and headers within `max_header_bytes` and `max_header_count`, counted while
  they arrive (an unfinished head is checked after each chunk the socket gives, so at most one
  chunk beyond the limit is ever buffered): 431;
- the whole head within `header_timeout_s` of its first byte (or of the connection's opening):
  408, or a quiet close when nothing was sent at all;
- at most `max_connections` open connections: the next one gets 503 at once.

Each refusal is the API's JSON error body with `Connection: close`; the connection then stays
open for at most `LINGER_S`, reading and discarding what the client still sends, so the kernel
does not reset it (a reset can reach the client before it reads the answer). Everything after
the head (bodies, their limits and timeouts) is the application's (`body.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger("fermam.http.edge")

# How long a refused connection keeps reading (and dropping) what the client sends before closing.
LINGER_S = 2.0


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing a request already answered."""


def edge_protocol(
    *, max_header_bytes: int, max_header_count: int, header_timeout_s: float, max_connections: int
) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with these limits, as a class for `uvicorn.Config(http=...)`."""

    class EdgeProtocol(_EdgeProtocol):
        pass

    EdgeProtocol.max_header_bytes = max_header_bytes
    EdgeProtocol.max_header_count = max_header_count
    EdgeProtocol.header_timeout_s = header_timeout_s
    EdgeProtocol.max_connections = max_connections
    return EdgeProtocol


class _EdgeProtocol(HttpToolsProtocol):
    max_header_bytes = 32 * 1024
    max_header_count = 100
    header_timeout_s = 10.0
    max_connections = 0  # 0: no limit

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_head = True  # between requests, or inside a request line and its headers
        self._head_seen = 0  # bytes received of the current head (whole chunks: an upper bound)
        self._head_counted = 0  # bytes of the head the parser has delivered (url, names, values)
        self._header_count = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    # -- connection ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.max_connections and len(self.connections) > self.max_connections:
            self._refuse(
                503,
                "too_many_connections",
                f"the server holds its limit of {self.max_connections} connections; retry shortly",
                retry_after=1,
            )
            return
        # A new connection must send its first request's head in time, as any later one must.
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering after a refusal: read and drop
        if self._reading_head:
            self._head_seen += len(data)
            if self._head_timer is None:
                self._arm_head_timer()
        super().data_received(data)
        # Still inside the head after the whole chunk: the parser buffers an unfinished header
        # line in full, so it must be refused here, not when (if ever) the line ends.
        if self._reading_head and not self._refused and self._head_seen > self.max_header_bytes:
            self._refuse_head_too_large()

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers any parser error with a 400, including the one a callback raises to stop
        # parsing a request this class already answered.
        if not self._refused:
            super().send_400_response(msg)

    # -- parser callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reading_head = True
        self._head_counted = 0
        self._header_count = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.max_header_count:
            self._refuse(
                431,
                "too_many_headers",
                f"more than {self.max_header_count} request headers",
            )
            raise _Refused
        self._count_head(len(name) + len(value) + 4)  # "name: value\r\n"
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # What arrives next belongs to the next request's head.
        self._reading_head = True
        self._head_seen = 0

    # -- limits ----------------------------------------------------------------------------------

    def _count_head(self, size: int) -> None:
        self._head_counted += size
        if self._head_counted > self.max_header_bytes:
            self._refuse_head_too_large()
            raise _Refused

    def _refuse_head_too_large(self) -> None:
        self._refuse(
            431,
            "headers_too_large",
            f"the request line and headers exceed {self.max_header_bytes} bytes",
        )

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._on_head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _on_head_timeout(self) -> None:
        self._head_timer = None
        if not self._reading_head or self._refused or self.transport.is_closing():
            return
        if self._head_seen == 0:
            # Nothing sent at all: no request to answer (a keep-alive timeout in all but name).
            self.transport.close()
            return
        self._refuse(
            408,
            "header_timeout",
            f"the request line and headers did not arrive within {self.header_timeout_s:g} s",
        )

    def _refuse(self, status: int, code: str, message: str, *, retry_after: int | None = None) -> None:
        """Answer `status` with the API's error body, then close after a short lingering read."""
        if self._refused:
            return
        self._refused = True
        self._cancel_head_timer()
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        log.warning("%s: %d %s", client, status, code)
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request while the previous response is still being written: an answer
            # now would land inside that response.
            self.transport.close()
            return
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        if retry_after is not None:
            head.append(b"retry-after: %d\r\n" % retry_after)
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)
