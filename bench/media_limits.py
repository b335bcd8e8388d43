"""Memory and time of the costly stream and video inputs of issue 23, on a real `fermam serve`.

Three cases, each against its own server (the server's RSS sampled every 50 ms from /proc, its
CPU time from /proc/PID/stat):

- `flood`: one `WS /v1/stream` session sending 1-byte frames as fast as it can for `--flood-s`
  seconds (all but `--stream-max-fps` a second are dropped), then `end`: RSS growth during the
  flood and after the session, and the size of the `session_end` message.
- `video`: a 4K (3840x2160) 60 fps H.264 file of `--video-s` seconds of grey (a keyframe every
  250 frames, x264's default), posted with `fps=1e-300` (the probe's value) and, since that is now
  refused, also with `fps=0.01` (the lowest allowed), under a 5 s deadline, and with `fps=0.1`
  under a 120 s one: status, wall time, server CPU seconds, peak RSS over the start.
- `huge`: a 2-frame 7680x7680 H.264 file: the same figures for its 413.

Run it on this tree, and on an older one for the "before" figures (a copy of the tree at that
commit: `git archive <commit> | tar -x -C /tmp/before`):

    python bench/media_limits.py
    python bench/media_limits.py --repo /tmp/before --cases flood,video,huge
"""

from __future__ import annotations

import argparse
import io
import json
import os
import threading
import time
from pathlib import Path

import av
import httpx
import numpy as np
from load import REPO, Server, machine_description  # bench/load.py, beside this script
from websockets.sync.client import connect

PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


class Sampler:
    """The server's peak RSS while a `with` block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> Sampler:
        self.start = rss_mb(self.pid)
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def grey_h264(width: int, height: int, fps: int, seconds: float, keyint: int = 250) -> bytes:
    """Grey frames in H.264: one GOP is encoded, then its packets are repeated (each GOP starts
    with an IDR frame, so the copies decode as the original): 4K is slow to encode, not to copy."""
    gop_frames = min(keyint, round(fps * seconds))
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
        frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 128, np.uint8), format="rgb24")
        packets = []
        for index in range(gop_frames):
            frame.pts = index
            packets += [(bytes(p), p.pts, p.dts, p.is_keyframe) for p in stream.encode(frame)]
        packets += [(bytes(p), p.pts, p.dts, p.is_keyframe) for p in stream.encode()]
        time_base = stream.codec_context.time_base or stream.time_base
        for copy in range(max(1, round(fps * seconds) // gop_frames)):
            shift = copy * gop_frames
            for data, pts, dts, key in packets:
                packet = av.Packet(data)
                packet.stream = stream
                packet.time_base = time_base
                packet.pts, packet.dts = pts + shift, dts + shift
                packet.is_keyframe = key
                container.mux(packet)
    return out.getvalue()


def flood(server: Server, seconds: float) -> dict:
    pid = server.process.pid
    before = rss_mb(pid)
    sent = 0
    with (
        Sampler(pid) as sampler,
        connect(server.base.replace("http", "ws") + "/v1/stream", max_size=None) as ws,
    ):
        ws.recv(timeout=30)
        reader_done = threading.Event()
        messages: list[str] = []

        def read() -> None:
            try:
                while True:
                    message = ws.recv(timeout=120)
                    messages.append(message)
                    if '"session_end"' in message:
                        break
            finally:
                reader_done.set()

        threading.Thread(target=read, daemon=True).start()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            ws.send(b"x")
            sent += 1
        during = rss_mb(pid)
        ws.send('{"type": "end"}')
        reader_done.wait(120)
    time.sleep(1.0)
    session_end = next((m for m in messages if '"session_end"' in m), "")
    return {
        "frames sent": sent,
        "RSS before MB": round(before),
        "RSS at the flood's end MB": round(during),
        "growth MB/s": round((during - before) / seconds, 2),
        "peak RSS MB": round(sampler.peak),
        "RSS after the session MB": round(rss_mb(pid)),
        "session_end bytes": len(session_end.encode()),
        "dropped_total": json.loads(session_end).get("dropped_total") if session_end else None,
    }


def post_video(server: Server, clip: bytes, fps: str, timeout_ms: int = 5000) -> dict:
    pid = server.process.pid
    cpu0 = cpu_s(pid)
    started = time.monotonic()
    with Sampler(pid) as sampler:
        response = httpx.post(
            f"{server.base}/v1/videos",
            files={"file": ("clip.mp4", clip)},
            data={"fps": fps},
            headers={"X-Request-Timeout-Ms": str(timeout_ms)},
            timeout=900,
        )
    try:
        code = response.json().get("error", {}).get("code", "")
    except ValueError:
        code = ""
    return {
        "fps": fps,
        "status": f"{response.status_code} {code}".strip(),
        "wall s": round(time.monotonic() - started, 2),
        "server CPU s": round(cpu_s(pid) - cpu0, 2),
        "RSS before MB": round(sampler.start),
        "peak RSS over it MB": round(sampler.peak - sampler.start),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", type=Path, default=REPO, help="the tree whose server runs")
    parser.add_argument("--cases", default="flood,video,huge")
    parser.add_argument("--flood-s", type=float, default=20.0)
    parser.add_argument("--video-s", type=float, default=60.0)
    args = parser.parse_args()
    cases = set(args.cases.split(","))
    print(f"Machine: {machine_description('cpu')}; tree: {args.repo}")
    base_args = ["--device", "cpu", "--log-level", "warning", "--video-max-duration-s", "300"]
    if "flood" in cases:
        with Server(base_args, repo=args.repo) as server:
            print("flood:", json.dumps(flood(server, args.flood_s)))
    if "video" in cases:
        made = time.monotonic()
        clip = grey_h264(3840, 2160, 60, args.video_s)
        made = time.monotonic() - made
        print(f"video: {len(clip) / 1e6:.2f} MB, {args.video_s:g} s of 4K at 60 fps (made in {made:.0f} s)")
        with Server(base_args, repo=args.repo) as server:
            # The probe's rate and the lowest allowed under a 5 s deadline; a common low rate
            # (a sample every 10 s, 2.4 keyframe intervals) under a deadline it can meet.
            for fps, timeout_ms in (("1e-300", 5000), ("0.01", 5000), ("0.1", 120_000)):
                print("video:", json.dumps(post_video(server, clip, fps, timeout_ms)))
    if "huge" in cases:
        huge = grey_h264(7680, 7680, 1, 2, keyint=1)
        print(f"huge: {len(huge) / 1e3:.0f} kB, 2 frames of 7680x7680")
        with Server(base_args, repo=args.repo) as server:
            print("huge:", json.dumps(post_video(server, huge, "2")))


if __name__ == "__main__":
    main()
