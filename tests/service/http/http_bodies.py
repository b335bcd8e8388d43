"""Bad and good request bodies shared by the API and end-to-end tests."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

PHOTOS = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "photos"
GROUP = "2008_001322.jpg"  # three faces, 65 kB
NO_FACE = "grass_no_face.jpg"  # 235 kB
LARGE = "group_selfie.jpg"  # 515 kB: above the tests' 300 kB upload limit
TEST_MAX_IMAGE_BYTES = 300_000


def photo(name: str) -> bytes:
    return (PHOTOS / name).read_bytes()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny but well-formed PNG whose header declares width x height pixels (a pixel bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    # One compressed row; the decoder must refuse on the header long before it needs the rest.
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
