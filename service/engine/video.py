"""A video file -> one timeline of tracked faces per person, sampled at a requested rate.

PyAV (FFmpeg in its wheels) decodes. At a sampling rate of at least `video_track_min_fps` the
frames go through `Engine.infer` one after another, each planned from the last one's faces by a
`FrameFollower` as a stream's are (followed faces skip the detector, unchanged ones reuse their
scores), the next frame decoding meanwhile; below it samples lie too far apart for that to stay
as accurate, and each goes through the full per-frame pipeline like an uploaded photo, several at
a time so the batchers can group them. Either way the tracker walks the frames in time order.
Frames are handed to the engine as BMP (a header on the raw pixels: no compression cost,
lossless) or, when that would exceed the image byte limit, as JPEG.

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
import dataclasses
import io
import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import av
import numpy as np
from PIL import Image

from service.engine.batcher import DeadlineExceeded
from service.engine.follow import FrameFollower, TrackingPolicy
from service.engine.pipeline import Engine, FaceResult, ImageResult, InferenceResult, RequestOptions
from service.engine.tracking import FaceTracker, FrameUpdate
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
    # Follow faces between detections (the tracked path) or not; None: as `video_track_min_fps`
    # says for `fps`. For callers of the engine (benchmarks, tests); HTTP uses the setting.
    track: bool | None = None


@dataclass(frozen=True)
class TrackPoint:
    time_s: float
    frame_index: int  # index among the sampled frames
    face: FaceResult
    smoothed: dict[str, float]
    fresh: bool = True  # classified on this frame (False: the track's last scores, reused)


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
    decode_s: float = 0.0  # on the decode thread, overlapping the engine's work when tracked
    total_s: float = 0.0
    tracked: bool = False  # frames planned from the last frame's faces (video_track_min_fps)
    frames_followed: int = 0  # frames whose faces were followed, the detector skipped


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


def _next_timed(frames: Iterator[tuple[float, bytes]]) -> tuple[tuple[float, bytes] | None, float]:
    """The next sampled frame (None: no more, or stopped) and the seconds its decode took."""
    started = time.monotonic()
    try:
        return next(frames, None), time.monotonic() - started
    except _Stopped:
        return None, time.monotonic() - started


class _FrameReader:
    """The sampler's frames, decoded one at a time on a worker thread. `start()` begins the next
    decode so it can run while the engine works; `close()` stops it and waits for the thread."""

    def __init__(self, sampler: _Sampler, metrics: Any) -> None:
        self.sampler = sampler
        self.metrics = metrics
        self.frames = sampler.frames()
        self.decode_s = 0.0
        self.exhausted = False
        self._decoding: asyncio.Future[tuple[tuple[float, bytes] | None, float]] | None = None

    def start(self) -> None:
        if self._decoding is None and not self.exhausted:
            self._decoding = asyncio.get_running_loop().run_in_executor(None, _next_timed, self.frames)

    async def next(self) -> tuple[float, bytes] | None:
        self.start()
        if self._decoding is None:
            return None
        try:
            # Shielded: a cancelled request must not leave the generator running on a thread
            # while it is closed below ("generator already executing"); it is stopped instead.
            item, seconds = await asyncio.shield(self._decoding)
        except DeadlineExceeded:
            if self.metrics is not None:
                self.metrics.reject("deadline")  # the engine counts its own; this one is ours
            raise
        self._decoding = None
        self.decode_s += seconds
        self.exhausted = item is None
        return item

    async def close(self) -> None:
        self.sampler.stop.set()
        decoding = self._decoding
        # The decode returns at its next frame now that `stop` is set; wait for it (a second
        # cancel cannot skip the wait) before closing the generator it runs.
        while decoding is not None and not decoding.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({decoding})
        if decoding is not None and not decoding.cancelled():
            decoding.exception()  # retrieved: the request already fails for another reason
        self.frames.close()


class _Timeline:
    """Per-track points, built frame by frame in time order."""

    def __init__(self, class_names: tuple[str, ...]) -> None:
        self.class_names = class_names
        self.tracks: dict[int, VideoTrack] = {}
        self.frames = 0
        self.with_faces = 0
        self.followed = 0

    def probabilities(self, image: ImageResult) -> list[np.ndarray]:
        return [np.array([f.scores[c] for c in self.class_names]) for f in image.faces]

    def add(self, time_s: float, image: ImageResult, update: FrameUpdate, fresh: list[bool]) -> None:
        index = self.frames
        self.frames += 1
        self.with_faces += bool(image.faces)
        self.followed += bool(image.frame is not None and image.frame.followed)
        for face, tracked, new in zip(image.faces, update.faces, fresh, strict=True):
            smoothed = {c: float(p) for c, p in zip(self.class_names, tracked.smoothed, strict=True)}
            track = self.tracks.setdefault(tracked.track_id, VideoTrack(tracked.track_id))
            track.points.append(TrackPoint(time_s, index, face, smoothed, new))


def tracks_video(settings: Settings, fps: float) -> bool:
    """Whether a video sampled at `fps` goes through the tracked path (`video_track_min_fps`)."""
    return settings.video_track_min_fps > 0 and fps >= settings.video_track_min_fps


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
    sampler = await asyncio.to_thread(_Sampler, source, options.fps, settings, deadline=deadline)
    reader = _FrameReader(sampler, metrics)
    tracker = FaceTracker(tau_ms=options.tau_ms, ttl_ms=max(1000.0, 2500.0 / options.fps))
    timeline = _Timeline(engine.class_names)
    tracked = tracks_video(settings, options.fps) if options.track is None else options.track
    try:
        if tracked:
            await _followed_frames(engine, reader, tracker, timeline, options, deadline)
        else:
            await _windowed_frames(engine, reader, tracker, timeline, options, deadline)
    finally:
        await reader.close()
        if metrics is not None:
            metrics.video_frames_decoded.inc(sampler.frames_decoded)
            metrics.video_decode.observe(reader.decode_s)

    duration = sampler.declared_s if sampler.declared_s is not None else sampler.last_time_s
    if metrics is not None:
        metrics.videos.inc()
        metrics.video_frames_sampled.inc(timeline.frames)
    return VideoResult(
        duration_s=float(duration),
        width=sampler.width,
        height=sampler.height,
        source_fps=sampler.source_fps,
        sample_fps=options.fps,
        frames_sampled=timeline.frames,
        frames_with_faces=timeline.with_faces,
        tracks=sorted(timeline.tracks.values(), key=lambda tr: tr.track_id),
        decode_s=reader.decode_s,
        total_s=time.monotonic() - started,
        tracked=tracked,
        frames_followed=timeline.followed,
    )


async def _windowed_frames(
    engine: Engine,
    reader: _FrameReader,
    tracker: FaceTracker,
    timeline: _Timeline,
    options: VideoOptions,
    deadline: float | None,
) -> None:
    """Every sampled frame through the full per-frame pipeline, several in the engine at once."""
    # Enough frames in the engine at once to fill a detection batch, few enough to bound memory:
    # by count, and by pixels (each frame in flight holds its RGB copy and the engine's decode).
    frame_pixels = max(1, reader.sampler.width * reader.sampler.height)
    window = max(2, min(engine.settings.detect_max_batch_size, WINDOW_PIXELS // frame_pixels))
    pending: deque[tuple[float, asyncio.Task[InferenceResult]]] = deque()
    sent = 0
    try:
        while True:
            while len(pending) < window:
                item = await reader.next()
                if item is None:
                    break
                t, data = item
                # The first frame is judged by admission control like any request; the rest
                # belong to a video already accepted, so its own frames cannot shed it.
                request = engine.infer([data], options.request, deadline, shed=sent == 0)
                pending.append((t, asyncio.ensure_future(request)))
                sent += 1
            if not pending:
                return
            t, task = pending.popleft()
            (image,) = (await task).images
            probs = timeline.probabilities(image)
            update = tracker.update(timeline.frames, t * 1000.0, [f.box for f in image.faces], probs)
            timeline.add(t, image, update, [True] * len(image.faces))
    finally:
        for _, task in pending:
            task.cancel()


async def _followed_frames(
    engine: Engine,
    reader: _FrameReader,
    tracker: FaceTracker,
    timeline: _Timeline,
    options: VideoOptions,
    deadline: float | None,
) -> None:
    """Sampled frames one after another, each planned from the faces of the one before (as a
    stream's are): followed frames skip the detector and unchanged faces reuse their scores. The
    next frame decodes while the engine works on this one."""
    follower = FrameFollower(
        tracker,
        # A timeline reports every point's scores, and a borderline face's answer flips between
        # near-identical crops: scores older than `video_classify_every` frames are not reused.
        dataclasses.replace(
            TrackingPolicy.from_settings(engine.settings), classify_every=engine.settings.video_classify_every
        ),
        crop_std=engine.info.std,
        can_follow=engine.face_backend.can_refit,
        # Phase 0, not a stream's random phase: the same file gives the same answer, and videos
        # that start together can share their detection batches.
        phase=0,
        # Detected frames are searched as the per-frame path searches them, and a face a
        # detection missed is looked for again on the next frame, as the per-frame path would.
        retry=True,
        redetect_lost=True,
    )
    item = await reader.next()
    while item is not None:
        t, data = item
        index = timeline.frames
        work = asyncio.ensure_future(
            engine.infer([data], options.request, deadline, shed=index == 0, plan=follower.plan())
        )
        reader.start()
        try:
            result = await work
        finally:
            if not work.done():
                work.cancel()
        (image,) = result.images
        followed = follower.record(index, t * 1000.0, image, timeline.probabilities(image))
        timeline.add(t, image, followed.update, followed.fresh)
        item = await reader.next()
