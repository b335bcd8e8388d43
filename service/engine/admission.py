"""Admission control: refuse at once the work that cannot finish before its deadline.

A bounded queue alone sheds too late: at 3x the sustainable rate a 512-item queue holds minutes
of work, so most requests wait their full deadline for a 504 and the few that succeed are slow.
Here each request is admitted only if the work already ahead of it, at the stages' measured
drain rates, leaves time for it before its deadline; otherwise it gets `Overloaded` (HTTP 429
with Retry-After) in milliseconds, before any decoding.

The estimate: every admitted image not yet answered goes through stage 1 at its measured
seconds per image; the faces already queued for stage 2 go through at its seconds per face.
Before the first batch has been measured, everything is admitted.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from service.engine.batcher import QueueFull

# The estimate is of compute only; queue delays, decode and alignment come on top of it.
SAFETY = 1.15


class Overloaded(QueueFull):
    """The work ahead would not let this request finish before its deadline."""

    def __init__(self, stage: str, retry_after_s: float, estimate_s: float) -> None:
        super().__init__(stage, retry_after_s)
        self.estimate_s = estimate_s


class Admission:
    """Counts admitted images and estimates, from measured rates, when new work would finish."""

    def __init__(
        self,
        detect_item_s: Callable[[], float],
        classify_item_s: Callable[[], float],
        classify_backlog: Callable[[], int],
        *,
        enabled: bool = True,
        max_wait_s: float = 0.0,
    ) -> None:
        self._detect_item_s = detect_item_s
        self._classify_item_s = classify_item_s
        self._classify_backlog = classify_backlog
        self.enabled = enabled
        self.max_wait_s = max_wait_s  # 0: only the deadline bounds the wait
        self._outstanding = 0
        self._lock = threading.Lock()

    @property
    def outstanding(self) -> int:
        """Images admitted and not answered yet."""
        return self._outstanding

    def estimate_s(self, images: int) -> tuple[float, float]:
        """Seconds of work (ahead of, own to) `images` more images through both stages."""
        detect_s, classify_s = self._detect_item_s(), self._classify_item_s()
        ahead = self._outstanding * detect_s + self._classify_backlog() * classify_s
        own = images * (detect_s + classify_s)
        return SAFETY * ahead, SAFETY * own

    def admit(self, images: int, deadline: float | None, *, check: bool = True) -> None:
        """Count the request in, or raise `Overloaded` if the work ahead keeps it from finishing
        before `deadline`, or would hold it longer than `max_wait_s`. A deadline too short even
        for an idle server is not an overload: such a request is admitted and fails with
        DeadlineExceeded (504), as retrying would not help. `check=False` counts work in
        without judging it (the later frames of a video already accepted)."""
        with self._lock:
            if self.enabled and check:
                ahead, own = self.estimate_s(images)
                remaining = float("inf") if deadline is None else deadline - time.monotonic()
                if ahead + own > remaining and own <= remaining:
                    # When enough of the work ahead will be done for a request like this one.
                    raise Overloaded("detect", max(1.0, math.ceil(ahead + own - remaining)), ahead + own)
                if self.max_wait_s and ahead > self.max_wait_s:
                    raise Overloaded("detect", max(1.0, math.ceil(ahead - self.max_wait_s)), ahead + own)
            self._outstanding += images

    def release(self, images: int) -> None:
        with self._lock:
            self._outstanding -= images
