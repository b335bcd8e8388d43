"""Face tracks across frames and their smoothed expressions (streams and videos; no I/O here).

Why IoU matching and not a tracking library (checked on PyPI, 2026-12):
- norfair 2.3.0 (the newest) requires `numpy<2` (we run numpy 2.x) plus filterpy and rich;
- bytetracker 0.3.2 (ByteTrack packaged) pins `torch==1.13.0`, `scipy==1.9.3` and `lap==0.4.0`.
Neither installs beside our pins. What they add over plain IoU matching is a constant-velocity
Kalman filter (for long occlusions and fast motion at low frame rates) and, in ByteTrack, a second
pass over low-score detections. Our face detectors return few, high-confidence boxes, and at the
5-30 fps a camera stream sends, a face moves a fraction of its own width between frames, so the
boxes of consecutive frames overlap well and the optimal IoU assignment (Hungarian, scipy, already
a dependency) is the match both libraries would make. A face that is missed for a few frames keeps
its track for `ttl_ms` of frame time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

Box = tuple[float, float, float, float]  # x, y, width, height in image pixels

MIN_IOU = 0.3


def iou_matrix(a: Sequence[Box], b: Sequence[Box]) -> np.ndarray:
    """(len(a), len(b)) intersection over union of xywh boxes."""
    if not a or not b:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    aa = np.asarray(a, dtype=np.float64)[:, None, :]  # (A, 1, 4)
    bb = np.asarray(b, dtype=np.float64)[None, :, :]  # (1, B, 4)
    left = np.maximum(aa[..., 0], bb[..., 0])
    top = np.maximum(aa[..., 1], bb[..., 1])
    right = np.minimum(aa[..., 0] + aa[..., 2], bb[..., 0] + bb[..., 2])
    bottom = np.minimum(aa[..., 1] + aa[..., 3], bb[..., 1] + bb[..., 3])
    inter = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)
    union = aa[..., 2] * aa[..., 3] + bb[..., 2] * bb[..., 3] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


class ExpressionSmoother:
    """Exponential moving average of probabilities with time constant `tau_ms`, on timestamps.

    alpha = 1 - exp(-dt / tau), so the result does not depend on the frame rate or on dropped
    frames; tau 0 means no smoothing. The average of distributions stays a distribution.
    """

    def __init__(self, tau_ms: float) -> None:
        if tau_ms < 0:
            raise ValueError("tau_ms must be >= 0")
        self.tau_ms = tau_ms
        self.value: np.ndarray | None = None
        self.timestamp_ms: float | None = None

    def update(self, probabilities: np.ndarray, timestamp_ms: float) -> np.ndarray:
        p = np.asarray(probabilities, dtype=np.float64)
        if self.value is None or self.timestamp_ms is None or self.tau_ms == 0:
            self.value = p.copy()
        else:
            dt = max(0.0, timestamp_ms - self.timestamp_ms)
            alpha = 1.0 - math.exp(-dt / self.tau_ms)
            self.value = self.value + alpha * (p - self.value)
        self.timestamp_ms = timestamp_ms
        return self.value


@dataclass
class Track:
    track_id: int
    box: Box
    first_frame: int
    first_ms: float
    last_frame: int
    last_ms: float
    smoother: ExpressionSmoother
    hits: int = 1


@dataclass(frozen=True)
class TrackEvent:
    kind: str  # "track_start" | "track_end"
    track_id: int
    frame_id: int  # the first frame (start) or the last matched frame (end)
    timestamp_ms: float
    reason: str | None = None  # for track_end: "lost" or "session_end"


@dataclass(frozen=True)
class TrackedFace:
    """One face of a frame, in the order the faces were given, with its track and smoothing."""

    track_id: int
    smoothed: np.ndarray  # (classes,) float64


@dataclass
class FrameUpdate:
    faces: list[TrackedFace]
    events: list[TrackEvent] = field(default_factory=list)


class FaceTracker:
    """Assigns track ids to each frame's face boxes; frames must come in timestamp order."""

    def __init__(
        self, *, tau_ms: float, ttl_ms: float, min_iou: float = MIN_IOU, max_open: int | None = None
    ) -> None:
        self.tau_ms = tau_ms
        self.ttl_ms = ttl_ms
        self.min_iou = min_iou
        # Most tracks kept open: beyond it the longest unmatched are ended (`lost`) early, so frames
        # whose timestamps never advance (no track ever expires) cannot grow the tracker.
        self.max_open = max_open
        self.tracks: dict[int, Track] = {}
        self._next_id = 1

    def match(self, boxes: Sequence[Box]) -> list[Track | None]:
        """The open track each box belongs to (None: a new face); changes nothing, so `update`
        with the same boxes makes the same matches."""
        open_tracks = list(self.tracks.values())
        overlap = iou_matrix([t.box for t in open_tracks], list(boxes))
        matched: list[Track | None] = [None] * len(boxes)
        if overlap.size:
            rows, cols = linear_sum_assignment(-overlap)
            for row, col in zip(rows, cols, strict=True):
                if overlap[row, col] >= self.min_iou:
                    matched[int(col)] = open_tracks[row]
        return matched

    def update(
        self, frame_id: int, timestamp_ms: float, boxes: Sequence[Box], probabilities: Sequence[np.ndarray]
    ) -> FrameUpdate:
        """Match this frame's faces to open tracks, start new ones, end the ones lost too long."""
        events: list[TrackEvent] = []
        assigned = dict(enumerate(self.match(boxes)))
        faces = []
        for index, (box, probs) in enumerate(zip(boxes, probabilities, strict=True)):
            track = assigned.get(index)
            if track is None:
                track = Track(
                    track_id=self._next_id,
                    box=box,
                    first_frame=frame_id,
                    first_ms=timestamp_ms,
                    last_frame=frame_id,
                    last_ms=timestamp_ms,
                    smoother=ExpressionSmoother(self.tau_ms),
                )
                self._next_id += 1
                self.tracks[track.track_id] = track
                events.append(TrackEvent("track_start", track.track_id, frame_id, timestamp_ms))
            else:
                track.box, track.last_frame, track.last_ms = box, frame_id, timestamp_ms
                track.hits += 1
            faces.append(TrackedFace(track.track_id, track.smoother.update(probs, timestamp_ms).copy()))
        for track in list(self.tracks.values()):
            if timestamp_ms - track.last_ms > self.ttl_ms:
                events.append(self._end(track, "lost"))
        if self.max_open is not None and len(self.tracks) > self.max_open:
            stale = sorted(
                (t for t in self.tracks.values() if t.last_frame != frame_id),
                key=lambda t: (t.last_ms, t.last_frame),
            )
            for track in stale[: len(self.tracks) - self.max_open]:
                events.append(self._end(track, "lost"))
        return FrameUpdate(faces, events)

    def close(self) -> list[TrackEvent]:
        """End every open track (the stream or video is over)."""
        return [self._end(track, "session_end") for track in list(self.tracks.values())]

    def _end(self, track: Track, reason: str) -> TrackEvent:
        del self.tracks[track.track_id]
        return TrackEvent("track_end", track.track_id, track.last_frame, track.last_ms, reason)
