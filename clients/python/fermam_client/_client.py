"""Python client of fermam-service: sync (`Client`) and async (`AsyncClient`), on httpx and websockets.

It knows the HTTP API only and imports nothing of the server, so it is light to use from a chatbot
backend:

    from fermam_client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as client:
        result = client.expressions(["photo.jpg"], top_k=2)
        for face in result.images[0].faces:
            print(face.box, face.expression, face.scores)

Retries: 429 and 503 answers are retried after their `Retry-After` (capped by `max_retry_after_s`),
and connection failures after an exponential backoff, as long as the call's deadline allows;
the time left is sent as `X-Request-Timeout-Ms`, so the server drops work nobody waits for.
Results are typed dataclasses; each keeps the server's JSON in `raw` (fields added later show there).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

ImageInput = bytes | str | Path  # bytes, or a path to a file
RETRY_STATUSES = frozenset({429, 503})
TIMEOUT_HEADER = "X-Request-Timeout-Ms"


class FermamError(Exception):
    """The service answered with an error (or no answer came before the deadline: status 0)."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


# -- typed results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    x: float
    y: float
    width: float
    height: float
    score: float


@dataclass(frozen=True)
class Pose:
    """Head pose in degrees (docs/face-quality.md says how far to trust it)."""

    yaw: float
    pitch: float
    roll: float


@dataclass(frozen=True)
class Quality:
    """Sharpness and brightness (0..1) and face size (pixels): ignore faces you should not trust."""

    sharpness: float
    brightness: float
    size: float


@dataclass(frozen=True)
class Face:
    box: Box
    expression: str
    scores: dict[str, float]
    landmarks: list[tuple[float, float]] | None
    top: list[tuple[str, float]] | None
    raw: dict[str, Any] = field(repr=False)
    # None when the server left them out (the request asked for no pose / quality).
    pose: Pose | None = None
    quality: Quality | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Face:
        pose, quality = data.get("pose"), data.get("quality")
        return cls(
            box=Box(**data["box"]),
            expression=data["expression"],
            scores=dict(data["scores"]),
            landmarks=None if data.get("landmarks") is None else [tuple(p) for p in data["landmarks"]],
            top=None if data.get("top") is None else [(t["label"], t["score"]) for t in data["top"]],
            raw=dict(data),
            pose=None if pose is None else Pose(**pose),
            quality=None if quality is None else Quality(**quality),
        )


@dataclass(frozen=True)
class ImageFaces:
    index: int
    width: int
    height: int
    faces: list[Face]
    faces_below_min_size: int
    faces_over_max: int


@dataclass(frozen=True)
class ExpressionResult:
    model: dict[str, Any]
    images: list[ImageFaces]
    timings: dict[str, float]
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExpressionResult:
        images = [
            ImageFaces(
                index=i["index"],
                width=i["width"],
                height=i["height"],
                faces=[Face.from_json(f) for f in i["faces"]],
                faces_below_min_size=i.get("faces_below_min_size", 0),
                faces_over_max=i.get("faces_over_max", 0),
            )
            for i in data["images"]
        ]
        return cls(model=data["model"], images=images, timings=data["timings"], raw=dict(data))


@dataclass(frozen=True)
class TimelinePoint:
    t: float
    frame: int
    face: Face
    smoothed: dict[str, float]
    # Whether the face was classified on this frame; False: its track's last scores were reused
    # (a tracked video). Servers before issue 24's tracked videos classify every face: True.
    fresh: bool = True


@dataclass(frozen=True)
class VideoTrack:
    track_id: int
    first_s: float
    last_s: float
    frames: int
    expression: str  # the summary's: argmax of mean_scores
    mean_scores: dict[str, float]
    expression_frames: dict[str, int]
    timeline: list[TimelinePoint]


@dataclass(frozen=True)
class VideoResult:
    model: dict[str, Any]
    video: dict[str, Any]
    tracks: list[VideoTrack]
    timings: dict[str, float]
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VideoResult:
        tracks = [
            VideoTrack(
                track_id=t["track_id"],
                first_s=t["first_s"],
                last_s=t["last_s"],
                frames=t["frames"],
                expression=t["summary"]["expression"],
                mean_scores=t["summary"]["mean_scores"],
                expression_frames=t["summary"]["expression_frames"],
                timeline=[
                    TimelinePoint(
                        p["t"], p["frame"], Face.from_json(p), dict(p["smoothed"]), bool(p.get("fresh", True))
                    )
                    for p in t["timeline"]
                ],
            )
            for t in data["tracks"]
        ]
        return cls(data["model"], data["video"], tracks, data["timings"], dict(data))


# -- stream messages (docs/streaming.md) --------------------------------------------------------


@dataclass(frozen=True)
class TrackedFace:
    track_id: int
    face: Face
    smoothed_expression: str
    smoothed: dict[str, float]
    # Whether the face was classified in this frame; False: its track's last scores were reused
    # (the face's crop had barely changed). Servers before issue 24 classify every face: True.
    fresh: bool = True


@dataclass(frozen=True)
class StreamEvent:
    type: str  # "track_start" | "track_end"
    track_id: int
    frame_id: int  # first frame (start) or last matched frame (end)
    timestamp_ms: float
    reason: str | None


@dataclass(frozen=True)
class DroppedFrame:
    frame_id: int
    reason: str  # "backpressure", "rate_limit", or the session end's reason


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    protocol: int
    model: dict[str, Any]
    options: dict[str, Any]
    smoothing: dict[str, Any]
    limits: dict[str, Any]


@dataclass(frozen=True)
class FrameResult:
    frame_id: int
    timestamp_ms: float
    width: int
    height: int
    faces: list[TrackedFace]
    events: list[StreamEvent]
    dropped: list[DroppedFrame]
    dropped_total: int
    timings: dict[str, float]
    # All frames dropped since the previous reply, by reason (`dropped` lists at most 32 of them).
    dropped_counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class FrameError:
    code: str
    message: str
    frame_id: int | None  # None: the session is refused or over


@dataclass(frozen=True)
class SessionEnd:
    reason: str
    frames_received: int
    frames_processed: int
    dropped: list[DroppedFrame]
    dropped_total: int
    events: list[StreamEvent]
    dropped_counts: dict[str, int] = field(default_factory=dict)
    frames_refused: int = 0  # frames answered with an error


StreamMessage = SessionInfo | FrameResult | FrameError | SessionEnd


def _event(data: Mapping[str, Any]) -> StreamEvent:
    if data["type"] == "track_start":
        return StreamEvent("track_start", data["track_id"], data["frame_id"], data["timestamp_ms"], None)
    return StreamEvent(
        "track_end", data["track_id"], data["last_frame_id"], data["last_timestamp_ms"], data.get("reason")
    )


def _dropped(items: Sequence[Mapping[str, Any]]) -> list[DroppedFrame]:
    return [DroppedFrame(d["frame_id"], d["reason"]) for d in items]


def parse_stream_message(data: Mapping[str, Any]) -> StreamMessage:
    """One server message of `/v1/stream` as its dataclass."""
    kind = data.get("type")
    if kind == "session":
        return SessionInfo(
            data["session_id"],
            data["protocol"],
            data["model"],
            data["options"],
            data["smoothing"],
            data["limits"],
        )
    if kind == "result":
        faces = [
            TrackedFace(
                f["track_id"],
                Face.from_json(f),
                f["smoothed"]["expression"],
                f["smoothed"]["scores"],
                bool(f.get("fresh", True)),
            )
            for f in data["faces"]
        ]
        return FrameResult(
            data["frame_id"],
            data["timestamp_ms"],
            data["width"],
            data["height"],
            faces,
            [_event(e) for e in data["events"]],
            _dropped(data["dropped"]),
            data["dropped_total"],
            data["timings"],
            data.get("dropped_counts", {}),
        )
    if kind == "error":
        return FrameError(data["code"], data["message"], data.get("frame_id"))
    if kind == "session_end":
        return SessionEnd(
            data["reason"],
            data["frames_received"],
            data["frames_processed"],
            _dropped(data.get("dropped", [])),
            data["dropped_total"],
            [_event(e) for e in data["events"]],
            data.get("dropped_counts", {}),
            data.get("frames_refused", 0),
        )
    raise ValueError(f"unknown stream message type {kind!r}")


# -- shared request building --------------------------------------------------------------------


def _read(item: ImageInput) -> bytes:
    return item if isinstance(item, bytes) else Path(item).read_bytes()


def _name(item: ImageInput, index: int) -> str:
    return f"image{index}" if isinstance(item, bytes) else Path(item).name


def _form_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _expression_request(
    images: Sequence[ImageInput], encoding: str, options: Mapping[str, Any]
) -> dict[str, Any]:
    if isinstance(images, bytes | str | Path):
        raise TypeError("images must be a sequence (a list of bytes or paths)")
    chosen = {k: v for k, v in options.items() if v is not None}
    if encoding == "multipart":
        files = [("files", (_name(item, i), _read(item))) for i, item in enumerate(images)]
        return {"files": files, "data": {k: _form_value(v) for k, v in chosen.items()}}
    if encoding == "base64":
        return {"json": {"images": [base64.b64encode(_read(item)).decode() for item in images], **chosen}}
    raise ValueError("encoding must be 'multipart' or 'base64'")


def _video_request(video: ImageInput, options: Mapping[str, Any]) -> dict[str, Any]:
    chosen = {k: _form_value(v) for k, v in options.items() if v is not None}
    return {"files": [("file", (_name(video, 0), _read(video)))], "data": chosen}


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        code, message = error["code"], error["message"]
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:200]
    raise FermamError(response.status_code, code, message, _retry_after(response))


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return None if value is None else max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: treat as no hint


def _ws_url(base_url: str, options: Mapping[str, Any]) -> str:
    base = base_url.rstrip("/")
    base = "ws" + base[4:] if base.startswith("http") else base
    query = {k: _form_value(v) for k, v in options.items() if v is not None}
    return f"{base}/v1/stream" + (f"?{urlencode(query)}" if query else "")


class _Retrying:
    """The retry policy shared by both clients: what to wait before the next attempt, if any."""

    def __init__(self, retries: int, backoff_s: float, max_retry_after_s: float) -> None:
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_retry_after_s = max_retry_after_s

    def wait_s(self, attempt: int, error: Exception, deadline: float) -> float | None:
        if attempt >= self.retries:
            return None
        if isinstance(error, FermamError):
            if error.status not in RETRY_STATUSES:
                return None
            hint = error.retry_after_s
            wait = min(self.max_retry_after_s, hint) if hint is not None else self._backoff(attempt)
        elif isinstance(error, httpx.TransportError) and not isinstance(error, httpx.TimeoutException):
            wait = self._backoff(attempt)
        else:
            return None
        return wait if time.monotonic() + wait < deadline else None

    def _backoff(self, attempt: int) -> float:
        return self.backoff_s * (2**attempt) * (0.5 + random.random() / 2)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FermamError(0, "deadline_exceeded", "the call's deadline passed before an answer came")
    return left


# -- sync -------------------------------------------------------------------------------------


class Client:
    """Blocking client. `timeout_s` is each call's default deadline (queueing and retries included)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_retry_after_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s
        self._retry = _Retrying(retries, backoff_s, max_retry_after_s)
        self._http = httpx.Client(base_url=self.base_url, headers=_headers(api_key), transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, timeout_s: float | None, **kwargs: Any) -> Any:
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        attempt = 0
        while True:
            left = _remaining(deadline)
            try:
                response = self._http.request(
                    method,
                    path,
                    timeout=left,
                    headers={TIMEOUT_HEADER: str(max(1, int(left * 1000)))},
                    **kwargs,
                )
                _raise_for(response)
                return response.json()
            except (FermamError, httpx.TransportError) as error:
                wait = self._retry.wait_s(attempt, error, deadline)
                if wait is None:
                    if isinstance(error, httpx.TimeoutException):
                        raise FermamError(0, "deadline_exceeded", str(error) or "timed out") from error
                    raise
                time.sleep(wait)
                attempt += 1

    def expressions(
        self,
        images: Sequence[ImageInput],
        *,
        encoding: str = "multipart",
        detect: bool | None = None,
        max_faces: int | None = None,
        min_face_size: int | None = None,
        return_landmarks: bool | None = None,
        top_k: int | None = None,
        timeout_s: float | None = None,
    ) -> ExpressionResult:
        """`POST /v1/expressions`: faces and expressions of each image (bytes or paths)."""
        options = dict(
            detect=detect,
            max_faces=max_faces,
            min_face_size=min_face_size,
            return_landmarks=return_landmarks,
            top_k=top_k,
        )
        body = _expression_request(images, encoding, options)
        return ExpressionResult.from_json(self._call("POST", "/v1/expressions", timeout_s, **body))

    def video(
        self,
        video: ImageInput,
        *,
        fps: float | None = None,
        max_faces: int | None = None,
        min_face_size: int | None = None,
        return_landmarks: bool | None = None,
        top_k: int | None = None,
        smoothing_tau_ms: float | None = None,
        timeout_s: float | None = None,
    ) -> VideoResult:
        """`POST /v1/videos`: one timeline per tracked face of a video file."""
        options = dict(
            fps=fps,
            max_faces=max_faces,
            min_face_size=min_face_size,
            return_landmarks=return_landmarks,
            top_k=top_k,
            smoothing_tau_ms=smoothing_tau_ms,
        )
        return VideoResult.from_json(
            self._call("POST", "/v1/videos", timeout_s, **_video_request(video, options))
        )

    def models(self, *, timeout_s: float | None = None) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/models", timeout_s)["models"]

    def stream(self, **options: Any) -> StreamSession:
        """Open `WS /v1/stream` (options: max_faces, min_face_size, return_landmarks, top_k,
        smoothing_tau_ms); use as a context manager."""
        return StreamSession(_ws_url(self.base_url, options), self.api_key, self.timeout_s)


class StreamSession:
    """A blocking `/v1/stream` session: `send` frames, read typed messages with `recv`/`poll`."""

    def __init__(self, url: str, api_key: str | None, open_timeout_s: float = 30.0) -> None:
        from websockets.sync.client import connect

        self._stack = contextlib.ExitStack()
        self._ws = self._stack.enter_context(
            connect(url, additional_headers=_headers(api_key), open_timeout=open_timeout_s, max_size=2**24)
        )
        first = self._recv_json(open_timeout_s)
        message = parse_stream_message(first)
        if isinstance(message, FrameError):
            self._stack.close()
            raise FermamError(0, message.code, message.message)
        assert isinstance(message, SessionInfo)
        self.info = message
        self.ended: SessionEnd | None = None

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def send(self, frame: ImageInput, timestamp_ms: float | None = None) -> None:
        """One frame (bytes or a path); with `timestamp_ms`, the frame's own capture time."""
        data = _read(frame)
        if timestamp_ms is None:
            self._ws.send(data)
        else:
            text = base64.b64encode(data).decode()
            self._ws.send(json.dumps({"type": "frame", "data": text, "timestamp_ms": timestamp_ms}))

    def _recv_json(self, timeout_s: float | None) -> dict[str, Any]:
        return json.loads(self._ws.recv(timeout=timeout_s))

    def recv(self, timeout_s: float | None = None) -> StreamMessage:
        """The next message; TimeoutError if none came in time."""
        message = parse_stream_message(self._recv_json(timeout_s))
        if isinstance(message, SessionEnd):
            self.ended = message
        return message

    def poll(self) -> list[StreamMessage]:
        """Every message already received, without waiting."""
        out: list[StreamMessage] = []
        while True:
            try:
                out.append(self.recv(timeout_s=0))
            except TimeoutError:
                return out

    def __iter__(self) -> Iterator[StreamMessage]:
        from websockets.exceptions import ConnectionClosed

        while self.ended is None:
            try:
                yield self.recv()
            except ConnectionClosed:
                return

    def end(self, timeout_s: float = 120.0) -> list[StreamMessage]:
        """Say no more frames come; the remaining messages up to and including `session_end`."""
        self._ws.send(json.dumps({"type": "end"}))
        deadline = time.monotonic() + timeout_s
        out: list[StreamMessage] = []
        while self.ended is None:
            out.append(self.recv(timeout_s=_remaining(deadline)))
        return out


# -- async ------------------------------------------------------------------------------------


class AsyncClient:
    """The same calls as `Client`, awaitable."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_retry_after_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s
        self._retry = _Retrying(retries, backoff_s, max_retry_after_s)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=_headers(api_key), transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, timeout_s: float | None, **kwargs: Any) -> Any:
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        attempt = 0
        while True:
            left = _remaining(deadline)
            try:
                response = await self._http.request(
                    method,
                    path,
                    timeout=left,
                    headers={TIMEOUT_HEADER: str(max(1, int(left * 1000)))},
                    **kwargs,
                )
                _raise_for(response)
                return response.json()
            except (FermamError, httpx.TransportError) as error:
                wait = self._retry.wait_s(attempt, error, deadline)
                if wait is None:
                    if isinstance(error, httpx.TimeoutException):
                        raise FermamError(0, "deadline_exceeded", str(error) or "timed out") from error
                    raise
                await asyncio.sleep(wait)
                attempt += 1

    async def expressions(
        self,
        images: Sequence[ImageInput],
        *,
        encoding: str = "multipart",
        detect: bool | None = None,
        max_faces: int | None = None,
        min_face_size: int | None = None,
        return_landmarks: bool | None = None,
        top_k: int | None = None,
        timeout_s: float | None = None,
    ) -> ExpressionResult:
        options = dict(
            detect=detect,
            max_faces=max_faces,
            min_face_size=min_face_size,
            return_landmarks=return_landmarks,
            top_k=top_k,
        )
        # Reading files is quick next to inference; done inline rather than in a thread.
        body = _expression_request(images, encoding, options)
        return ExpressionResult.from_json(await self._call("POST", "/v1/expressions", timeout_s, **body))

    async def video(
        self,
        video: ImageInput,
        *,
        fps: float | None = None,
        max_faces: int | None = None,
        min_face_size: int | None = None,
        return_landmarks: bool | None = None,
        top_k: int | None = None,
        smoothing_tau_ms: float | None = None,
        timeout_s: float | None = None,
    ) -> VideoResult:
        options = dict(
            fps=fps,
            max_faces=max_faces,
            min_face_size=min_face_size,
            return_landmarks=return_landmarks,
            top_k=top_k,
            smoothing_tau_ms=smoothing_tau_ms,
        )
        data = await self._call("POST", "/v1/videos", timeout_s, **_video_request(video, options))
        return VideoResult.from_json(data)

    async def models(self, *, timeout_s: float | None = None) -> list[dict[str, Any]]:
        return (await self._call("GET", "/v1/models", timeout_s))["models"]

    def stream(self, **options: Any) -> AsyncStreamSession:
        """`async with client.stream(top_k=2) as session: ...`"""
        return AsyncStreamSession(_ws_url(self.base_url, options), self.api_key, self.timeout_s)


class AsyncStreamSession:
    """An async `/v1/stream` session; open it with `async with`."""

    def __init__(self, url: str, api_key: str | None, open_timeout_s: float = 30.0) -> None:
        self._url = url
        self._api_key = api_key
        self._open_timeout_s = open_timeout_s
        self._ws: Any = None
        self.info: SessionInfo | None = None
        self.ended: SessionEnd | None = None

    async def __aenter__(self) -> AsyncStreamSession:
        from websockets.asyncio.client import connect

        self._ws = await connect(
            self._url,
            additional_headers=_headers(self._api_key),
            open_timeout=self._open_timeout_s,
            max_size=2**24,
        )
        message = await self.recv(self._open_timeout_s)
        if isinstance(message, FrameError):
            await self._ws.close()
            raise FermamError(0, message.code, message.message)
        assert isinstance(message, SessionInfo)
        self.info = message
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._ws.close()

    async def send(self, frame: ImageInput, timestamp_ms: float | None = None) -> None:
        data = _read(frame)
        if timestamp_ms is None:
            await self._ws.send(data)
        else:
            text = base64.b64encode(data).decode()
            await self._ws.send(json.dumps({"type": "frame", "data": text, "timestamp_ms": timestamp_ms}))

    async def recv(self, timeout_s: float | None = None) -> StreamMessage:
        raw = await asyncio.wait_for(self._ws.recv(), timeout_s)
        message = parse_stream_message(json.loads(raw))
        if isinstance(message, SessionEnd):
            self.ended = message
        return message

    async def end(self, timeout_s: float = 120.0) -> list[StreamMessage]:
        await self._ws.send(json.dumps({"type": "end"}))
        deadline = time.monotonic() + timeout_s
        out: list[StreamMessage] = []
        while self.ended is None:
            out.append(await self.recv(_remaining(deadline)))
        return out
