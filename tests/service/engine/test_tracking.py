"""Face tracks across frames (IoU assignment) and the time-based EMA of their expressions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.engine.tracking import ExpressionSmoother, FaceTracker, iou_matrix

HAPPY = np.array([0.1, 0.9])
SAD = np.array([0.9, 0.1])


def test_iou_of_identical_disjoint_and_half_overlapping_boxes() -> None:
    m = iou_matrix([(0, 0, 10, 10)], [(0, 0, 10, 10), (20, 20, 5, 5), (5, 0, 10, 10)])
    assert m[0] == pytest.approx([1.0, 0.0, 50 / 150])


def test_moving_faces_keep_their_ids_and_a_new_face_starts_a_track() -> None:
    tracker = FaceTracker(tau_ms=0, ttl_ms=1000)
    first = tracker.update(0, 0.0, [(0, 0, 50, 50), (200, 0, 50, 50)], [HAPPY, SAD])
    assert [e.kind for e in first.events] == ["track_start", "track_start"]
    ids = [f.track_id for f in first.faces]
    # Faces listed in the other order and shifted by 10% of their width: same ids, by box.
    second = tracker.update(
        1, 100.0, [(205, 2, 50, 50), (5, 2, 50, 50), (400, 0, 40, 40)], [SAD, HAPPY, HAPPY]
    )
    assert [f.track_id for f in second.faces] == [ids[1], ids[0], max(ids) + 1]
    assert [(e.kind, e.track_id) for e in second.events] == [("track_start", max(ids) + 1)]


def test_a_track_survives_a_short_miss_and_ends_after_the_ttl() -> None:
    tracker = FaceTracker(tau_ms=0, ttl_ms=500)
    (face,) = tracker.update(0, 0.0, [(0, 0, 50, 50)], [HAPPY]).faces
    assert tracker.update(1, 300.0, [], []).events == []
    assert tracker.update(2, 400.0, [(2, 0, 50, 50)], [HAPPY]).faces[0].track_id == face.track_id
    ended = tracker.update(3, 901.0, [], []).events
    assert [(e.kind, e.track_id, e.frame_id, e.reason) for e in ended] == [
        ("track_end", face.track_id, 2, "lost")
    ]
    back = tracker.update(4, 950.0, [(2, 0, 50, 50)], [HAPPY])
    assert back.faces[0].track_id != face.track_id  # ids are never reused
    assert [e.reason for e in tracker.close()] == ["session_end"]


def test_smoothing_follows_the_time_constant_whatever_the_frame_rate() -> None:
    tau = 500.0
    for fps in (5, 15, 30):
        smoother = ExpressionSmoother(tau)
        smoother.update(SAD, 0.0)
        for i in range(1, fps + 1):  # one second of a changed expression
            value = smoother.update(HAPPY, i * 1000.0 / fps)
        expected = SAD + (1 - math.exp(-1000.0 / tau)) * (HAPPY - SAD)
        assert value == pytest.approx(expected)
        assert value.sum() == pytest.approx(1.0)


def test_tau_zero_means_no_smoothing() -> None:
    smoother = ExpressionSmoother(0.0)
    smoother.update(SAD, 0.0)
    assert smoother.update(HAPPY, 10.0) == pytest.approx(HAPPY)
