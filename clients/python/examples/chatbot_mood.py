"""A chatbot backend's use: the user's mood from a webcam snapshot, awaited inside a request handler.

    python examples/chatbot_mood.py photo.jpg [--url http://127.0.0.1:8000]

`AsyncClient` shares one connection pool across handlers; the deadline covers queueing and
retries, so a busy service makes the bot answer without the mood rather than late.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from fermam_client import AsyncClient, FermamError


async def mood_of(client: AsyncClient, snapshot: bytes, deadline_s: float) -> str | None:
    """The expression of the largest face, or None if there is none or it could not be had in time."""
    try:
        result = await client.expressions([snapshot], max_faces=3, timeout_s=deadline_s)
    except FermamError:  # overloaded past our deadline, bad image, ...: answer without it
        return None
    faces = result.images[0].faces
    if not faces:
        return None
    largest = max(faces, key=lambda face: face.box.width * face.box.height)
    return largest.expression


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photo", type=Path, help="a snapshot of the user")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    parser.add_argument("--deadline", type=float, default=5.0, help="seconds the bot waits at most")
    args = parser.parse_args()

    async with AsyncClient(args.url, api_key=os.environ.get("FERMAM_API_KEY")) as client:
        mood = await mood_of(client, args.photo.read_bytes(), args.deadline)
    print(f"mood: {mood or 'unknown'}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
