"""One live-stream session (docs/streaming.md): frames in, tracked faces and smoothed expressions out.

Transport-agnostic: the HTTP layer hands in a `receive` coroutine (bytes, str, or None once the
socket closed) and a `send` coroutine for JSON-able dicts. Frames go through `Engine.infer`, so
they share the batchers with every other request. One frame per session is in the engine at a
time; up to `queue_frames` more wait, and a new frame beyond that drops the oldest waiting one,
so a slow session lags by a bounded number of frames and never holds unbounded memory.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.engine.batcher import DeadlineExceeded, QueueFull
from service.engine.follow import FrameFollower, TrackingPolicy
from service.engine.pipeline import (
    Engine,
    FaceResult,
    ImageRejected,
    InferenceResult,
    InvalidRequest,
    NotReady,
    RequestOptions,
)
from service.engine.tracking import FaceTracker, TrackEvent
from service.settings import Settings

PROTOCOL_VERSION = 1
# How often an idle session checks its duration limit and the server's drain flag.
POLL_S = 0.25
FRAME_ERRORS = (ImageRejected, InvalidRequest, QueueFull, DeadlineExceeded)
# A reply lists at most this many dropped frames (the most recent); `dropped_counts` counts all, so a
# flood of frames over the rate limit costs counters, not a list that grows until the next reply.
MAX_DROPPED_LISTED = 32
# Open tracks a session keeps at most, per face a frame may hold: a client whose timestamps never
# advance (so no track ever expires) cannot grow the tracker without bound.
TRACKS_PER_FACE = 4

log = logging.getLogger("fermam.stream")

Receive = Callable[[], Awaitable[bytes | str | None]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
DescribeError = Callable[[BaseException], tuple[str, str]]  # exception -> (code, message)


@dataclass(frozen=True)
class StreamLimits:
    max_frame_bytes: int
    max_fps: float
    max_session_s: float
    queue_frames: int
    track_ttl_ms: float
    frame_timeout_s: float
    # The longest a reply may wait for the peer to take it; a client that stops reading is cut off.
    send_timeout_s: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> StreamLimits:
        return cls(
            max_frame_bytes=settings.stream_max_frame_bytes,
            max_fps=settings.stream_max_fps,
            max_session_s=settings.stream_max_session_s,
            queue_frames=settings.stream_queue_frames,
            track_ttl_ms=settings.stream_track_ttl_ms,
            frame_timeout_s=settings.default_timeout_ms / 1000.0,
            send_timeout_s=settings.stream_send_timeout_s,
        )


@dataclass(frozen=True)
class StreamOptions:
    request: RequestOptions
    tau_ms: float


_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_QUERY_FIELDS = {"max_faces", "min_face_size", "return_landmarks", "top_k", "smoothing_tau_ms", "api_key"}


def parse_stream_options(params: Mapping[str, str], settings: Settings) -> StreamOptions:
    """The session's options from the handshake's query string; InvalidRequest on a bad one."""
    unknown = set(params) - _QUERY_FIELDS
    if unknown:
        raise InvalidRequest(f"unknown query parameters: {', '.join(sorted(unknown))}")

    def number(name: str, kind: type, low: float, high: float) -> Any:
        if name not in params:
            return None
        try:
            value = kind(params[name])
        except ValueError:
            raise InvalidRequest(f"{name} must be a {kind.__name__}") from None
        if not low <= value <= high:
            raise InvalidRequest(f"{name} must be between {low} and {high}")
        return value

    landmarks = params.get("return_landmarks", "false").lower()
    if landmarks not in _BOOL:
        raise InvalidRequest("return_landmarks must be true or false")
    tau = number("smoothing_tau_ms", float, 0, 600_000)
    request = RequestOptions(
        max_faces=number("max_faces", int, 1, settings.max_faces),
        min_face_size=number("min_face_size", int, 0, 1_000_000),
        return_landmarks=_BOOL[landmarks],
        top_k=number("top_k", int, 1, 64),
    )
    return StreamOptions(request, settings.stream_smoothing_tau_ms if tau is None else tau)


class PeerStalled(Exception):
    """A reply could not be handed to the peer within `send_timeout_s`: it stopped reading."""


def json_frame_limit(max_frame_bytes: int) -> int:
    """Longest text message that can hold a frame of `max_frame_bytes` (base64 plus the JSON
    around it): a longer one is refused before it is parsed."""
    return (max_frame_bytes + 2) // 3 * 4 + 4096


def _client_timestamp(value: Any) -> float | None:
    """A finite JSON number (not true/false), or None if the message's `timestamp_ms` is invalid."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    stamp = float(value)  # an int beyond a float's range overflows to inf
    return stamp if math.isfinite(stamp) else None


@dataclass
class _Frame:
    frame_id: int
    data: bytes
    timestamp_ms: float
    arrived: float  # monotonic


_FACE_FIELDS = {"box", "score", "detected", "landmarks", "expression", "scores", "top"}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def face_json(face: FaceResult) -> dict[str, Any]:
    """A face as `POST /v1/expressions` shows it (fields FaceResult gains later pass through)."""
    x, y, w, h = face.box
    out: dict[str, Any] = {
        "box": {"x": x, "y": y, "width": w, "height": h, "score": face.score},
        "landmarks": None if face.landmarks is None else [[float(a), float(b)] for a, b in face.landmarks],
        "expression": face.expression,
        "scores": face.scores,
        "top": None if face.top is None else [{"label": k, "score": v} for k, v in face.top],
    }
    for extra in dataclasses.fields(face):
        if extra.name not in _FACE_FIELDS:
            out[extra.name] = _plain(getattr(face, extra.name))
    return out


def event_json(event: TrackEvent) -> dict[str, Any]:
    if event.kind == "track_start":
        return {
            "type": "track_start",
            "track_id": event.track_id,
            "frame_id": event.frame_id,
            "timestamp_ms": event.timestamp_ms,
        }
    return {
        "type": "track_end",
        "track_id": event.track_id,
        "last_frame_id": event.frame_id,
        "last_timestamp_ms": event.timestamp_ms,
        "reason": event.reason,
    }


class StreamSession:
    """A session's queue, rate limit, tracker and replies; `serve` runs it to its end."""

    def __init__(
        self,
        engine: Engine,
        options: StreamOptions,
        limits: StreamLimits,
        *,
        send: Send,
        describe_error: DescribeError,
        stopping: Callable[[], bool] = lambda: False,
        policy: TrackingPolicy | None = None,
    ) -> None:
        self.engine = engine
        self.policy = policy or TrackingPolicy.from_settings(engine.settings)
        self.metrics = getattr(engine, "metrics", None)
        self.options = options
        self.limits = limits
        self.session_id = uuid.uuid4().hex
        self._send_raw = send
        self._send_lock = asyncio.Lock()  # the reader (errors) and the processor (results) both send
        self._describe = describe_error
        self._stopping = stopping
        self._started = time.monotonic()
        self._queue: deque[_Frame] = deque()
        self._wakeup = asyncio.Event()
        max_faces = options.request.max_faces or engine.settings.max_faces
        self._tracker = FaceTracker(
            tau_ms=options.tau_ms, ttl_ms=limits.track_ttl_ms, max_open=TRACKS_PER_FACE * max_faces
        )
        self._follower = FrameFollower(
            self._tracker,
            self.policy,
            crop_std=engine.info.std,
            can_follow=engine.face_backend.can_refit,
            # Sessions that start together would detect on the same frames, every N frames, and
            # queue behind one another's ~200 ms searches: each starts its cadence at its own phase.
            phase=random.randrange(self.policy.detect_every),
        )
        self._tokens = max(1.0, limits.max_fps)
        self._tokens_at = self._started
        # Frames dropped since the last reply: the most recent listed, all counted by reason.
        self._dropped: deque[dict[str, Any]] = deque(maxlen=MAX_DROPPED_LISTED)
        self._dropped_counts: dict[str, int] = {}
        self._current: asyncio.Task[InferenceResult] | None = None
        self._last_ts: float | None = None
        self._ending = False
        self._closed = False
        self.frames_received = 0
        self.frames_processed = 0
        self.frames_refused = 0  # frames answered with an error instead of a result
        self.dropped_total = 0
        self.stalled = False  # the peer stopped taking replies (see PeerStalled)

    # -- messages ---------------------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        info, o, lim = self.engine.info, self.options.request, self.limits
        s = self.engine.settings
        return {
            "type": "session",
            "protocol": PROTOCOL_VERSION,
            "session_id": self.session_id,
            "model": {"name": info.name, "version": info.version, "classes": list(info.class_names)},
            "options": {
                "max_faces": o.max_faces or s.max_faces,
                "min_face_size": s.min_face_size if o.min_face_size is None else o.min_face_size,
                "return_landmarks": o.return_landmarks,
                "top_k": o.top_k,
            },
            "smoothing": {"method": "ema", "tau_ms": self.options.tau_ms},
            "limits": {
                "max_frame_bytes": lim.max_frame_bytes,
                "max_fps": lim.max_fps,
                "max_session_s": lim.max_session_s,
                "queue_frames": lim.queue_frames,
                "track_ttl_ms": lim.track_ttl_ms,
            },
        }

    async def _send(self, message: dict[str, Any]) -> None:
        """Send, or raise PeerStalled once the peer has not taken it within `send_timeout_s`
        (the lock counts: a reply waits behind one stuck sending)."""

        async def locked() -> None:
            async with self._send_lock:
                await self._send_raw(message)

        try:
            await asyncio.wait_for(locked(), self.limits.send_timeout_s)
        except TimeoutError:
            self.stalled = True
            raise PeerStalled(f"the client took no reply for {self.limits.send_timeout_s:g} s") from None

    def _now_ms(self) -> float:
        return (time.monotonic() - self._started) * 1000.0

    async def _error(self, code: str, message: str, frame_id: int | None) -> None:
        if frame_id is not None:
            self.frames_refused += 1
            if self.metrics is not None:
                self.metrics.stream_frame_errors.labels(code).inc()
        await self._send({"type": "error", "code": code, "message": message, "frame_id": frame_id})

    # -- frames in --------------------------------------------------------------------------------

    async def offer(self, message: bytes | str) -> None:
        """One client message: a binary frame, a JSON frame, or `end`."""
        if isinstance(message, bytes):
            self._count_received()
            await self._offer_frame(message, None)
            return
        if len(message) > json_frame_limit(self.limits.max_frame_bytes):
            # Not parsed: a 16 MB text message of JSON would cost hundreds of MB as Python objects.
            self._count_received()
            frame_id = self.frames_received
            self.frames_received += 1
            await self._error(
                "too_large", f"message longer than a frame of {self.limits.max_frame_bytes} bytes", frame_id
            )
            return
        try:
            parsed = json.loads(message)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
            parsed = None
        kind = parsed.get("type") if isinstance(parsed, dict) else None
        if kind == "end":
            self._ending = True
            self._wakeup.set()
        elif kind == "frame":
            self._count_received()
            await self._offer_json_frame(parsed)
        else:
            await self._error(
                "invalid_request", "expected a binary frame, a 'frame' or an 'end' message", None
            )

    async def _offer_json_frame(self, parsed: dict[str, Any]) -> None:
        frame_id = self.frames_received
        data, raw_stamp = parsed.get("data"), parsed.get("timestamp_ms")
        stamp = None if raw_stamp is None else _client_timestamp(raw_stamp)
        if not isinstance(data, str) or (raw_stamp is not None and stamp is None):
            self.frames_received += 1
            await self._error(
                "invalid_request", "'data' must be base64 text, 'timestamp_ms' a finite number", frame_id
            )
            return
        text = data.partition(",")[2] if data.startswith("data:") else data
        if len(text) * 3 // 4 > self.limits.max_frame_bytes + 3:
            self.frames_received += 1
            await self._error("too_large", f"frame larger than {self.limits.max_frame_bytes} bytes", frame_id)
            return
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self.frames_received += 1
            await self._error("invalid_request", "'data' is not valid base64", frame_id)
            return
        await self._offer_frame(raw, stamp)

    async def _offer_frame(self, data: bytes, timestamp_ms: float | None) -> None:
        frame_id = self.frames_received
        self.frames_received += 1
        if self._ending:
            await self._error("invalid_request", "frame after 'end'", frame_id)
            return
        if len(data) > self.limits.max_frame_bytes:
            await self._error(
                "too_large",
                f"frame of {len(data)} bytes; the limit is {self.limits.max_frame_bytes}",
                frame_id,
            )
            return
        stamp = self._now_ms() if timestamp_ms is None else timestamp_ms
        if self._last_ts is not None and stamp < self._last_ts:
            await self._error("invalid_request", "timestamp_ms decreased", frame_id)
            return
        if not self._take_token():
            self._drop(frame_id, "rate_limit")
            return
        self._last_ts = stamp
        if len(self._queue) >= self.limits.queue_frames:
            self._drop(self._queue.popleft().frame_id, "backpressure")
        self._queue.append(_Frame(frame_id, data, stamp, time.monotonic()))
        self._wakeup.set()

    def _take_token(self) -> bool:
        """Token bucket: `max_fps` per second, one second of burst."""
        now = time.monotonic()
        capacity = max(1.0, self.limits.max_fps)
        self._tokens = min(capacity, self._tokens + (now - self._tokens_at) * self.limits.max_fps)
        self._tokens_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _drop(self, frame_id: int, reason: str) -> None:
        self._dropped.append({"frame_id": frame_id, "reason": reason})
        self._dropped_counts[reason] = self._dropped_counts.get(reason, 0) + 1
        self.dropped_total += 1
        if self.metrics is not None:
            self.metrics.stream_frames_dropped.labels(reason).inc()

    def _take_dropped(self) -> dict[str, Any]:
        """The reply fields of the frames dropped since the last reply; starts the next count."""
        fields = {"dropped": list(self._dropped), "dropped_counts": dict(self._dropped_counts)}
        self._dropped.clear()
        self._dropped_counts = {}
        return fields

    def _count_received(self) -> None:
        if self.metrics is not None:
            self.metrics.stream_frames_received.inc()

    def close(self) -> None:
        """The socket is gone: free its queued frames and its frame in the engine."""
        if not self._closed and self.metrics is not None and self._queue:
            self.metrics.stream_frames_dropped.labels("closed").inc(len(self._queue))
        self._closed = True
        self._queue.clear()
        if self._current is not None:
            self._current.cancel()
        self._wakeup.set()

    # -- the session ------------------------------------------------------------------------------

    async def serve(self, receive: Receive) -> str | None:
        """Run until the session ends; the end reason, or None if the client went away or stopped
        taking replies (`stalled` then says which)."""
        reader: asyncio.Future[None] | None = None
        try:
            await self._send(self.hello())
            reader = asyncio.ensure_future(self._read(receive))
            return await self._process()
        except PeerStalled:
            return None
        finally:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
            self.close()

    async def _read(self, receive: Receive) -> None:
        try:
            while not self._closed:
                message = await receive()
                if message is None:
                    break
                try:
                    await self.offer(message)
                except PeerStalled:
                    break
                except Exception:  # a bug in reading one message must not drop the socket unannounced
                    log.exception("stream %s: a client message could not be handled", self.session_id)
                    await self._error("internal", "internal error; it was logged", None)
        except PeerStalled:
            pass
        finally:
            self.close()

    async def _process(self) -> str | None:
        while True:
            if self._closed:
                return None
            reason = self._end_reason()
            if reason is not None:
                await self._finish(reason)
                return reason
            if not self._queue:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), POLL_S)
                continue
            frame = self._queue.popleft()
            await self._run_frame(frame)

    def _end_reason(self) -> str | None:
        if self._stopping():
            return "shutdown"
        if time.monotonic() - self._started >= self.limits.max_session_s:
            return "max_duration"
        if self._ending and not self._queue:
            return "client_end"
        return None

    async def _run_frame(self, frame: _Frame) -> None:
        deadline = time.monotonic() + self.limits.frame_timeout_s
        self._current = current = asyncio.ensure_future(
            self.engine.infer([frame.data], self.options.request, deadline, plan=self._follower.plan())
        )
        try:
            # The session's length holds even while a frame is in the engine.
            remaining = self._started + self.limits.max_session_s - time.monotonic()
            done, _ = await asyncio.wait({current}, timeout=max(0.0, remaining))
            if not done:
                current.cancel()
                self._drop(frame.frame_id, "max_duration")
                return
            result = current.result()
        except asyncio.CancelledError:
            if self._closed:
                return
            raise
        except NotReady:
            self._stopping = lambda: True
            return
        except FRAME_ERRORS as error:
            code, message = self._describe(error)
            await self._error(code, message, frame.frame_id)
            return
        finally:
            if not current.done():
                current.cancel()
            self._current = None
        self.frames_processed += 1
        reply = self._result(frame, result)
        if self.metrics is not None:
            self.metrics.stream_frames_answered.inc()
            self.metrics.stream_frame_latency.observe(time.monotonic() - frame.arrived)
        await self._send(reply)

    def _result(self, frame: _Frame, result: InferenceResult) -> dict[str, Any]:
        (image,) = result.images
        probs = [np.array([f.scores[c] for c in self.engine.class_names]) for f in image.faces]
        followed = self._follower.record(frame.frame_id, frame.timestamp_ms, image, probs)
        update, fresh = followed.update, followed.fresh
        faces = []
        for k, (face, tracked) in enumerate(zip(image.faces, update.faces, strict=True)):
            smoothed = {c: float(p) for c, p in zip(self.engine.class_names, tracked.smoothed, strict=True)}
            entry = {"track_id": tracked.track_id, **face_json(face)}
            entry["smoothed"] = {"expression": max(smoothed, key=smoothed.__getitem__), "scores": smoothed}
            entry["fresh"] = fresh[k]
            faces.append(entry)
        t = result.timings
        return {
            "type": "result",
            "frame_id": frame.frame_id,
            "timestamp_ms": frame.timestamp_ms,
            "width": image.width,
            "height": image.height,
            "faces": faces,
            "events": [event_json(e) for e in update.events],
            **self._take_dropped(),
            "dropped_total": self.dropped_total,
            "timings": {
                "queue_ms": t.queue_s * 1000,
                "inference_ms": t.inference_s * 1000,
                "total_ms": t.total_s * 1000,
                "latency_ms": (time.monotonic() - frame.arrived) * 1000,
            },
        }

    async def _finish(self, reason: str) -> None:
        for frame in self._queue:
            self._drop(frame.frame_id, reason)
        self._queue.clear()
        await self._send(
            {
                "type": "session_end",
                "reason": reason,
                "frames_received": self.frames_received,
                "frames_processed": self.frames_processed,
                "frames_refused": self.frames_refused,
                **self._take_dropped(),
                "dropped_total": self.dropped_total,
                "events": [event_json(e) for e in self._tracker.close()],
            }
        )
