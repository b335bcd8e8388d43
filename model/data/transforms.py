"""The one conversion from face crops to FERMam's input tensor, shared by training, eval and serving.

Keeping resize, colour mode and normalisation in one function is what makes the contract stored
in a checkpoint hold: whatever fed the network during training feeds it in the service.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from model.config import InputContract

# ITU-R BT.601 luma weights, the ones PIL uses for convert("L"), so grayscale photos in the
# service match the grayscale FER2013 faces the network was trained on.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def luminance(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in 0..1 -> (N, 1, H, W) luminance with PIL's weights."""
    weights = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def normalise(x: torch.Tensor, contract: InputContract) -> torch.Tensor:
    """(N, C, S, S) float crops in 0..1, C = 1 (grayscale) or 3 -> the network's (N, 3, S, S).

    The step every path shares last: the aligned crops of the service (service.engine.align)
    and the resized faces of training and evaluation (to_model_input).
    """
    x = x.expand(-1, 3, -1, -1)  # grayscale replicated to the network's 3 channels
    mean = torch.tensor(contract.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(contract.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def to_model_input(images: torch.Tensor | np.ndarray, contract: InputContract) -> torch.Tensor:
    """Face crops -> normalised float32 (N, 3, S, S) on the input's device.

    images: (N, H, W) grayscale or (N, H, W, 3) RGB; uint8 in 0..255, or floating in 0..1 (e.g.
    after augmentation on the GPU). Resizing is bilinear with antialiasing (so shrinking large
    crops does not alias); "gray" mode replaces RGB with its luminance in all three channels.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if x.ndim == 3:
        x = x.unsqueeze(-1)  # (N, H, W, 1)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"expected (N, H, W) or (N, H, W, 3) images, got {tuple(x.shape)}")
    x = x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)
    x = x.permute(0, 3, 1, 2)  # (N, C, H, W), C in {1, 3}
    if contract.colour_mode == "gray" and x.shape[1] == 3:
        x = luminance(x)
    size = contract.input_size
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return normalise(x, contract)
