"""Admission control: refuse at once the work that cannot finish before its deadline.

A bounded queue alone sheds too late: at 3x the sustainable rate a 512-item queue holds minutes
of work, so most requests wait their full deadline for a 504 and the few that succeed are slow.
Here each request is admitted only if the work already ahead of it, at the stages' measured
drain rates, leaves time for it before its deadline; otherwise it gets `Overloaded` (HTTP 429
with Retry-After) in milliseconds, before any decoding.

The estimate is per pixel, not per image: each image costs detection units, its searched pixels
(the copy downscaled to `detect_max_side`, what the detector works on) plus a share of all its
pixels (downscaling, landmark refitting and alignment read the original), so a 6300x6300 PNG is
not counted as one more 500x375 photo, and the stage's measured seconds per unit hold for both.
The work ahead of a request is what it actually waits for now that the detect stage and the
decode pool take requests in turns: from each admitted request, at most as many images as the
new request has, at their own cost; the faces already queued for stage 2 go through at its
measured seconds per face. Before the first batch has been measured, everything is admitted.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence

from service.engine.batcher import QueueFull

# The estimate is of compute only; queue delays, decode and alignment come on top of it.
SAFETY = 1.15


class Overloaded(QueueFull):
    """The work ahead would not let this request finish before its deadline."""

    def __init__(self, stage: str, retry_after_s: float, estimate_s: float) -> None:
        super().__init__(stage, retry_after_s)
        self.estimate_s = estimate_s


class Admission:
    """Tracks admitted requests' costs and estimates, from measured rates, when new work would
    finish."""

    def __init__(
        self,
        detect_unit_s: Callable[[], float],
        classify_item_s: Callable[[], float],
        classify_backlog: Callable[[], int],
        *,
        enabled: bool = True,
        max_wait_s: float = 0.0,
    ) -> None:
        self._detect_unit_s = detect_unit_s
        self._classify_item_s = classify_item_s
        self._classify_backlog = classify_backlog
        self.enabled = enabled
        self.max_wait_s = max_wait_s  # 0: only the deadline bounds the wait
        # Each admitted request not answered yet: its images' detection units.
        self._admitted: dict[object, tuple[float, ...]] = {}
        self._lock = threading.Lock()

    @property
    def outstanding(self) -> int:
        """Images admitted and not answered yet."""
        return sum(len(costs) for costs in self._admitted.values())

    def estimate_s(self, costs: Sequence[float]) -> tuple[float, float]:
        """Seconds of work (ahead of, own to) a request of images costing `costs` units each."""
        unit_s, classify_s = self._detect_unit_s(), self._classify_item_s()
        turns = max(1, len(costs))
        # Taken in turns, another request delays this one by at most `turns` of its images.
        ahead_units = sum(
            min(turns, len(other)) * sum(other) / len(other) for other in self._admitted.values() if other
        )
        ahead = ahead_units * unit_s + self._classify_backlog() * classify_s
        own = sum(costs) * unit_s + len(costs) * classify_s
        return SAFETY * ahead, SAFETY * own

    def admit(self, costs: Sequence[float], deadline: float | None, *, check: bool = True) -> object:
        """Count a request of images costing `costs` units in, and return its ticket for
        `release`; or raise `Overloaded` if the work ahead keeps it from finishing before
        `deadline`, or would hold it longer than `max_wait_s`. A deadline too short even for an
        idle server is not an overload: such a request is admitted and fails with
        DeadlineExceeded (504), as retrying would not help. `check=False` counts work in without
        judging it (the later frames of a video already accepted)."""
        with self._lock:
            if self.enabled and check:
                ahead, own = self.estimate_s(costs)
                remaining = float("inf") if deadline is None else deadline - time.monotonic()
                if ahead + own > remaining and own <= remaining:
                    # When enough of the work ahead will be done for a request like this one.
                    raise Overloaded("detect", max(1.0, math.ceil(ahead + own - remaining)), ahead + own)
                if self.max_wait_s and ahead > self.max_wait_s:
                    raise Overloaded("detect", max(1.0, math.ceil(ahead - self.max_wait_s)), ahead + own)
            ticket = object()
            self._admitted[ticket] = tuple(costs)
            return ticket

    def release(self, ticket: object) -> None:
        with self._lock:
            self._admitted.pop(ticket, None)
