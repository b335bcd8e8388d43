"""A video file -> one timeline of tracked faces per person, sampled at a requested rate.

PyAV (FFmpeg in its wheels) decodes; each sampled frame goes through `Engine.infer` like an
uploaded photo, several at a time so the batchers can group them; the tracker then walks the
frames in time order. Frames are handed to the engine as BMP (a header on the raw pixels: no
compression cost, lossless) or, when that would exceed the image byte limit, as JPEG.
"""

from __future__ import annotations

import asyncio
import io
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import av
import numpy as np
from PIL import Image

from service.engine.pipeline import Engine, FaceResult, InferenceResult, RequestOptions
from service.engine.tracking import FaceTracker
from service.settings import Settings

BMP_HEADER_BYTES = 54
JPEG_QUALITY = 92


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
    """Decodes the video lazily and yields (time_s, encoded frame) at the sampling rate."""

    def __init__(self, source: IO[bytes], fps: float, settings: Settings) -> None:
        self.fps = fps
        self.settings = settings
        try:
            self.container = av.open(source, mode="r")
        except (av.error.FFmpegError, ValueError, OSError) as error:
            raise VideoRejected("not_a_video", f"not a readable video: {error}") from None
        if not self.container.streams.video:
            self.container.close()
            raise VideoRejected("not_a_video", "the file has no video stream")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        self.width = int(self.stream.codec_context.width or 0)
        self.height = int(self.stream.codec_context.height or 0)
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
        try:
            for frame in self.container.decode(self.stream):
                if frame.time is None:
                    continue
                start = frame.time if start is None else start
                t = float(frame.time - start)
                self.last_time_s = t
                if t > self.settings.video_max_duration_s:
                    raise VideoRejected(
                        "too_long", f"video longer than the limit of {self.settings.video_max_duration_s:g} s"
                    )
                if next_t is not None and t + 1e-6 < next_t:
                    continue
                next_t = (math.floor(t / step + 1e-6) + 1) * step
                pixels = frame.to_ndarray(format="rgb24")
                yield t, _encode(pixels, self.settings.max_image_bytes)
        except av.error.FFmpegError as error:
            raise VideoRejected("not_a_video", f"the video could not be decoded: {error}") from None
        finally:
            self.container.close()


def _next_or_none(frames: Iterator[tuple[float, bytes]]) -> tuple[float, bytes] | None:
    return next(frames, None)


async def analyse_video(
    engine: Engine, source: IO[bytes], options: VideoOptions, deadline: float | None = None
) -> VideoResult:
    """Tracks and per-frame expressions of a video. Raises VideoRejected and the engine's errors."""
    started = time.monotonic()
    settings = engine.settings
    if not 0 < options.fps <= settings.video_max_fps:
        raise VideoRejected("invalid_request", f"fps must be above 0 and at most {settings.video_max_fps:g}")
    sampler = await asyncio.to_thread(_Sampler, source, options.fps, settings)
    frames = sampler.frames()
    # Enough frames in the engine at once to fill a detection batch, few enough to bound memory.
    window = max(2, settings.detect_max_batch_size)
    pending: list[tuple[float, asyncio.Task[InferenceResult]]] = []
    done: list[tuple[float, InferenceResult]] = []
    decode_s = 0.0
    try:
        while True:
            while len(pending) < window:
                t0 = time.monotonic()
                item = await asyncio.to_thread(_next_or_none, frames)
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
        for _, task in pending:
            task.cancel()
        frames.close()

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
