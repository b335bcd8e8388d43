"""Frames one after another through the engine, each planned from the faces of the one before.

`FrameFollower` is what a stream session and a tracked video share (docs/streaming.md, Tracking):
it decides per frame whether the detector runs or the last frame's faces are followed
(`FramePlan.follow`), and per face whether its track's last scores are reused (`FramePlan.reuse`);
after the frame it records each track's fresh crop and scores, and forgets ended tracks. It owns
no transport and no clock: the caller hands it the engine's result and the frame's timestamp.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from service.engine.faces import DetectedFace
from service.engine.pipeline import FramePlan, ImageResult
from service.engine.tracking import FaceTracker, FrameUpdate
from service.settings import Settings


@dataclass(frozen=True)
class TrackingPolicy:
    """When a sequence of frames runs the detector and the classifier.

    Between detections each face is followed from its last box (`FaceBackend.refit`: a local
    search and the 68 landmarks, a few ms instead of a full-frame search); the detector runs every
    `detect_every` frames (new faces are found then), when a face cannot be followed, and while no
    face is tracked. A followed face is classified when its aligned crop changed by more than
    `classify_change` (mean absolute difference, pixels in 0-1) since it was last classified, or
    after `classify_every` frames; otherwise its last scores are reused (`fresh: false`).
    """

    detect_every: int = 15
    classify_every: int = 15
    classify_change: float = 0.05

    @classmethod
    def from_settings(cls, settings: Settings) -> TrackingPolicy:
        return cls(
            detect_every=settings.stream_detect_every,
            classify_every=settings.stream_classify_every,
            classify_change=settings.stream_classify_change,
        )


@dataclass
class _Classified:
    """A track's last classification: the aligned crop it was made on and its scores."""

    crop: torch.Tensor
    scores: np.ndarray
    age: int = 0  # frames processed since


@dataclass(frozen=True)
class FollowedFrame:
    """A frame's tracker update and, per face (in the engine's order), whether it was classified
    on this frame (False: its track's last scores were reused)."""

    update: FrameUpdate
    fresh: list[bool]


class FrameFollower:
    """The planning state of one sequence of frames; call `plan()` before a frame goes to
    `Engine.infer` and `record()` with its result, in frame order (a frame that failed is simply
    not recorded: the next one is planned from the last recorded frame)."""

    def __init__(
        self,
        tracker: FaceTracker,
        policy: TrackingPolicy,
        *,
        crop_std: Sequence[float],
        can_follow: bool,
        phase: int = 0,
        retry: bool = False,
        redetect_lost: bool = False,
    ) -> None:
        self.tracker = tracker
        self.policy = policy
        self.can_follow = can_follow
        self.retry = retry  # FramePlan.retry: detections get the grey-margin search
        # Detect again on the frame after a detection that lost a face the frame before had:
        # following only the faces found would leave the lost one out until the next detection.
        self.redetect_lost = redetect_lost
        self._lost = False
        # The model input's std per channel: crop differences are measured in pixels (0-1).
        self._crop_std = torch.tensor(tuple(crop_std), dtype=torch.float32).view(-1, 1, 1)
        self._classified: dict[int, _Classified] = {}
        self._crops: list[torch.Tensor] = []  # the current frame's aligned crops, face order
        self._followed_run = 0  # frames followed since the last detection
        # Where in its cadence the first detection puts the sequence (0 .. detect_every - 1).
        self._detect_phase = phase % policy.detect_every
        self._detected_once = False
        self._last_recorded: int | None = None  # frame id

    def plan(self) -> FramePlan:
        """Follow the faces of the last recorded frame, or detect (see TrackingPolicy)."""
        follow = None
        seen = [t.box for t in self.tracker.tracks.values() if t.last_frame == self._last_recorded]
        retry_lost = self.redetect_lost and self._lost
        if seen and self.can_follow and self._followed_run + 1 < self.policy.detect_every and not retry_lost:
            follow = tuple(seen)
        self._crops = []
        return FramePlan(follow=follow, reuse=self._reuse, retry=self.retry)

    def _reuse(self, faces: Sequence[DetectedFace], crops: Sequence[torch.Tensor]) -> list[np.ndarray | None]:
        """Per face: its track's last scores if its crop barely changed, else None (classify)."""
        self._crops = list(crops)
        out: list[np.ndarray | None] = []
        for track, crop in zip(self.tracker.match([f.box for f in faces]), crops, strict=True):
            last = None if track is None else self._classified.get(track.track_id)
            if last is None or last.age + 1 >= self.policy.classify_every:
                out.append(None)
                continue
            change = float(((crop - last.crop).abs() * self._crop_std).mean())
            out.append(None if change > self.policy.classify_change else last.scores)
        return out

    def record(
        self, frame_id: int, timestamp_ms: float, image: ImageResult, probabilities: Sequence[np.ndarray]
    ) -> FollowedFrame:
        """Track the frame's faces and keep what the next frames' plans need."""
        before = {t.track_id for t in self.tracker.tracks.values() if t.last_frame == self._last_recorded}
        update = self.tracker.update(frame_id, timestamp_ms, [f.box for f in image.faces], probabilities)
        # Only once: a face the retry does not find either is left to the next detection.
        self._lost = not self._lost and bool(before - {f.track_id for f in update.faces})
        fresh = image.frame.fresh if image.frame is not None else [True] * len(image.faces)
        if image.frame is not None and image.frame.followed:
            self._followed_run += 1
        else:
            self._followed_run = 0 if self._detected_once else self._detect_phase
            self._detected_once = True
        self._last_recorded = frame_id
        for k, tracked in enumerate(update.faces):
            if fresh[k] and k < len(self._crops):
                self._classified[tracked.track_id] = _Classified(self._crops[k], probabilities[k])
            elif tracked.track_id in self._classified:
                self._classified[tracked.track_id].age += 1
        for event in update.events:
            if event.kind == "track_end":
                self._classified.pop(event.track_id, None)
        return FollowedFrame(update, list(fresh))
