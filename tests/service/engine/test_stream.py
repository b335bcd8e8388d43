"""A stream session on the real engine, driven without a socket: queue bounds, drops, frees work."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from media_clips import GROUP, frames_of, jpeg  # noqa: E402

from service.engine.pipeline import RequestOptions  # noqa: E402
from service.engine.stream import StreamLimits, StreamOptions, StreamSession  # noqa: E402


@pytest.fixture(scope="module")
def engine(engine_factory):
    engine = engine_factory(detect_max_queue_delay_ms=2, classify_max_queue_delay_ms=2)
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.stop())


def limits(**overrides) -> StreamLimits:
    base = dict(max_frame_bytes=2**21, max_fps=100.0, max_session_s=60.0, queue_frames=2, track_ttl_ms=1000.0,
                frame_timeout_s=60.0)  # fmt: skip
    return StreamLimits(**(base | overrides))


def run_session(engine, frames: list[bytes], **limit_overrides) -> list[dict]:
    """Offer every frame before the session processes any, then end it; all messages sent."""
    sent: list[dict] = []

    async def main() -> None:
        async def send(message: dict) -> None:
            sent.append(message)

        session = StreamSession(
            engine, StreamOptions(RequestOptions(return_landmarks=False), 300.0), limits(**limit_overrides),
            send=send, describe_error=lambda e: (type(e).__name__, str(e)),
        )  # fmt: skip
        for frame in frames:
            await session.offer(frame)
        await session.offer('{"type": "end"}')
        never: asyncio.Future = asyncio.get_running_loop().create_future()
        assert await session.serve(lambda: never) == "client_end"

    asyncio.run(main())
    return sent


FRAMES = [jpeg(f) for f in frames_of(GROUP, 5)]


def test_a_full_queue_drops_the_oldest_frames_and_says_so(engine) -> None:
    hello, *results, end = run_session(engine, FRAMES, queue_frames=2)
    assert hello["type"] == "session" and end["type"] == "session_end"
    assert [r["frame_id"] for r in results] == [3, 4]
    assert results[0]["dropped"] == [{"frame_id": i, "reason": "backpressure"} for i in range(3)]
    assert results[1]["dropped"] == [] and end["dropped_total"] == 3
    ids = [sorted(f["track_id"] for f in r["faces"]) for r in results]
    assert ids == [[1, 2, 3], [1, 2, 3]]  # three people, the same ids in both frames
    assert {e["type"] for e in results[0]["events"]} == {"track_start"}
    assert sorted(e["track_id"] for e in end["events"]) == [1, 2, 3]


def test_frames_above_the_rate_limit_are_dropped(engine) -> None:
    _, *results, end = run_session(engine, FRAMES, max_fps=2.0, queue_frames=8)
    assert [r["frame_id"] for r in results] == [0, 1]
    assert results[0]["dropped"] == [{"frame_id": i, "reason": "rate_limit"} for i in (2, 3, 4)]
    assert end["frames_processed"] == 2 and end["frames_received"] == 5


def test_an_oversized_or_broken_frame_gets_an_error_and_the_session_goes_on(engine) -> None:
    frame = FRAMES[0]
    # Offered before the session starts, so the size error is sent even before the hello.
    messages = run_session(
        engine, [b"x" * (len(frame) + 1), b"not an image", frame], max_frame_bytes=len(frame)
    )
    errors = [m for m in messages if m["type"] == "error"]
    assert [(e["frame_id"], e["code"]) for e in errors] == [(0, "too_large"), (1, "ImageRejected")]
    assert [m["frame_id"] for m in messages if m["type"] == "result"] == [2]


def test_closing_frees_the_frame_in_the_engine_and_the_queue(engine) -> None:
    async def main() -> None:
        sent: list[dict] = []
        closed = asyncio.Event()

        async def send(message: dict) -> None:
            sent.append(message)

        async def receive():
            await closed.wait()
            return None

        session = StreamSession(
            engine, StreamOptions(RequestOptions(), 300.0), limits(),
            send=send, describe_error=lambda e: ("error", str(e)),
        )  # fmt: skip
        for frame in FRAMES[:3]:
            await session.offer(frame)
        task = asyncio.ensure_future(session.serve(receive))
        while session._current is None:  # the first frame is in the engine
            await asyncio.sleep(0.001)
        closed.set()
        assert await asyncio.wait_for(task, 10) is None
        assert len(session._queue) == 0 and session._current is None
        assert [m["type"] for m in sent] == ["session"]  # nothing answered after the close

    asyncio.run(main())
