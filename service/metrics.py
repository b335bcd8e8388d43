"""Prometheus metrics of the service, on a registry of its own (base units, few label values).

Buckets are chosen for what they measure: request durations span a cached CPU hit (~10 ms) to a
crowded GPU queue (tens of seconds); batch compute is finer at the low end; batch sizes are
powers of two because max_batch_size usually is one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

REQUEST_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
QUEUE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
COMPUTE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FACES_BUCKETS = (0, 1, 2, 3, 5, 8, 13, 21, 34, 64)

# `fermam_rejections_total` counts requests (one per refused or dropped request);
# `fermam_batch_items_skipped_total` counts the queued items a batcher dropped (images or faces).
REJECTION_REASONS = (
    "queue_full",
    "overloaded",
    "deadline",
    "cancelled",
    "too_large",
    "bad_image",
    "shutdown",
)
SKIP_REASONS = ("cancelled", "deadline", "shutdown")
# WS /v1/stream: why frames were dropped unanswered (docs/streaming.md; `closed`: queued when the
# socket went away), and how sessions ended (`disconnect`: the client left; `stalled`: it stopped
# taking replies and was cut off).
STREAM_DROP_REASONS = ("backpressure", "rate_limit", "max_duration", "shutdown", "closed")
STREAM_END_REASONS = ("client_end", "max_duration", "shutdown", "disconnect", "stalled")


class ServiceMetrics:
    """All metric families of one service instance; tests and apps each get their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_duration = Histogram(
            "fermam_request_duration_seconds",
            "HTTP request duration, by route template and status code.",
            ["route", "status"],
            buckets=REQUEST_BUCKETS_S,
            registry=r,
        )
        self.requests = Counter(
            "fermam_requests", "HTTP requests answered, by route and status.", ["route", "status"], registry=r
        )
        self.in_flight = Gauge("fermam_requests_in_flight", "Requests being processed now.", registry=r)
        self.queue_wait = Histogram(
            "fermam_queue_wait_seconds",
            "Time an item waited in a stage's queue before its batch ran.",
            ["stage"],
            buckets=QUEUE_BUCKETS_S,
            registry=r,
        )
        self.batch_compute = Histogram(
            "fermam_batch_compute_seconds",
            "Time one batch took in a stage's worker.",
            ["stage"],
            buckets=COMPUTE_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram(
            "fermam_batch_size",
            "Items per batch, by stage.",
            ["stage"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "fermam_queue_depth", "Items waiting in a stage's queue.", ["stage"], registry=r
        )
        self.images = Counter("fermam_images", "Images decoded and processed.", registry=r)
        self.faces = Counter("fermam_faces", "Faces classified.", registry=r)
        self.faces_per_image = Histogram(
            "fermam_faces_per_image", "Faces reported per image.", buckets=FACES_BUCKETS, registry=r
        )
        self.rejections = Counter(
            "fermam_rejections",
            "Requests refused or dropped, by reason (once per request).",
            ["reason"],
            registry=r,
        )
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)
        self.batch_items_skipped = Counter(
            "fermam_batch_items_skipped",
            "Queued items (images or faces) a stage dropped without computing them, by reason.",
            ["stage", "reason"],
            registry=r,
        )
        # -- streams and videos ------------------------------------------------------------------
        self.stream_sessions_open = Gauge(
            "fermam_stream_sessions_open", "WS /v1/stream sessions open now.", registry=r
        )
        self.stream_sessions = Counter(
            "fermam_stream_sessions", "WS /v1/stream sessions ended, by reason.", ["reason"], registry=r
        )
        for reason in STREAM_END_REASONS:
            self.stream_sessions.labels(reason)
        self.stream_frames_received = Counter(
            "fermam_stream_frames_received", "Frames received on WS /v1/stream.", registry=r
        )
        self.stream_frames_answered = Counter(
            "fermam_stream_frames_answered", "Stream frames answered with a result.", registry=r
        )
        self.stream_frames_dropped = Counter(
            "fermam_stream_frames_dropped",
            "Stream frames dropped unanswered, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in STREAM_DROP_REASONS:
            self.stream_frames_dropped.labels(reason)
        self.stream_frame_errors = Counter(
            "fermam_stream_frame_errors",
            "Stream frames answered with an error instead of a result, by error code.",
            ["code"],
            registry=r,
        )
        self.stream_frame_latency = Histogram(
            "fermam_stream_frame_latency_seconds",
            "Time from a stream frame's arrival to its result.",
            buckets=REQUEST_BUCKETS_S,
            registry=r,
        )
        self.videos = Counter(
            "fermam_videos", "Videos decoded to their end (POST /v1/videos answered 200).", registry=r
        )
        self.video_frames_decoded = Counter(
            "fermam_video_frames_decoded", "Video frames decoded (sampled or not).", registry=r
        )
        self.video_frames_sampled = Counter(
            "fermam_video_frames_sampled", "Video frames sampled and sent through the engine.", registry=r
        )
        self.video_decode = Histogram(
            "fermam_video_decode_seconds",
            "Time spent decoding one video (its sampled frames' engine time excluded).",
            buckets=REQUEST_BUCKETS_S,
            registry=r,
        )
        self.model_info = Info("fermam_model", "The loaded model and face backend.", registry=r)
        self.device_memory = Gauge(
            "fermam_device_memory_bytes", "Memory allocated by torch on the model's device.", registry=r
        )

    def stage(self, name: str) -> StageMetrics:
        """The batcher observer of one stage."""
        return StageMetrics(self, name)

    def track_device_memory(self, read_bytes: Callable[[], float]) -> None:
        """Read device memory at scrape time rather than polling it."""
        self.device_memory.set_function(read_bytes)

    def reject(self, reason: str) -> None:
        """Count one refused or dropped request (never its items: see `StageMetrics.skipped`)."""
        self.rejections.labels(reason).inc()

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class StageMetrics:
    """Implements the batcher's observer protocol for one stage's metrics."""

    def __init__(self, metrics: ServiceMetrics, stage: str) -> None:
        self._skipped = {reason: metrics.batch_items_skipped.labels(stage, reason) for reason in SKIP_REASONS}
        self._metrics = metrics
        self._stage = stage
        self._queue_wait = metrics.queue_wait.labels(stage)
        self._compute = metrics.batch_compute.labels(stage)
        self._size = metrics.batch_size.labels(stage)
        self._depth = metrics.queue_depth.labels(stage)

    def queue_depth(self, depth: int) -> None:
        self._depth.set(depth)

    def batch_done(self, size: int, queue_waits_s: Sequence[float], compute_s: float) -> None:
        self._size.observe(size)
        self._compute.observe(compute_s)
        for wait in queue_waits_s:
            self._queue_wait.observe(wait)

    def skipped(self, reason: str, count: int) -> None:
        """Items dropped by the batcher; the request they belong to is counted as a rejection
        once, where the request fails (engine or HTTP layer)."""
        counter = self._skipped.get(reason) or self._metrics.batch_items_skipped.labels(self._stage, reason)
        counter.inc(count)
