"""`WS /v1/stream`, `POST /v1/videos` and the Python client against a real `fermam serve` on loopback."""

from __future__ import annotations

import asyncio
import http.server
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from media_clips import GROUP, NO_FACE, frames_of, jpeg, make_clip  # noqa: E402
from server_process import start_server  # noqa: E402

from fermam_client import (  # noqa: E402
    AsyncClient,
    Client,
    FermamError,
    FrameResult,
    SessionEnd,
)

REPO = Path(__file__).resolve().parents[3]
KEY = "test-key-123456"
SERVER_PROCESS: list[subprocess.Popen] = []


@pytest.fixture(scope="module")
def server(weights_path):
    base, process = start_server(
        weights_path, "--api-keys", KEY, "--video-max-duration-s", "5", "--stream-queue-frames", "2"
    )
    SERVER_PROCESS.append(process)
    yield base
    process.kill()
    process.wait(10)


def test_stream_keeps_track_ids_across_frames_and_ends_every_track(server) -> None:
    frames = [jpeg(f) for f in frames_of(GROUP, 4, shift_px=4)]
    with Client(server, api_key=KEY).stream(top_k=2) as session:
        assert session.info.smoothing == {"method": "ema", "tau_ms": 500.0}
        results = []
        for frame in frames:  # one at a time, as a well-behaved camera client does
            session.send(frame)
            message = session.recv(timeout_s=120)
            assert isinstance(message, FrameResult), message
            results.append(message)
        tail = session.end()
    assert [r.frame_id for r in results] == [0, 1, 2, 3]
    assert all(r.dropped == [] for r in results)
    ids = [sorted(f.track_id for f in r.faces) for r in results]
    assert ids == [[1, 2, 3]] * 4
    assert [e.type for e in results[0].events] == ["track_start"] * 3
    # A new track is classified at once; the client reads `fresh` for every face.
    assert [f.fresh for f in results[0].faces] == [True] * 3
    assert all(isinstance(f.fresh, bool) for r in results for f in r.faces)
    for r in results:
        for f in r.faces:
            assert math.isclose(sum(f.face.scores.values()), 1.0, abs_tol=1e-5)
            assert math.isclose(sum(f.smoothed.values()), 1.0, abs_tol=1e-5)
            assert len(f.face.top) == 2
    # Boxes move right with the pan: the tracker followed the same person.
    first = {f.track_id: f.face.box.x for f in results[0].faces}
    last = {f.track_id: f.face.box.x for f in results[-1].faces}
    assert all(last[t] > first[t] for t in first)
    (end,) = [m for m in tail if isinstance(m, SessionEnd)]
    assert end.reason == "client_end" and sorted(e.track_id for e in end.events) == [1, 2, 3]


def test_stream_needs_the_api_key_and_accepts_it_in_the_query(server) -> None:
    with pytest.raises(FermamError) as refused:
        Client(server).stream()
    assert refused.value.code == "unauthorized"
    with Client(server).stream(api_key=KEY) as session:
        assert session.info.limits["queue_frames"] == 2


def test_stream_over_the_async_client_drops_the_oldest_frames_when_flooded(server) -> None:
    frames = [jpeg(f) for f in frames_of(GROUP, 8)]

    async def main() -> list:
        async with AsyncClient(server, api_key=KEY) as client, client.stream() as session:
            for frame in frames:
                await session.send(frame)
            return await session.end()

    messages = asyncio.run(main())
    results = [m for m in messages if isinstance(m, FrameResult)]
    dropped = [d for r in results for d in r.dropped]
    assert results[-1].frame_id == 7  # the newest frame is always answered
    assert dropped and {d.reason for d in dropped} == {"backpressure"}
    assert sorted([r.frame_id for r in results] + [d.frame_id for d in dropped]) == list(range(8))


def test_video_gives_one_timeline_per_person(server, tmp_path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(make_clip(frames_of(GROUP, 20) + frames_of(NO_FACE, 10, shift_px=0), fps=10))
    with Client(server, api_key=KEY, timeout_s=300) as client:
        result = client.video(clip, fps=5, timeout_s=110)  # a deadline a loaded 2-core CI machine meets
    assert result.video["frames_sampled"] == 15 and result.video["frames_with_faces"] == 10
    assert result.video["duration_s"] == pytest.approx(3.0, abs=0.15)
    assert len(result.tracks) == 3
    # fps 5 is the default --video-track-min-fps: faces followed, each point says if it is fresh.
    assert result.video["tracked"] and result.video["frames_followed"] > 0
    assert all(p.timeline[0].fresh for p in result.tracks)
    for track in result.tracks:
        assert track.frames == len(track.timeline) == 10
        assert track.first_s == pytest.approx(0.0) and track.last_s == pytest.approx(1.8)
        times = [p.t for p in track.timeline]
        assert times == sorted(times)
        assert track.expression == max(track.mean_scores, key=track.mean_scores.get)
        assert sum(track.expression_frames.values()) == 10
        assert track.timeline[-1].face.box.x > track.timeline[0].face.box.x


def test_the_shipped_sample_clip_gives_one_track_as_the_readme_example_says(server) -> None:
    # The README's client example, on the clip samples/README.md says how to make.
    with Client(server, api_key=KEY, timeout_s=300) as client:
        result = client.video(REPO / "samples" / "grace_hopper.mp4", fps=2, timeout_s=110)
    assert result.video["duration_s"] == pytest.approx(3.0, abs=0.15)
    assert result.video["frames_sampled"] == result.video["frames_with_faces"] == 6
    (track,) = result.tracks
    assert track.frames == 6 and (track.first_s, track.last_s) == pytest.approx((0.0, 2.5))
    assert track.timeline[-1].face.box.x < track.timeline[0].face.box.x  # the window pans right


def test_video_limits_and_bad_input(server, tmp_path) -> None:
    headers = {"X-API-Key": KEY}
    long_clip = make_clip(frames_of(NO_FACE, 12, shift_px=0, size=(64, 48)), fps=2)  # 6 s > 5 s
    cases = [
        ({"files": {"file": ("a.mp4", b"not a video at all")}}, 415, "not_a_video"),
        ({"files": {"file": ("long.mp4", long_clip)}}, 413, "too_long"),
        ({"files": {"file": ("long.mp4", long_clip)}, "data": {"fps": "50"}}, 422, "invalid_request"),
        ({"data": {"fps": "2"}}, 422, "invalid_request"),
    ]
    for kwargs, status, code in cases:
        response = httpx.post(f"{server}/v1/videos", headers=headers, timeout=120, **kwargs)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
    assert httpx.post(f"{server}/v1/videos", files={"file": ("a.mp4", long_clip)}).status_code == 401


def test_client_posts_photos_as_multipart_and_base64_with_typed_results(server) -> None:
    with Client(server, api_key=KEY) as client:
        for encoding in ("multipart", "base64"):
            result = client.expressions(
                [frames_path(GROUP)], encoding=encoding, top_k=1, return_landmarks=False
            )
            (image,) = result.images
            assert len(image.faces) == 3 and image.faces[0].landmarks is None
            assert image.faces[0].top[0][0] == image.faces[0].expression
            face = image.faces[0]  # pose and quality are typed, equal to the server's JSON
            assert face.pose is not None and face.quality is not None
            assert vars(face.pose) == face.raw["pose"] and vars(face.quality) == face.raw["quality"]
            assert -90 <= face.pose.yaw <= 90 and 0 <= face.quality.sharpness <= 1
        with pytest.raises(FermamError) as bad:
            client.expressions([b"not an image"])
        assert (bad.value.status, bad.value.code) == (415, "not_an_image")


def frames_path(name: str) -> Path:
    from media_clips import PHOTOS

    return PHOTOS / name


def test_client_retries_after_the_servers_retry_after() -> None:
    """A loopback server that answers 429 with Retry-After: 1 once, then 200."""
    seen: list[float] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(time.monotonic())
            first = len(seen) == 1
            body = json.dumps(
                {"error": {"code": "queue_full", "message": "full"}} if first else {"models": [{"name": "x"}]}
            ).encode()
            self.send_response(429 if first else 200)
            if first:
                self.send_header("Retry-After", "1")
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        with Client(base, backoff_s=0.01) as client:
            assert client.models() == [{"name": "x"}]
        assert len(seen) == 2 and seen[1] - seen[0] >= 0.95
        with Client(base, retries=0) as client, pytest.raises(FermamError) as error:
            seen.clear()
            client.models()
        assert error.value.status == 429 and error.value.retry_after_s == 1.0
    finally:
        httpd.shutdown()


def test_sigterm_ends_open_streams_with_session_end_shutdown(server) -> None:
    """Last in the module: it stops the server."""
    import signal

    with Client(server, api_key=KEY).stream() as session:
        session.send(jpeg(frames_of(GROUP, 1)[0]))
        assert isinstance(session.recv(timeout_s=120), FrameResult)
        SERVER_PROCESS[0].send_signal(signal.SIGTERM)
        messages = list(session)
    assert isinstance(messages[-1], SessionEnd) and messages[-1].reason == "shutdown"
    assert sorted(e.reason for e in messages[-1].events) == ["session_end"] * 3
    assert SERVER_PROCESS[0].wait(60) == 0
