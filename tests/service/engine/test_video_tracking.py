"""Tracked videos: at `video_track_min_fps` and above, sampled frames are planned from the last
frame's faces (as a stream's are) and still give the per-frame pipeline's timeline; below it every
frame is detected; cancellation and the deadline still stop a tracked video."""

from __future__ import annotations

import asyncio
import io
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from media_clips import grey_clip, letterboxed_frames, make_clip  # noqa: E402
from photo_truth import box_iou, normalised_landmark_error  # noqa: E402

from service.engine.batcher import DeadlineExceeded  # noqa: E402
from service.engine.pipeline import RequestOptions  # noqa: E402
from service.engine.video import VideoOptions, VideoResult, analyse_video  # noqa: E402

CLIPS = {"obama.jpg": 1, "two_people.jpg": 2, "2008_001322.jpg": 3}  # photo: people in it
SOURCE_FPS = 10
SWEEP = 20  # frames of one pan-and-zoom sweep (2 s); played forward, then back
FPS = 5.0  # the default video_track_min_fps
# As for streams (test_stream_tracking.py): landmarks of a followed face against the per-frame
# path's, as a share of the outer-eye-corner distance; measured 0.012-0.013 mean on these clips.
MAX_MEAN_NME = 0.05


@pytest.fixture(scope="module")
def engine(engine_factory):
    engine = engine_factory(detect_max_queue_delay_ms=2, classify_max_queue_delay_ms=2)
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.stop())


@pytest.fixture(scope="module")
def clips() -> dict[str, bytes]:
    out = {}
    for name in CLIPS:
        frames = letterboxed_frames(name, SWEEP)
        out[name] = make_clip(frames + frames[::-1], SOURCE_FPS)
    return out


def analyse(engine, clip: bytes, fps: float = FPS, track: bool | None = None) -> VideoResult:
    options = VideoOptions(fps=fps, request=RequestOptions(return_landmarks=True), tau_ms=0.0, track=track)
    return asyncio.run(analyse_video(engine, io.BytesIO(clip), options))


def points_by_frame(result: VideoResult) -> dict[int, list]:
    out: dict[int, list] = {}
    for track in result.tracks:
        for point in track.points:
            out.setdefault(point.frame_index, []).append(point)
    return out


@pytest.mark.slow
def test_a_tracked_timeline_agrees_with_the_per_frame_path(engine, clips) -> None:
    agree = total = 0
    errors: list[float] = []
    for name, people in CLIPS.items():
        tracked = analyse(engine, clips[name])  # by the setting: FPS is the threshold
        full = analyse(engine, clips[name], track=False)
        assert tracked.tracked and not full.tracked
        assert tracked.frames_sampled == full.frames_sampled == 20
        assert tracked.frames_followed >= tracked.frames_sampled // 2, name
        # One track per person, for the whole clip.
        assert len(tracked.tracks) == people, name
        followed, reference = points_by_frame(tracked), points_by_frame(full)
        for index, points in reference.items():
            assert len(followed[index]) == len(points) == people, (name, index)
            for point in points:
                twin = max(followed[index], key=lambda p: box_iou(p.face.box, point.face.box))
                assert box_iou(twin.face.box, point.face.box) > 0.5
                agree += twin.face.expression == point.face.expression
                total += 1
                found, reference_points = np.asarray(twin.face.landmarks), np.asarray(point.face.landmarks)
                errors.append(normalised_landmark_error(found, reference_points))
    assert agree >= 0.95 * total, f"{agree} of {total} faces agree"
    assert float(np.mean(errors)) <= MAX_MEAN_NME, errors


def test_a_tracked_video_skips_the_detector_on_followed_frames(engine, clips, detect_calls) -> None:
    calls = detect_calls
    result = analyse(engine, clips["two_people.jpg"])
    assert result.tracked and result.frames_sampled == 20
    # Frames 0 and 15 detected (detect_every 15), one more for a failed fit; 20 without tracking.
    assert calls[0] <= 4, calls[0]
    assert result.frames_followed >= 16
    points = [p for track in result.tracks for p in track.points]
    assert all(p.fresh for track in result.tracks for p in track.points[:1])  # new tracks classified
    assert 0 < sum(not p.fresh for p in points) < len(points)
    for track in result.tracks:  # reused scores are the track's last fresh ones
        for before, point in zip(track.points, track.points[1:], strict=False):
            if not point.fresh:
                assert point.face.scores == before.face.scores


def test_below_the_threshold_every_sampled_frame_is_detected(engine, clips, detect_calls) -> None:
    assert engine.settings.video_track_min_fps == FPS
    calls = detect_calls
    result = analyse(engine, clips["obama.jpg"], fps=2.0)
    assert not result.tracked and result.frames_followed == 0
    assert result.frames_sampled == 8 and calls[0] == 8
    assert all(p.fresh for track in result.tracks for p in track.points)


@pytest.fixture(scope="module")
def one_gop() -> bytes:
    # 290 s at 60 fps with one keyframe (as test_video.py): sampled at 10 fps, far more frames than
    # the test waits for.
    return grey_clip(320, 240, 60, 290, keyint=100_000)


def planned_frames(engine, monkeypatch) -> list[bool]:
    """Per engine call, whether it came with a FramePlan (the tracked path)."""
    plans: list[bool] = []
    infer = engine.infer

    async def recorded(*args, **kwargs):
        plans.append(kwargs.get("plan") is not None)
        return await infer(*args, **kwargs)

    monkeypatch.setattr(engine, "infer", recorded)
    return plans


def test_a_cancelled_tracked_video_stops(engine, one_gop, monkeypatch) -> None:
    plans = planned_frames(engine, monkeypatch)

    async def main() -> float:
        task = asyncio.ensure_future(analyse_video(engine, io.BytesIO(one_gop), VideoOptions(fps=10.0)))
        await asyncio.sleep(0.5)
        assert not task.done()
        task.cancel()
        cancelled = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - cancelled

    assert asyncio.run(main()) < 0.5
    assert plans and all(plans)


def test_the_deadline_stops_a_tracked_video(engine, one_gop, monkeypatch) -> None:
    plans = planned_frames(engine, monkeypatch)

    async def main() -> float:
        deadline = time.monotonic() + 0.5
        with pytest.raises(DeadlineExceeded):
            await analyse_video(engine, io.BytesIO(one_gop), VideoOptions(fps=10.0), deadline)
        return time.monotonic() - deadline

    assert asyncio.run(main()) < 0.5
    assert plans and all(plans)
