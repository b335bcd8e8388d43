"""Uploaded bytes -> an upright HxWx3 uint8 RGB array, with limits checked before pixels decode.

Every PIL mode a JPEG, PNG, WebP or BMP can carry is handled: RGB as is; L, 1, P, CMYK, YCbCr
converted; 16-bit (I;16*, I) scaled to 8 bits by their top byte (PIL's own conversion clips);
images with alpha (RGBA, LA, PA, transparent palettes) are composited on WHITE, because that is
how viewers show a transparent portrait, whereas dropping alpha exposes whatever colour the
encoder left under transparent pixels (often black, sometimes garbage). EXIF orientation (1-8) is
applied, so coordinates computed on the result refer to the upright image the user sees.

MPO (a JPEG followed by more JPEGs: phones' portrait and multi-lens shots) is read as its first
frame, which is the photo itself; the other frames are depth maps or other views.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP"})
EXIF_ORIENTATION_TAG = 0x0112
WHITE = (255, 255, 255)


class ImageDecodeError(ValueError):
    """Base of the decoder's errors; `code` is a stable machine-readable reason."""

    code: str = "bad_image"


class ImageTooLarge(ImageDecodeError):
    """The upload exceeds the byte or pixel limit (HTTP 413)."""

    code = "too_large"


class NotAnImage(ImageDecodeError):
    """Not decodable: not an image, truncated, corrupt, or an unsupported format (HTTP 415)."""

    code = "bad_image"


@dataclass(frozen=True)
class DecodedImage:
    """Upright RGB pixels plus what the file said about itself."""

    pixels: np.ndarray  # (H, W, 3) uint8 RGB, upright
    format: str  # one of SUPPORTED_FORMATS
    original_mode: str  # PIL mode before conversion, e.g. "CMYK", "I;16", "P"
    original_size: tuple[int, int]  # (width, height) as stored, before EXIF orientation
    orientation: int  # EXIF orientation that was applied (1 = none)

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> DecodedImage:
    """Decode one upload; raise ImageTooLarge or NotAnImage instead of any PIL exception."""
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image is {len(data)} bytes, the limit is {max_bytes}")
    if not data:
        raise NotAnImage("empty upload")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit decides; PIL's bomb warning would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(str(error)) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise NotAnImage("not a decodable image") from error

    with image:
        if image.format not in SUPPORTED_FORMATS:
            raise NotAnImage(
                f"unsupported image format {image.format}; send {', '.join(sorted(SUPPORTED_FORMATS))}"
            )
        width, height = image.size
        # Checked on the header, before a single pixel is decompressed: a 50 kB PNG can claim
        # 100 000 x 100 000 pixels.
        if width * height > max_pixels:
            raise ImageTooLarge(
                f"image is {width}x{height} = {width * height} pixels, the limit is {max_pixels}"
            )
        if width == 0 or height == 0:
            raise NotAnImage("image has no pixels")
        original_mode = image.mode
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image.load()
            orientation = _orientation(image)
            upright = _apply_orientation(image, orientation)
            pixels = _to_rgb_array(upright)
        except Image.DecompressionBombError as error:
            raise ImageTooLarge(str(error)) from error
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            # Truncated or corrupt data surfaces here, when the pixels are actually read.
            raise NotAnImage(f"could not decode the {image.format} data: {error}") from error
        return DecodedImage(pixels, image.format, original_mode, (width, height), orientation)


def declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as the file's header declares them, without decoding a pixel (a fraction
    of a millisecond); None when there is no readable header. For estimates only: the decoder
    still checks everything."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Exception:  # noqa: BLE001 - any failure just means "unknown"; decoding will say why
        return None


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation, 1 when absent or out of range (malformed EXIF is not fatal)."""
    try:
        value = int(image.getexif().get(EXIF_ORIENTATION_TAG, 1))
    except (OSError, SyntaxError, ValueError, TypeError):
        return 1
    return value if 1 <= value <= 8 else 1


_ORIENTATION_OPS: dict[int, tuple[Image.Transpose, ...]] = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}


def _apply_orientation(image: Image.Image, orientation: int) -> Image.Image:
    """Rotate/flip so the pixels are upright (the EXIF tag's meaning, as ImageOps applies it)."""
    if orientation == 1:
        return image
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError):
        # Malformed EXIF beside a valid tag: apply the orientation ourselves.
        for op in _ORIENTATION_OPS[orientation]:
            image = image.transpose(op)
        return image


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8 RGB; see the module docstring for the choices."""
    mode = image.mode
    if mode == "RGB":
        return np.array(image, dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        return _gray_to_rgb(_sixteen_bit_to_uint8(np.asarray(image)))
    if mode == "F":
        return _gray_to_rgb(np.clip(np.asarray(image), 0, 255).astype(np.uint8))
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa") or mode == "L" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, WHITE + (255,))
        image = Image.alpha_composite(background, image)
    return np.array(image.convert("RGB"), dtype=np.uint8)


def _sixteen_bit_to_uint8(values: np.ndarray) -> np.ndarray:
    """Keep the top byte of 16-bit samples (clipping 32-bit "I" data to the 16-bit range)."""
    wide = np.clip(values.astype(np.int64), 0, 65535)
    return (wide >> 8).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
