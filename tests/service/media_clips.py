"""Short video clips made with PyAV from the real photos, for the stream and video tests."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
from PIL import Image

PHOTOS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "photos"
GROUP = "2008_001322.jpg"  # three faces
NO_FACE = "grass_no_face.jpg"


def frames_of(
    name: str, count: int, *, shift_px: int = 2, size: tuple[int, int] = (480, 360)
) -> list[np.ndarray]:
    """`count` RGB frames of one photo, panned `shift_px` to the right per frame (a slow camera pan)."""
    image = np.asarray(Image.open(PHOTOS / name).convert("RGB").resize(size))
    return [np.roll(image, i * shift_px, axis=1) for i in range(count)]


def jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def make_clip(frames: Sequence[np.ndarray], fps: int) -> bytes:
    """An MP4 (FFmpeg's own MPEG-4 Part 2 encoder, in every PyAV wheel) of the frames at `fps`."""
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 2_000_000
        for pixels in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def grey_clip(width: int, height: int, fps: int, seconds: float, *, keyint: int) -> bytes:
    """An H.264 MP4 of uniform grey frames, a keyframe every `keyint` frames: cheap to make and to
    decode at small sizes, so long clips (many frames) stay fast in tests."""
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {
            "preset": "ultrafast",
            "g": str(keyint),
            "keyint_min": str(keyint),
            "sc_threshold": "0",
        }
        frame = av.VideoFrame(width, height, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes([128]) * plane.buffer_size)
        for index in range(round(fps * seconds)):
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def letterboxed_frames(
    name: str,
    count: int,
    *,
    size: tuple[int, int] = (640, 480),
    zoom: float = 0.15,
    pan_px: float = 24.0,
) -> list[np.ndarray]:
    """`count` RGB frames of one photo fitted into `size` without distortion (black bars), with a
    slow camera move: the zoom grows to `1 + zoom` and the view pans `pan_px` sideways and back
    over the frames (faces move a few pixels and grow a little per frame, as a handheld camera)."""
    photo = Image.open(PHOTOS / name).convert("RGB")
    width, height = size
    fit = min(width / photo.width, height / photo.height)
    frames = []
    for i in range(count):
        phase = i / max(1, count - 1)  # 0 .. 1 over the clip
        scale = fit * (1.0 + zoom * phase)
        shown = photo.resize(
            (round(photo.width * scale), round(photo.height * scale)), Image.Resampling.BILINEAR
        )
        dx = pan_px * np.sin(2 * np.pi * phase)
        left = round((width - shown.width) / 2 + dx)
        top = round((height - shown.height) / 2)
        canvas = Image.new("RGB", size)
        canvas.paste(shown, (left, top))
        frames.append(np.asarray(canvas))
    return frames
