"""Draw faces on a photo with Pillow: boxes, landmarks, and the top expressions as bars.

Used by `fermam predict --annotate`; takes the engine's results, knows nothing of torch or HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from service.engine.pipeline import FaceResult

# One colour per face (by rank, largest first), readable on light and dark photos.
PALETTE = ("#00e676", "#ff9100", "#2979ff", "#f50057", "#ffea00", "#00e5ff", "#d500f9", "#76ff03")
BARS = 3


def annotate(pixels: np.ndarray, faces: Sequence[FaceResult], *, bars: int = BARS) -> Image.Image:
    """The upright RGB image with every face drawn: box, 68 points (when present), top expressions."""
    image = Image.fromarray(pixels).convert("RGB")
    draw = ImageDraw.Draw(image, "RGBA")
    unit = max(1, round(max(image.size) / 400))
    font = ImageFont.load_default(size=11 * unit)
    line = 11 * unit + 4 * unit
    for rank, face in enumerate(faces):
        colour = PALETTE[rank % len(PALETTE)]
        x, y, w, h = face.box
        draw.rectangle((x, y, x + w, y + h), outline=colour, width=2 * unit)
        if face.landmarks is not None:
            for px, py in face.landmarks:
                draw.ellipse((px - unit, py - unit, px + unit, py + unit), fill=colour)
        title = f"#{rank} {face.expression}"
        if face.pose is not None:
            title += f"  yaw {face.pose.yaw:+.0f}"
        title_top = max(0.0, y - line)
        draw.rectangle(
            (x, title_top, x + draw.textlength(title, font=font) + 6 * unit, title_top + line), fill=colour
        )
        draw.text((x + 3 * unit, title_top + 2 * unit), title, fill="black", font=font)
        ranked = sorted(face.scores.items(), key=lambda item: -item[1])[:bars]
        width = max(w, 120 * unit)
        top = y + h + 2 * unit
        if top + bars * line > image.height:  # no room below: inside the box's bottom
            top = y + h - bars * line - 2 * unit
        draw.rectangle((x, top, x + width, top + bars * line), fill=(0, 0, 0, 150))
        for row, (label, score) in enumerate(ranked):
            row_top = top + row * line
            draw.rectangle((x, row_top + unit, x + width * score, row_top + line - unit), fill=colour)
            draw.text((x + 3 * unit, row_top + 2 * unit), f"{label} {score:.0%}", fill="white", font=font)
    return image
