"""Frames over `WS /v1/stream`: faces keep their track id from frame to frame, scores are smoothed.

    python examples/stream.py frame1.jpg frame2.jpg ... [--url http://127.0.0.1:8000]

Any sequence of JPEG or PNG frames will do (a camera's, or stills of a video); here they are sent
one at a time, each answer awaited, as a well-behaved camera client does.
"""

from __future__ import annotations

import argparse
import os
import sys

from fermam_client import Client, FrameError, FrameResult


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("frames", nargs="+", help="image files, in order")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    args = parser.parse_args()

    with (
        Client(args.url, api_key=os.environ.get("FERMAM_API_KEY")) as client,
        client.stream(top_k=1) as session,
    ):
        for frame in args.frames:
            session.send(frame)
            message = session.recv(timeout_s=60)
            if isinstance(message, FrameError):
                print(f"frame refused: {message.code}: {message.message}", file=sys.stderr)
                continue
            assert isinstance(message, FrameResult)
            faces = ", ".join(f"#{f.track_id} {f.smoothed_expression}" for f in message.faces) or "no face"
            print(f"frame {message.frame_id}: {faces}")
        for message in session.end():
            print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
