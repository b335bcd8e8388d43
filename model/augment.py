"""Batched geometric and photometric augmentation on the device, for images and 68 landmarks.

Training keeps the whole dataset on the GPU as uint8; every batch is warped from its 48x48
source straight to the network's input size with one `grid_sample`, so resizing and augmenting
cost one kernel and no host round trip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Index of each 68-point landmark's mirror image (iBUG / 300-W order), for horizontal flips.
# fmt: off
FLIP_68: tuple[int, ...] = (
    *range(16, -1, -1),  # jaw
    *range(26, 16, -1),  # eyebrows
    27, 28, 29, 30,  # nose bridge
    35, 34, 33, 32, 31,  # nostrils
    45, 44, 43, 42, 47, 46,  # eyes
    39, 38, 37, 36, 41, 40,
    54, 53, 52, 51, 50, 49, 48,  # outer lips
    59, 58, 57, 56, 55,
    64, 63, 62, 61, 60,  # inner lips
    67, 66, 65,
)
# fmt: on


@dataclass(frozen=True)
class AugmentSettings:
    rotate_deg: float = 12.0
    scale: tuple[float, float] = (0.88, 1.12)  # >1 samples a larger area: the face looks smaller
    shift: float = 0.08  # in normalised coordinates (the side spans 2)
    flip_p: float = 0.5
    brightness: float = 0.25
    contrast: float = 0.3
    erase_p: float = 0.25
    erase_area: tuple[float, float] = (0.02, 0.15)


def random_affines(
    n: int, settings: AugmentSettings, device: torch.device, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output-to-input affine maps (n, 2, 3) in normalised coordinates, and which ones flip."""

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, device=device, generator=generator) * (hi - lo) + lo

    angle = uniform(-settings.rotate_deg, settings.rotate_deg) * (math.pi / 180)
    scale = uniform(*settings.scale)
    flipped = torch.rand(n, device=device, generator=generator) < settings.flip_p
    mirror = torch.where(flipped, -1.0, 1.0)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack(
        [
            torch.stack([cos * mirror, -sin, uniform(-settings.shift, settings.shift)], dim=1),
            torch.stack([sin * mirror, cos, uniform(-settings.shift, settings.shift)], dim=1),
        ],
        dim=1,
    )
    return theta, flipped


def identity_affines(n: int, device: torch.device) -> torch.Tensor:
    return torch.eye(2, 3, device=device).expand(n, 2, 3)


def warp_images(images: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Warp (n, C, H, W) float images through `theta` to (n, C, size, size)."""
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def warp_points(points: torch.Tensor, theta: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
    """Map (n, 68, 2) points (fractions of the side) from input to warped output coordinates."""
    normalised = points * 2 - 1
    linear, offset = theta[:, :, :2], theta[:, :, 2]
    out = torch.linalg.solve(linear, (normalised - offset[:, None, :]).transpose(1, 2)).transpose(1, 2)
    # A mirrored face's left eye is the original's right eye: relabel the points.
    flip_index = torch.as_tensor(FLIP_68, device=points.device)
    out = torch.where(flipped[:, None, None], out[:, flip_index], out)
    return (out + 1) / 2


def photometric(
    x: torch.Tensor, settings: AugmentSettings, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random brightness and contrast on images in [0, 1]."""
    n = x.shape[0]
    shape = (n,) + (1,) * (x.dim() - 1)
    b = (torch.rand(shape, device=x.device, generator=generator) * 2 - 1) * settings.brightness
    c = 1 + (torch.rand(shape, device=x.device, generator=generator) * 2 - 1) * settings.contrast
    mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return ((x - mean) * c + mean + b).clamp(0, 1)


def random_erase(
    x: torch.Tensor, settings: AugmentSettings, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Blank one random rectangle in a fraction of the images (occlusion robustness)."""
    n, _, h, w = x.shape
    dev = x.device
    area = torch.rand(n, device=dev, generator=generator) * (settings.erase_area[1] - settings.erase_area[0])
    area = area + settings.erase_area[0]
    aspect = torch.exp((torch.rand(n, device=dev, generator=generator) - 0.5) * 2 * math.log(3))
    eh = (torch.sqrt(area * aspect) * h).clamp(1, h)
    ew = (torch.sqrt(area / aspect) * w).clamp(1, w)
    top = torch.rand(n, device=dev, generator=generator) * (h - eh)
    left = torch.rand(n, device=dev, generator=generator) * (w - ew)
    ys = torch.arange(h, device=dev)[None, :, None]
    xs = torch.arange(w, device=dev)[None, None, :]
    inside = (
        (ys >= top[:, None, None])
        & (ys < (top + eh)[:, None, None])
        & (xs >= left[:, None, None])
        & (xs < (left + ew)[:, None, None])
    )
    apply = torch.rand(n, device=dev, generator=generator) < settings.erase_p
    mask = (inside & apply[:, None, None])[:, None]
    fill = torch.rand((n, 1, 1, 1), device=dev, generator=generator)
    return torch.where(mask, fill, x)
