"""Pyramid fusion of image and landmark tokens: 7x7, 3x3 and 1x1 scales, one ASFR each."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.ssm import ASFR

# Average-pool windows of the coarse scales: 7x7 -> 3x3 and 7x7 -> 1x1.
COARSE_POOLS = (2, 4)


class PyramidFusion(nn.Module):
    """(B, H, W, C) image tokens + (B, C, H, W) landmark map -> (B, H, W, C) fused tokens."""

    def __init__(
        self, dim: int = 512, d_state: int = 16, expand: int = 2, dt_rank: int = 8, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.fusion_proj = nn.Linear(2 * dim, dim)
        self.scales = nn.ModuleList(
            [ASFR(dim, d_state, expand, dt_rank, dropout) for _ in range(1 + len(COARSE_POOLS))]
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, image_tokens: torch.Tensor, landmark_map: torch.Tensor) -> torch.Tensor:
        height, width = image_tokens.shape[1:3]
        landmark_tokens = landmark_map.permute(0, 2, 3, 1)  # raster order, channel-last
        x = self.fusion_proj(torch.cat([image_tokens, landmark_tokens.to(image_tokens.dtype)], dim=-1))
        fused = self.scales[0](x)
        x_nchw = x.permute(0, 3, 1, 2)
        for asfr, pool in zip(self.scales[1:], COARSE_POOLS, strict=True):
            coarse = F.avg_pool2d(x_nchw, pool).permute(0, 2, 3, 1)
            refined = asfr(coarse).permute(0, 3, 1, 2)
            upsampled = F.interpolate(refined, size=(height, width), mode="bilinear", align_corners=False)
            fused = fused + upsampled.permute(0, 2, 3, 1)
        return self.norm(fused)
