"""Receiving request bodies with limits enforced while they stream in, never after.

- Size: the whole body (declared or counted) within `max_request_bytes`; and per image while
  streaming: a multipart file part beyond `max_image_bytes`, or a JSON string longer than a
  base64 image of that size, is refused (413) at the byte that crosses the limit, so a 200 MB
  upload costs one chunk of memory, not 200 MB.
- Time: the body must arrive within `body_timeout_s`, with no pause over `body_idle_timeout_s`
  (408), so a client that promises 1000 bytes and sends 10 holds nothing for long.
- Shutdown: once draining, a body still arriving gets at most `DRAIN_BODY_IDLE_S` per chunk;
  a stalled upload is answered 503 (retry elsewhere) at once instead of holding the drain and
  ending in a 500.
- Multipart structure: a body without its closing boundary is malformed (400), not "no images".

Every refusal mid-body closes the connection (`Connection: close`): the unread rest of the body
must not be parsed as a next request.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.datastructures import Headers
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http.errors import ApiError, error_response

# While draining, the longest wait for the next chunk of a body still arriving.
DRAIN_BODY_IDLE_S = 1.0
CLOSE = {"Connection": "close"}


def json_string_limit(max_image_bytes: int) -> int:
    """Longest JSON string that can still hold one image of `max_image_bytes` as base64.

    Base64 grows 4/3; MIME line breaks (76 chars + an escaped CRLF, 4 chars) add 4/76; a data:
    URL prefix adds a few dozen characters.
    """
    return (max_image_bytes * 4 // 3 + 4) * 80 // 76 + 256


class JsonStringScanner:
    """Tracks the length of the JSON string being streamed; True from `feed` once one is too long.

    Only quotes and backslashes matter (a quote outside a string opens one, inside one closes it
    unless escaped), found with bytes.find, so the scan costs about a memchr per chunk.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_string = False
        self._escape = False
        self._length = 0

    def feed(self, data: bytes) -> bool:
        pos, end = 0, len(data)
        while pos < end:
            if not self._in_string:
                quote = data.find(b'"', pos)
                if quote < 0:
                    return False
                self._in_string, self._length, pos = True, 0, quote + 1
                continue
            if self._escape:
                self._escape, self._length, pos = False, self._length + 1, pos + 1
                continue
            quote = data.find(b'"', pos)
            stop = end if quote < 0 else quote
            backslash = data.find(b"\\", pos, stop)
            if backslash >= 0:
                self._length += backslash - pos
                self._escape, pos = True, backslash + 1
            else:
                self._length += stop - pos
                if quote >= 0:
                    self._in_string, pos = False, quote + 1
                else:
                    pos = end
            if self._length > self.limit:
                return True
        return False


class BodyGuard:
    """ASGI middleware: the size, time and shutdown limits above, for POST/PUT/PATCH bodies.

    `state` is the app's ServiceState (its `draining`, `drain_deadline` and `drain_started`).
    """

    def __init__(self, app: ASGIApp, *, settings: Any, state: Any) -> None:
        self.app = app
        self.settings = settings
        self.state = state
        self.max_bytes = settings.max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in {"POST", "PUT", "PATCH"}:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            self.state.metrics.reject("too_large")
            response = error_response(
                413,
                "too_large",
                f"request body of {int(declared)} bytes exceeds {self.max_bytes}",
                CLOSE,
            )
            await response(scope, receive, send)
            return
        s = self.settings
        is_json = headers.get("content-type", "").split(";")[0].strip().lower().endswith("json")
        scanner = JsonStringScanner(json_string_limit(s.max_image_bytes)) if is_json else None
        started = time.monotonic()
        received = 0
        complete = False

        async def guarded_receive() -> Message:
            nonlocal received, complete
            if complete:  # body done: what follows is the disconnect, waited for without limits
                return await receive()
            message = await self._next_message(receive, started)
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                complete = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise ApiError(413, "too_large", f"request body exceeds {self.max_bytes} bytes", CLOSE)
                if scanner is not None and scanner.feed(chunk):
                    raise ApiError(
                        413,
                        "too_large",
                        f"an image is larger than the limit of {s.max_image_bytes} bytes",
                        CLOSE,
                    )
            return message

        await self.app(scope, guarded_receive, send)

    async def _next_message(self, receive: Receive, started: float) -> Message:
        """The next ASGI message, or ApiError 408 (too slow) / 503 (draining, body stalled)."""
        s, state = self.settings, self.state
        pending = asyncio.ensure_future(receive())
        watch_drain = True
        try:
            while True:
                now = time.monotonic()
                limit = min(now + s.body_idle_timeout_s, started + s.body_timeout_s)
                drain_wait = None
                if state.draining:
                    limit = min(limit, now + DRAIN_BODY_IDLE_S)
                elif watch_drain:
                    drain_wait = asyncio.ensure_future(state.drain_started.wait())
                waiters = {pending} if drain_wait is None else {pending, drain_wait}
                done, _ = await asyncio.wait(
                    waiters, timeout=max(0.0, limit - now), return_when=asyncio.FIRST_COMPLETED
                )
                if drain_wait is not None:
                    drain_wait.cancel()
                if pending in done:
                    return pending.result()
                if drain_wait is not None and drain_wait in done:
                    # Draining began: wait again with the drain's shorter limit (or, if the drain
                    # was called off meanwhile, without watching the spent event).
                    watch_drain = False
                    continue
                if state.draining:
                    raise ApiError(
                        503,
                        "not_ready",
                        "the server is shutting down and the body stalled; retry elsewhere",
                        CLOSE,
                    )
                raise ApiError(
                    408,
                    "body_timeout",
                    f"the request body did not arrive within {s.body_timeout_s:g} s "
                    f"(or paused over {s.body_idle_timeout_s:g} s)",
                    CLOSE,
                )
        finally:
            if not pending.done():
                pending.cancel()


class BoundedMultiPartParser(MultiPartParser):
    """Starlette's parser with the per-file and file-count limits enforced as parts stream in,
    and a missing closing boundary reported (the base parser accepts a truncated body)."""

    def __init__(
        self, *args: Any, max_file_bytes: int, max_images: int, file_kind: str = "image", **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_file_bytes = max_file_bytes
        self.max_images = max_images
        self.file_kind = file_kind  # what the 413 calls a file: "image" (numbered) or e.g. "video"
        self._file_bytes = 0
        self._images = 0
        self.complete = False

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self._file_bytes = 0

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        if self._current_part.file is not None and self._current_part.field_name == "files":
            self._images += 1
            if self._images > self.max_images:
                raise ApiError(413, "too_many_files", f"at most {self.max_images} images per request", CLOSE)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current_part.file is not None:
            self._file_bytes += end - start
            if self._file_bytes > self.max_file_bytes:
                which = (
                    f"image {self._images - 1}:" if self.file_kind == "image" else f"the {self.file_kind} is"
                )
                raise ApiError(
                    413, "too_large", f"{which} larger than the limit of {self.max_file_bytes} bytes", CLOSE
                )
        super().on_part_data(data, start, end)

    def on_end(self) -> None:
        self.complete = True


async def parse_multipart(
    request: Any, settings: Any, *, max_file_bytes: int | None = None, file_kind: str = "image"
) -> Any:
    """The form of a multipart request, limits enforced while it streams (see module docstring).

    Every file part is limited to `max_file_bytes` (default `max_image_bytes`; POST /v1/videos
    passes `video_max_bytes` and `file_kind="video"`).
    """
    parser = BoundedMultiPartParser(
        request.headers,
        request.stream(),
        max_files=10_000,  # images are counted (413) by the subclass, other file parts refused later
        max_fields=100,
        max_part_size=64 * 1024,
        max_file_bytes=settings.max_image_bytes if max_file_bytes is None else max_file_bytes,
        max_images=settings.max_files,
        file_kind=file_kind,
    )
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise ApiError(400, "invalid_request", f"malformed multipart body: {error.message}") from None
    if not parser.complete:
        await form.close()
        raise ApiError(400, "invalid_request", "malformed multipart body: no closing boundary")
    return form
