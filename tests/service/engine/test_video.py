"""A video's decode on the real engine, driven without HTTP: cancelled or past its deadline, it
stops at the next frame instead of decoding the rest of the file."""

from __future__ import annotations

import asyncio
import io
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from media_clips import grey_clip  # noqa: E402

from service.engine.batcher import DeadlineExceeded  # noqa: E402
from service.engine.video import VideoOptions, analyse_video  # noqa: E402


@pytest.fixture(scope="module")
def engine(engine_factory):
    engine = engine_factory(detect_max_queue_delay_ms=2, classify_max_queue_delay_ms=2)
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.stop())


@pytest.fixture(scope="module")
def one_gop() -> bytes:
    # 290 s at 60 fps with one keyframe: nothing to seek to, the samples at 100 s and 200 s can
    # only be reached by decoding every frame before them (seconds of decoding).
    return grey_clip(320, 240, 60, 290, keyint=100_000)


def test_a_cancelled_analysis_stops_its_decode(engine, one_gop) -> None:
    """Before: closing the generator while its thread decoded raised `ValueError: generator
    already executing`, and the thread went on decoding the whole file."""

    async def main() -> float:
        task = asyncio.ensure_future(analyse_video(engine, io.BytesIO(one_gop), VideoOptions(fps=0.01)))
        await asyncio.sleep(0.3)
        assert not task.done()
        task.cancel()
        cancelled = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - cancelled

    assert asyncio.run(main()) < 0.5  # the next decoded frame, not the rest of the file


def test_the_deadline_is_checked_between_decoded_frames(engine, one_gop) -> None:
    async def main() -> float:
        deadline = time.monotonic() + 0.3
        with pytest.raises(DeadlineExceeded):
            await analyse_video(engine, io.BytesIO(one_gop), VideoOptions(fps=0.01), deadline)
        return time.monotonic() - deadline

    assert asyncio.run(main()) < 0.5
