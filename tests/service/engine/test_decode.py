"""decode_image: limits, typed errors, every PIL mode, EXIF orientation; faces found upright.

Variants of a real photo are written in tmp_path and must decode to the same upright pixels (or,
for lossy or mode-reducing variants, give the same faces to the dlib backend).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from photo_truth import PHOTOS, box_iou, load_photo, normalised_landmark_error
from PIL import Image

from service.engine.decode import DecodedImage, ImageTooLarge, NotAnImage, decode_image

LIMITS = {"max_bytes": 20_000_000, "max_pixels": 40_000_000}
PHOTO = "2008_001009.jpg"  # 360x480, two faces

# Operation that turns the upright image into what a camera stores with orientation N; the
# decoder must undo it. (6 and 8 are each other's inverse; the others are their own.)
STORE_AS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def with_orientation(upright: Image.Image, orientation: int, fmt: str) -> bytes:
    stored = upright if orientation == 1 else upright.transpose(STORE_AS[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    params = {"quality": 95} if fmt == "JPEG" else {}
    return encode(stored, fmt, exif=exif.tobytes(), **params)


@pytest.fixture(scope="module")
def upright() -> Image.Image:
    return Image.fromarray(load_photo(PHOTO))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_decodes_to_the_upright_pixels(upright, orientation):
    decoded = decode_image(with_orientation(upright, orientation, "PNG"), **LIMITS)
    assert decoded.orientation == orientation
    np.testing.assert_array_equal(decoded.pixels, np.asarray(upright))
    stored_w, stored_h = decoded.original_size
    assert (stored_h, stored_w) == (upright.size if orientation >= 5 else upright.size[::-1])


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_faces_in_an_exif_rotated_jpeg_are_found_in_upright_coordinates(dlib_backend, upright, orientation):
    (reference,) = dlib_backend.detect([np.asarray(upright)])
    decoded = decode_image(with_orientation(upright, orientation, "JPEG"), **LIMITS)
    assert decoded.pixels.shape == np.asarray(upright).shape
    (faces,) = dlib_backend.detect([decoded.pixels])
    assert len(faces) == len(reference) == 2
    for face, ref in zip(faces, reference, strict=True):
        assert_same_face(face, ref)


def assert_same_face(face, reference) -> None:
    """Same face despite re-encoding: HOG may pick the next pyramid scale (measured IoU 0.68 on
    one face of this photo), but the landmarks agree (measured error <= 0.03 of the eye distance)."""
    assert box_iou(face.box, reference.box) > 0.5
    assert normalised_landmark_error(face.landmarks, reference.landmarks) < 0.06


def mode_variants(upright: Image.Image) -> dict[str, tuple[bytes, np.ndarray]]:
    """Encoded variants of the photo and the RGB pixels each must decode to."""
    rgb = np.asarray(upright)
    gray = upright.convert("L")
    gray3 = np.repeat(np.asarray(gray)[:, :, None], 3, axis=2)
    opaque = upright.convert("RGBA")
    palette = upright.quantize(colors=256)
    sixteen = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)  # top byte == gray
    return {
        "RGB png": (encode(upright, "PNG"), rgb),
        "L png": (encode(gray, "PNG"), gray3),
        "LA png": (encode(gray.convert("LA"), "PNG"), gray3),
        "RGBA png opaque": (encode(opaque, "PNG"), rgb),
        "P png": (encode(palette, "PNG"), np.asarray(palette.convert("RGB"))),
        "I;16 png": (encode(sixteen, "PNG"), gray3),
        "RGB bmp": (encode(upright, "BMP"), rgb),
        "RGB webp lossless": (encode(upright, "WEBP", lossless=True), rgb),
    }


@pytest.mark.parametrize(
    "variant",
    ["RGB png", "L png", "LA png", "RGBA png opaque", "P png", "I;16 png", "RGB bmp", "RGB webp lossless"],
)
def test_every_lossless_mode_variant_decodes_to_the_expected_rgb(upright, variant):
    data, expected = mode_variants(upright)[variant]
    decoded = decode_image(data, **LIMITS)
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.flags.c_contiguous
    np.testing.assert_array_equal(decoded.pixels, expected)


def test_mode_converted_variants_give_the_same_faces(dlib_backend, upright):
    (reference,) = dlib_backend.detect([np.asarray(upright)])
    cmyk_jpeg = encode(upright.convert("CMYK"), "JPEG", quality=95)
    lossy = {
        "CMYK jpeg": cmyk_jpeg,
        "L jpeg": encode(upright.convert("L"), "JPEG", quality=95),
        "P png": mode_variants(upright)["P png"][0],
        "I;16 png": mode_variants(upright)["I;16 png"][0],
    }
    for name, data in lossy.items():
        decoded = decode_image(data, **LIMITS)
        (faces,) = dlib_backend.detect([decoded.pixels])
        assert len(faces) == len(reference), name
        for face, ref in zip(faces, reference, strict=True):
            assert_same_face(face, ref)
    assert decode_image(cmyk_jpeg, **LIMITS).original_mode == "CMYK"


def test_transparent_pixels_are_composited_on_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red under the alpha
    rgba[:2, :, 3] = 255  # top half opaque, bottom half transparent
    rgba[2, :, 3] = 128
    decoded = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), **LIMITS)
    np.testing.assert_array_equal(decoded.pixels[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(decoded.pixels[3, 0], [255, 255, 255])
    assert 200 <= decoded.pixels[2, 0, 0] <= 255 and 120 <= decoded.pixels[2, 0, 1] <= 135

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.putpixel((0, 0), 1)
    decoded = decode_image(encode(palette, "PNG", transparency=0), **LIMITS)
    np.testing.assert_array_equal(decoded.pixels[0, 0], [10, 20, 30])
    np.testing.assert_array_equal(decoded.pixels[1, 1], [255, 255, 255])


def test_the_real_grayscale_photo_decodes_to_rgb():
    decoded = decode_image((PHOTOS / "solvay_conference_1927.jpg").read_bytes(), **LIMITS)
    assert decoded.original_mode == "L" and decoded.format == "JPEG"
    assert decoded.pixels.shape == (1013, 1400, 3)
    assert isinstance(decoded, DecodedImage) and (decoded.width, decoded.height) == (1400, 1013)


def test_byte_limit_is_enforced_before_decoding():
    data = (PHOTOS / PHOTO).read_bytes()
    with pytest.raises(ImageTooLarge) as caught:
        decode_image(data, max_bytes=len(data) - 1, max_pixels=10**9)
    assert caught.value.code == "too_large"


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height grey pixels, with a tiny compressed body."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * (width + 1) * 16)  # a few rows; the rest is never read
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_pixel_bombs_are_refused_from_the_header_without_decoding():
    bomb = png_bomb(60_000, 60_000)  # 3.6 gigapixels claimed
    assert len(bomb) < 200_000
    with pytest.raises(ImageTooLarge, match="pixels") as caught:
        decode_image(bomb, **LIMITS)
    assert caught.value.code == "too_large"
    with pytest.raises(ImageTooLarge):
        decode_image((PHOTOS / PHOTO).read_bytes(), max_bytes=10**8, max_pixels=360 * 480 - 1)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"definitely not an image",
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
    ],
)
def test_non_images_raise_not_an_image(data):
    with pytest.raises(NotAnImage) as caught:
        decode_image(data, **LIMITS)
    assert caught.value.code == "bad_image"


def test_truncated_and_unsupported_files_raise_not_an_image(upright, tmp_path: Path):
    jpeg = (PHOTOS / PHOTO).read_bytes()
    with pytest.raises(NotAnImage):
        decode_image(jpeg[: len(jpeg) // 2], **LIMITS)
    png = encode(upright, "PNG")
    with pytest.raises(NotAnImage):
        decode_image(png[: len(png) // 2], **LIMITS)
    with pytest.raises(NotAnImage, match="unsupported image format GIF"):
        decode_image(encode(upright.convert("P"), "GIF"), **LIMITS)
    with pytest.raises(NotAnImage, match="unsupported"):
        decode_image(encode(upright, "TIFF"), **LIMITS)


def test_a_multi_picture_jpeg_decodes_to_its_first_frame(upright, dlib_backend):
    """Phones save portrait and multi-lens shots as MPO: a JPEG (the photo) followed by more JPEGs."""
    second = upright.transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("L").convert("RGB")
    mpo = encode(upright, "MPO", save_all=True, append_images=[second], quality=95)
    with Image.open(io.BytesIO(mpo)) as opened:
        assert opened.format == "MPO" and opened.n_frames == 2
    decoded = decode_image(mpo, **LIMITS)
    assert decoded.format == "MPO"
    # The first frame alone, as a plain JPEG decoder reads it (an MPO starts with that JPEG).
    first_frame = np.asarray(Image.open(io.BytesIO(encode(upright, "JPEG", quality=95))).convert("RGB"))
    np.testing.assert_array_equal(decoded.pixels, first_frame)
    assert len(dlib_backend.detect([decoded.pixels])[0]) == 2
