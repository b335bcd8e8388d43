"""A video file -> one timeline of tracked faces per person, sampled at a requested rate.

PyAV (FFmpeg in its wheels) decodes; each sampled frame goes through `Engine.infer` like an
uploaded photo, several at a time so the batchers can group them; the tracker then walks the
frames in time order. Frames are handed to the engine as BMP (a header on the raw pixels: no
compression cost, lossless) or, when that would exceed the image byte limit, as JPEG.

Decoding costs what is sampled, not what the file holds (issue 23: a 1.27 MB file of 290 s of
4K at 60 fps sampled at fps=1e-300 decoded for 82 s): the declared frame size is checked against
`max_image_pixels` before any frame is decoded; decoding stops once the next sample time lies past
the declared duration; a gap between samples longer than the keyframe interval seen so far is
crossed by seeking to the keyframe before the next sample instead of decoding every frame of it;
and the deadline and the caller's cancellation are checked between any two decoded frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import av
import numpy as np
from PIL import Image

from service.engine.batcher import DeadlineExceeded
from service.engine.pipeline import Engine, FaceResult, InferenceResult, RequestOptions
from service.engine.tracking import FaceTracker
from service.settings import Settings

BMP_HEADER_BYTES = 54
JPEG_QUALITY = 92
# The lowest sampling rate: one frame per 100 s (the answer's first frame is always sampled).
MIN_FPS = 0.01
# Seek across a gap between samples only if it is at least this long and longer than the
# keyframe interval seen so far (a seek lands on the keyframe before its target: seeking across
# less than a keyframe interval could land behind the current frame and decode frames twice).
SEEK_MIN_GAP_S = 1.0
# Pixels of sampled frames in the engine at once: four 4K frames (8 640x480 frames fill a batch).
WINDOW_PIXELS = 4 * 3840 * 2160
# Decoder threads: FFmpeg's "auto" starts one frame thread per core, each holding its own frames
# (1.45 GB for a 4K stream on 16 cores); a sampled video is bounded by the engine, not by decoding.
DECODE_THREADS = 2


class _Stopped(Exception):
    """The caller stopped the decode (cancelled: the client left or the server shut down)."""


class VideoRejected(ValueError):
    """The upload cannot be analysed; `code` is `not_a_video`, `too_large` or `too_long`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class VideoOptions:
    fps: float = 2.0
    request: RequestOptions = field(default_factory=lambda: RequestOptions(return_landmarks=False))
    tau_ms: float = 500.0


@dataclass(frozen=True)
class TrackPoint:
    time_s: float
    frame_index: int  # index among the sampled frames
    face: FaceResult
    smoothed: dict[str, float]


@dataclass
class VideoTrack:
    track_id: int
    points: list[TrackPoint] = field(default_factory=list)

    def mean_scores(self, classes: tuple[str, ...]) -> dict[str, float]:
        mean = np.mean([[p.face.scores[c] for c in classes] for p in self.points], axis=0)
        return {c: float(v) for c, v in zip(classes, mean, strict=True)}

    def expression_frames(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for point in self.points:
            counts[point.face.expression] = counts.get(point.face.expression, 0) + 1
        return counts


@dataclass
class VideoResult:
    duration_s: float
    width: int
    height: int
    source_fps: float | None
    sample_fps: float
    frames_sampled: int
    frames_with_faces: int
    tracks: list[VideoTrack]
    decode_s: float = 0.0
    total_s: float = 0.0


def _encode(pixels: np.ndarray, max_bytes: int) -> bytes:
    height, width = pixels.shape[:2]
    out = io.BytesIO()
    if ((width * 3 + 3) // 4 * 4) * height + BMP_HEADER_BYTES <= max_bytes:
        Image.fromarray(pixels).save(out, format="BMP")
    else:
        Image.fromarray(pixels).save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


class _Sampler:
    """Decodes the video lazily and yields (time_s, encoded frame) at the sampling rate.

    `frames()` runs on a worker thread and checks `stop` and `deadline` between decoded frames;
    the caller never closes the generator while a thread is inside it (it sets `stop` and waits).
    """

    def __init__(
        self,
        source: IO[bytes],
        fps: float,
        settings: Settings,
        *,
        deadline: float | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.fps = fps
        self.settings = settings
        self.deadline = deadline
        self.stop = stop or threading.Event()
        self.frames_decoded = 0
        self._can_seek = True
        try:
            self.container = av.open(source, mode="r")
        except (av.error.FFmpegError, ValueError, OSError) as error:
            raise VideoRejected("not_a_video", f"not a readable video: {error}") from None
        if not self.container.streams.video:
            self.container.close()
            raise VideoRejected("not_a_video", "the file has no video stream")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        self.stream.codec_context.thread_count = DECODE_THREADS
        self.width = int(self.stream.codec_context.width or 0)
        self.height = int(self.stream.codec_context.height or 0)
        # The container's declared frame size, before a frame is decoded (a 174 KB file of
        # 7680x7680 H.264 cost 650 MB of decoding before its 413); decoded frames are checked too.
        try:
            self._check_pixels(self.width, self.height)
        except VideoRejected:
            self.container.close()
            raise
        rate = self.stream.average_rate
        self.source_fps = float(rate) if rate else None
        self.declared_s = self._declared_duration()
        if self.declared_s is not None and self.declared_s > settings.video_max_duration_s:
            self.container.close()
            raise VideoRejected(
                "too_long",
                f"video of {self.declared_s:.1f} s; the limit is {settings.video_max_duration_s:g} s",
            )
        self.last_time_s = 0.0

    def _check_pixels(self, width: int, height: int) -> None:
        if width * height > self.settings.max_image_pixels:
            raise VideoRejected(
                "too_large",
                f"video frames of {width}x{height} pixels; the limit is {self.settings.max_image_pixels}",
            )

    def _check_time(self) -> None:
        if self.stop.is_set():
            raise _Stopped
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded("the request's deadline passed while the video was decoding")

    def _declared_duration(self) -> float | None:
        if self.stream.duration is not None and self.stream.time_base is not None:
            return float(self.stream.duration * self.stream.time_base)
        if self.container.duration is not None:
            return self.container.duration / av.time_base
        return None

    def frames(self) -> Iterator[tuple[float, bytes]]:
        step = 1.0 / self.fps
        next_t: float | None = None
        start: float | None = None
        last_key: float | None = None  # time of the last keyframe decoded
        key_interval = math.inf  # the longest interval between two keyframes seen so far
        try:
            while True:
                seek_to: float | None = None
                for frame in self.container.decode(self.stream):
                    self._check_time()
                    self.frames_decoded += 1
                    if frame.time is None:
                        continue
                    start = frame.time if start is None else start
                    t = float(frame.time - start)
                    if frame.key_frame:
                        if last_key is not None and t > last_key:
                            gap = t - last_key
                            key_interval = gap if math.isinf(key_interval) else max(key_interval, gap)
                        last_key = t
                    self.last_time_s = max(self.last_time_s, t)
                    if t > self.settings.video_max_duration_s:
                        raise VideoRejected(
                            "too_long",
                            f"video longer than the limit of {self.settings.video_max_duration_s:g} s",
                        )
                    if next_t is not None and t + 1e-6 < next_t:
                        if self._can_seek and next_t - t > max(SEEK_MIN_GAP_S, key_interval):
                            seek_to = next_t
                            break
                        continue
                    self._check_pixels(frame.width, frame.height)
                    next_t = (math.floor(t / step + 1e-6) + 1) * step
                    pixels = frame.to_ndarray(format="rgb24")
                    yield t, _encode(pixels, self.settings.max_image_bytes)
                    if self.declared_s is not None and next_t > self.declared_s:
                        return  # no sample time left: the rest of the file is not decoded
                if seek_to is None or start is None:
                    return
                self._seek(start + seek_to)
                last_key = None  # the next keyframe's distance to the last is not an interval
        except av.error.FFmpegError as error:
            raise VideoRejected("not_a_video", f"the video could not be decoded: {error}") from None
        finally:
            self.container.close()

    def _seek(self, time_s: float) -> None:
        """To the keyframe at or before `time_s` (stream time); the decoder's buffers are flushed.
        Where the input cannot seek, decoding goes on frame by frame."""
        try:
            offset = int(time_s / self.stream.time_base)
            self.container.seek(offset, backward=True, any_frame=False, stream=self.stream)
        except (av.error.FFmpegError, OverflowError, ValueError, ZeroDivisionError, TypeError):
            self._can_seek = False


def _next_or_none(frames: Iterator[tuple[float, bytes]]) -> tuple[float, bytes] | None:
    try:
        return next(frames, None)
    except _Stopped:
        return None


async def analyse_video(
    engine: Engine, source: IO[bytes], options: VideoOptions, deadline: float | None = None
) -> VideoResult:
    """Tracks and per-frame expressions of a video. Raises VideoRejected, DeadlineExceeded (also
    while decoding) and the engine's errors. Cancelling it stops the decode at the next frame."""
    started = time.monotonic()
    settings = engine.settings
    metrics = getattr(engine, "metrics", None)
    if not MIN_FPS <= options.fps <= settings.video_max_fps:
        raise VideoRejected(
            "invalid_request", f"fps must be between {MIN_FPS:g} and {settings.video_max_fps:g}"
        )
    stop = threading.Event()
    sampler = await asyncio.to_thread(_Sampler, source, options.fps, settings, deadline=deadline, stop=stop)
    frames = sampler.frames()
    # Enough frames in the engine at once to fill a detection batch, few enough to bound memory:
    # by count, and by pixels (each frame in flight holds its RGB copy and the engine's decode).
    frame_pixels = max(1, sampler.width * sampler.height)
    window = max(2, min(settings.detect_max_batch_size, WINDOW_PIXELS // frame_pixels))
    pending: list[tuple[float, asyncio.Task[InferenceResult]]] = []
    done: list[tuple[float, InferenceResult]] = []
    decode_s = 0.0
    loop = asyncio.get_running_loop()
    decoding: asyncio.Future[tuple[float, bytes] | None] | None = None
    try:
        while True:
            while len(pending) < window:
                t0 = time.monotonic()
                # Shielded: a cancelled request must not leave the generator running on a thread
                # while it is closed below ("generator already executing"); it is stopped instead.
                decoding = loop.run_in_executor(None, _next_or_none, frames)
                try:
                    item = await asyncio.shield(decoding)
                except DeadlineExceeded:
                    if metrics is not None:
                        metrics.reject("deadline")  # the engine counts its own; this one is ours
                    raise
                decoding = None
                decode_s += time.monotonic() - t0
                if item is None:
                    break
                t, data = item
                # The first frame is judged by admission control like any request; the rest
                # belong to a video already accepted, so its own frames cannot shed it.
                request = engine.infer([data], options.request, deadline, shed=not pending and not done)
                pending.append((t, asyncio.ensure_future(request)))
            if not pending:
                break
            t, task = pending.pop(0)
            done.append((t, await task))
    finally:
        stop.set()
        for _, task in pending:
            task.cancel()
        # The decode returns at its next frame now that `stop` is set; wait for it (a second
        # cancel cannot skip the wait) before closing the generator it runs.
        while decoding is not None and not decoding.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({decoding})
        if decoding is not None and not decoding.cancelled():
            decoding.exception()  # retrieved: the request already fails for another reason
        frames.close()
        if metrics is not None:
            metrics.video_frames_decoded.inc(sampler.frames_decoded)
            metrics.video_decode.observe(decode_s)

    tracker = FaceTracker(tau_ms=options.tau_ms, ttl_ms=max(1000.0, 2500.0 / options.fps))
    tracks: dict[int, VideoTrack] = {}
    with_faces = 0
    for index, (t, result) in enumerate(done):
        (image,) = result.images
        with_faces += bool(image.faces)
        probs = [np.array([f.scores[c] for c in engine.class_names]) for f in image.faces]
        update = tracker.update(index, t * 1000.0, [f.box for f in image.faces], probs)
        for face, tracked in zip(image.faces, update.faces, strict=True):
            smoothed = {c: float(p) for c, p in zip(engine.class_names, tracked.smoothed, strict=True)}
            track = tracks.setdefault(tracked.track_id, VideoTrack(tracked.track_id))
            track.points.append(TrackPoint(t, index, face, smoothed))
    duration = sampler.declared_s if sampler.declared_s is not None else sampler.last_time_s
    if metrics is not None:
        metrics.videos.inc()
        metrics.video_frames_sampled.inc(len(done))
    return VideoResult(
        duration_s=float(duration),
        width=sampler.width,
        height=sampler.height,
        source_fps=sampler.source_fps,
        sample_fps=options.fps,
        frames_sampled=len(done),
        frames_with_faces=with_faces,
        tracks=sorted(tracks.values(), key=lambda tr: tr.track_id),
        decode_s=decode_s,
        total_s=time.monotonic() - started,
    )
