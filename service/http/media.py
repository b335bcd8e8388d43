"""Routes for streams and videos: `WS /v1/stream` and `POST /v1/videos`. Thin: the work is in
service/engine/stream.py and service/engine/video.py; errors map in service/http/errors.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from service.engine.pipeline import InvalidRequest, RequestOptions
from service.engine.stream import StreamLimits, StreamSession, parse_stream_options
from service.engine.video import MIN_FPS, VideoOptions, VideoRejected, VideoResult, analyse_video
from service.http import schemas
from service.http.body import parse_multipart
from service.http.deps import ApiKey, EngineDep, ServiceState, StateDep, require_api_key
from service.http.errors import ApiError, to_api_error
from service.http.forms import form_properties, validate_form
from service.http.routes import _client_gone, _deadline, _wait_for_disconnect, face_fields

router = APIRouter()
log = logging.getLogger("fermam.http")

# WebSocket close codes (RFC 6455): normal, going away, policy violation, try again later.
CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_TRY_LATER = 1000, 1001, 1008, 1013
# After our close frame, how long a client has to answer it before the connection is cut.
CLOSE_WAIT_S = 2.0
TRANSPORT_KEY = "fermam.transport"
REDACTED = "REDACTED"


class WebSocketTransport:
    """ASGI middleware: puts the connection's asyncio transport in a WebSocket scope, so a session
    can cut a client that stopped reading.

    ASGI has no abort: a close is a message that waits, like any send, until the peer reads, and
    uvicorn's own close waits for its write buffer to drain, which a peer that never reads never
    lets happen (it held a socket 70 s past the session limit). uvicorn's send is a method of its
    protocol object, which holds the transport; where it is not (another server), the session
    ends as before, without the abort.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            transport = getattr(getattr(send, "__self__", None), "transport", None)
            if transport is not None and hasattr(transport, "abort"):
                scope[TRANSPORT_KEY] = transport
        await self.app(scope, receive, send)


def _abort(websocket: WebSocket) -> None:
    transport = websocket.scope.get(TRANSPORT_KEY)
    if transport is not None:
        transport.abort()


def _abort_later(websocket: WebSocket, delay_s: float) -> None:
    """Cut the connection if the close handshake has not ended it by then (a no-op if it has)."""
    transport = websocket.scope.get(TRANSPORT_KEY)
    if transport is not None:
        asyncio.get_running_loop().call_later(delay_s, transport.abort)


def _redact_key(websocket: WebSocket) -> str | None:
    """Take `api_key` out of the query string the server logs (it logs the handshake's path when
    the socket is accepted, and so do we when it closes); returns the key."""
    pairs = parse_qsl(websocket.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    offered = next((value for key, value in pairs if key == "api_key"), None)
    if offered is not None:
        redacted = [(key, REDACTED if key == "api_key" else value) for key, value in pairs]
        websocket.scope["query_string"] = urlencode(redacted).encode("latin-1")
    return offered


def _origin_allowed(websocket: WebSocket, allowed: list[str]) -> bool:
    """Browsers send `Origin`; without it the client is not a web page (allowed). Same origin (the
    Origin's host and port are the Host header's) is allowed, and so is any origin listed."""
    origin = websocket.headers.get("origin")
    if origin is None or "*" in allowed:
        return True
    origin = origin.strip().lower().rstrip("/")
    if origin in {a.strip().lower().rstrip("/") for a in allowed}:
        return True
    try:
        parts = urlsplit(origin)
        default = {"http": 80, "https": 443}.get(parts.scheme)
        origin_host = (parts.hostname, parts.port or default)
        host = urlsplit("//" + websocket.headers.get("host", ""))
        ws_default = 443 if websocket.scope.get("scheme") == "wss" else 80
        return origin_host == (host.hostname, host.port or ws_default)
    except ValueError:
        return False


def _describe(error: BaseException) -> tuple[str, str]:
    api = to_api_error(error)
    return api.code, api.message


def _authorised(websocket: WebSocket, offered: str | None) -> bool:
    """The HTTP rule (header keys), plus `api_key` in the query (`offered`) for browsers."""
    try:
        require_api_key(websocket)  # type: ignore[arg-type]  # reads only .app and .headers
        return True
    except ApiError:
        if offered is None or "x-api-key" in websocket.headers or "authorization" in websocket.headers:
            return False
        scope = dict(websocket.scope)
        scope["headers"] = [*scope["headers"], (b"x-api-key", offered.encode())]
        try:
            require_api_key(WebSocket(scope, websocket.receive, websocket.send))  # type: ignore[arg-type]
        except ApiError:
            return False
        return True


async def _refuse(websocket: WebSocket, code: str, message: str, close_code: int, timeout_s: float) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(
            websocket.send_json({"type": "error", "code": code, "message": message, "frame_id": None}),
            timeout_s,
        )
        await asyncio.wait_for(websocket.close(close_code), timeout_s)
    _abort_later(websocket, CLOSE_WAIT_S)


@router.websocket("/v1/stream")
async def stream(websocket: WebSocket) -> None:
    """Camera frames in, tracked faces and smoothed expressions out (protocol: docs/streaming.md)."""
    state: ServiceState = websocket.app.state.service
    settings = state.settings
    if not _origin_allowed(websocket, settings.stream_allowed_origins):
        # Before the handshake completes: the server answers 403, a web page's script learns nothing.
        log.warning("stream refused: origin %r not allowed", websocket.headers.get("origin"))
        await websocket.close(CLOSE_POLICY)
        return
    offered_key = _redact_key(websocket)
    await websocket.accept()
    timeout_s = settings.stream_send_timeout_s
    if not _authorised(websocket, offered_key):
        await _refuse(websocket, "unauthorized", "missing or invalid API key", CLOSE_POLICY, timeout_s)
        return
    if not state.ready or state.engine is None:
        await _refuse(
            websocket, "not_ready", "the service is starting or draining", CLOSE_TRY_LATER, timeout_s
        )
        return
    try:
        options = parse_stream_options(websocket.query_params, settings)
    except InvalidRequest as error:
        await _refuse(websocket, "invalid_request", str(error), CLOSE_POLICY, timeout_s)
        return

    async def receive() -> bytes | str | None:
        try:
            message = await websocket.receive()
        except (WebSocketDisconnect, RuntimeError):
            return None
        if message["type"] == "websocket.disconnect":
            return None
        return message.get("bytes") if message.get("bytes") is not None else message.get("text", "")

    session = StreamSession(
        state.engine,
        options,
        StreamLimits.from_settings(settings),
        send=websocket.send_json,
        describe_error=_describe,
        stopping=lambda: state.draining,
    )
    metrics = state.metrics
    started = time.monotonic()
    state.work_started()
    metrics.stream_sessions_open.inc()
    close_code: int | None = None
    try:
        reason = await session.serve(receive)
    except (WebSocketDisconnect, RuntimeError, OSError):  # uvicorn's ClientDisconnected is an OSError
        reason = None  # the socket went away while we sent
    finally:
        metrics.stream_sessions_open.dec()
        state.work_finished()
    if session.stalled:
        _abort(websocket)
    elif reason is not None:
        close_code = CLOSE_GOING_AWAY if reason == "shutdown" else CLOSE_NORMAL
        with contextlib.suppress(Exception):
            await asyncio.wait_for(websocket.close(close_code), timeout_s)
        _abort_later(websocket, CLOSE_WAIT_S)
    ended = reason or ("stalled" if session.stalled else "disconnect")
    metrics.stream_sessions.labels(ended).inc()
    client = websocket.client
    # As uvicorn logs the open ('"WebSocket /v1/stream?..." [accepted]'), with the key redacted.
    log.info(
        '%s - "WebSocket %s" closed: %s (code %s), %.1f s, frames received %d, answered %d, '
        "refused %d, dropped %d",
        f"{client.host}:{client.port}" if client else "-",
        websocket.url.path + (f"?{websocket.url.query}" if websocket.url.query else ""),
        ended,
        close_code if close_code is not None else "none",
        time.monotonic() - started,
        session.frames_received,
        session.frames_processed,
        session.frames_refused,
        session.dropped_total,
    )


# -- videos ------------------------------------------------------------------------------------


class VideoForm(BaseModel):
    model_config = {"extra": "forbid"}

    fps: float = Field(
        2.0,
        ge=MIN_FPS,
        description=f"Frames sampled per second of video, from {MIN_FPS:g} (one per 100 s) to the "
        "server's --video-max-fps (default 10).",
    )
    max_faces: int | None = Field(None, ge=1)
    min_face_size: int | None = Field(None, ge=0)
    return_landmarks: bool = False
    top_k: int | None = Field(None, ge=1)
    smoothing_tau_ms: float | None = Field(None, ge=0, description="Smoothing time constant, ms.")


class TimelinePoint(BaseModel):
    t: float = Field(description="Seconds from the video's first frame.")
    frame: int = Field(description="Index among the sampled frames.")
    box: schemas.Box
    landmarks: list[tuple[float, float]] | None = None
    expression: str
    scores: dict[str, float]
    top: list[schemas.LabelScore] | None = None
    smoothed: dict[str, float] = Field(description="The track's EMA of scores at this point.")
    fresh: bool = Field(
        True,
        description="Whether the face was classified on this frame; false: its track's last scores "
        "were reused (a tracked video, the face's crop had barely changed).",
    )


class TrackSummary(BaseModel):
    expression: str = Field(description="Argmax of mean_scores.")
    mean_scores: dict[str, float]
    expression_frames: dict[str, int] = Field(description="Frames per top expression.")


class VideoTrack(BaseModel):
    track_id: int
    first_s: float
    last_s: float
    frames: int
    summary: TrackSummary
    timeline: list[TimelinePoint]


class VideoInfo(BaseModel):
    duration_s: float
    width: int
    height: int
    source_fps: float | None
    sample_fps: float
    frames_sampled: int
    frames_with_faces: int
    tracked: bool = Field(
        False,
        description="Whether frames were planned from the last frame's faces (sample_fps at least "
        "the server's --video-track-min-fps): faces followed between detections, unchanged faces' "
        "scores reused.",
    )
    frames_followed: int = Field(0, description="Sampled frames whose faces were followed, no detector run.")


class VideoTimings(BaseModel):
    decode_ms: float
    total_ms: float


class VideoResponse(BaseModel):
    model: schemas.ModelRef
    video: VideoInfo
    tracks: list[VideoTrack]
    timings: VideoTimings


_VIDEO_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    **form_properties(VideoForm),
                },
            }
        }
    },
}
_VIDEO_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.ErrorBody, "description": text}
    for status, text in {
        400: "Malformed multipart body.",
        401: "Missing or invalid API key.",
        413: "The file exceeds --video-max-bytes or the video --video-max-duration-s.",
        415: "Not a readable video.",
        422: "A field is invalid or unknown.",
        429: "Queue full; retry after Retry-After.",
        503: "Starting up or draining.",
        504: "The request's deadline passed.",
    }.items()
}


@router.post(
    "/v1/videos",
    response_model=VideoResponse,
    responses=_VIDEO_ERRORS,
    dependencies=[ApiKey],
    openapi_extra={"requestBody": _VIDEO_BODY},
    tags=["videos"],
)
async def videos(request: Request, state: StateDep, engine: EngineDep) -> VideoResponse:
    """One timeline per tracked face of a video file, sampled at `fps`, with a per-track summary.

    Send `multipart/form-data` with one `file` (any container and codec FFmpeg reads: MP4, WebM,
    MKV, AVI ...). Header `X-Request-Timeout-Ms` sets the deadline, as for /v1/expressions.
    """
    settings = state.settings
    deadline = _deadline(request, settings.default_timeout_ms, settings.max_timeout_ms)
    state.work_started()
    form = None
    try:
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
            raise ApiError(422, "invalid_request", "no video: send multipart/form-data with a 'file' part")
        try:
            # The video limit holds while the body streams in: a 200 MB upload is refused at the
            # chunk that crosses --video-max-bytes, not read whole first.
            form = await parse_multipart(
                request, settings, max_file_bytes=settings.video_max_bytes, file_kind="video"
            )
        except ClientDisconnect:
            raise _client_gone(state) from None
        except ApiError as error:
            if error.status == 413:
                state.metrics.reject("too_large")
            raise
        upload, fields = None, {}
        for key, value in form.multi_items():
            if key == "file" and isinstance(value, UploadFile) and upload is None:
                upload = value
            elif isinstance(value, UploadFile) or key in fields:
                raise ApiError(422, "invalid_request", f"unexpected part {key!r}; send one 'file'")
            else:
                fields[key] = value
        if upload is None:
            raise ApiError(422, "invalid_request", "no video: add a 'file' part")
        form_options = validate_form(fields, VideoForm)
        options = VideoOptions(
            fps=form_options.fps,
            request=RequestOptions(
                max_faces=form_options.max_faces,
                min_face_size=form_options.min_face_size,
                return_landmarks=form_options.return_landmarks,
                top_k=form_options.top_k,
            ),
            tau_ms=settings.stream_smoothing_tau_ms
            if form_options.smoothing_tau_ms is None
            else form_options.smoothing_tau_ms,
        )
        result = await _analyse_unless_disconnected(request, engine, upload.file, options, deadline, state)
    finally:
        state.work_finished()
        if form is not None:
            await form.close()
    return _video_response(engine.info, result)


async def _analyse_unless_disconnected(
    request: Request, engine: Any, source: Any, options: VideoOptions, deadline: float, state: ServiceState
) -> VideoResult:
    """Analyse the video, but stop decoding (and drop its queued frames) if the client leaves, or
    when a drain reaches its deadline: answered 503 then, where uvicorn would cancel the request
    (a 500 and a traceback)."""
    work = asyncio.ensure_future(analyse_video(engine, source, options, deadline))
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    drain = asyncio.ensure_future(_drain_deadline(state))
    try:
        done, _ = await asyncio.wait({work, watcher, drain}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            work.cancel()
            with contextlib.suppress(BaseException):
                await work  # the decode stops at its next frame
            if watcher in done:
                raise _client_gone(state)
            state.metrics.reject("shutdown")
            raise ApiError(
                503, "not_ready", "the server shut down before the video was done; retry elsewhere"
            )
        try:
            return work.result()
        except VideoRejected as error:
            if error.code in {"too_large", "too_long"}:
                state.metrics.reject("too_large")
            raise
    finally:
        watcher.cancel()
        drain.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(BaseException):
                await work


async def _drain_deadline(state: ServiceState) -> None:
    """Returns when the server is draining and its drain deadline has come."""
    await state.drain_started.wait()
    await asyncio.sleep(state.drain_remaining_s())


def _video_response(info: Any, result: VideoResult) -> VideoResponse:
    tracks = []
    for track in result.tracks:
        timeline = []
        for point in track.points:
            face = point.face
            timeline.append(
                TimelinePoint(
                    t=point.time_s,
                    frame=point.frame_index,
                    **face_fields(face),
                    smoothed=point.smoothed,
                    fresh=point.fresh,
                )
            )
        mean = track.mean_scores(info.class_names)
        tracks.append(
            VideoTrack(
                track_id=track.track_id,
                first_s=track.points[0].time_s,
                last_s=track.points[-1].time_s,
                frames=len(track.points),
                summary=TrackSummary(
                    expression=max(mean, key=mean.__getitem__),
                    mean_scores=mean,
                    expression_frames=track.expression_frames(),
                ),
                timeline=timeline,
            )
        )
    return VideoResponse(
        model=schemas.ModelRef(name=info.name, version=info.version, classes=list(info.class_names)),
        video=VideoInfo(
            duration_s=result.duration_s,
            width=result.width,
            height=result.height,
            source_fps=result.source_fps,
            sample_fps=result.sample_fps,
            frames_sampled=result.frames_sampled,
            frames_with_faces=result.frames_with_faces,
            tracked=result.tracked,
            frames_followed=result.frames_followed,
        ),
        tracks=tracks,
        timings=VideoTimings(decode_ms=result.decode_s * 1000, total_ms=result.total_s * 1000),
    )
