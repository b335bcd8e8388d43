"""FERMam: IR-50 + Conv-SSM image branch, MobileFaceNet landmark branch, pyramid ASFR fusion.

Input (B, 3, S, S) normalised per ``config.contract``; output (B, num_classes) logits.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from model.config import FERMamConfig
from model.fusion import PyramidFusion
from model.ir50 import IR50Trunk
from model.mobilefacenet import MobileFaceNet
from model.ssm import ConvSSMBlock

PATCH = 2  # 2x2 space-to-depth: 14x14 -> 7x7 tokens


class PatchMerge(nn.Module):
    """(B, C, 2H, 2W) -> (B, H, W, dim): each 2x2 patch's 4C values, projected linearly."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(PATCH * PATCH * in_channels, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h, w = height // PATCH, width // PATCH
        # Channel-last first (free for channels_last memory), then gather each patch's (dy, dx, c).
        patches = x.permute(0, 2, 3, 1).reshape(batch, h, PATCH, w, PATCH, channels)
        patches = patches.transpose(2, 3).reshape(batch, h, w, PATCH * PATCH * channels)
        return self.proj(patches)


class SqueezeExcite(nn.Module):
    """Channel gate on a pooled vector: x * sigmoid(W2 relu(W1 x))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, dim)
        self.linear2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.linear2(torch.relu(self.linear1(x))))


class FERMam(nn.Module):
    """The whole network; ``config`` travels with its weights (see model.checkpoint)."""

    def __init__(self, config: FERMamConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or FERMamConfig()
        dim = config.embed_dim
        self.ir50 = IR50Trunk(config.ir_units)
        self.patch_merge = PatchMerge(self.ir50.out_channels, dim)
        self.conv_ssm = ConvSSMBlock(dim, config.d_state, config.ss2d_expand, config.dt_rank)
        self.landmark_branch = MobileFaceNet()
        self.fusion = PyramidFusion(
            dim, config.d_state, config.asfr_expand, config.asfr_dt_rank, config.dropout
        )
        self.se = SqueezeExcite(dim)
        self.head = nn.Linear(dim, config.num_classes)
        if config.landmark_frozen:
            self.landmark_branch.requires_grad_(False)
            self.landmark_branch.eval()

    def train(self, mode: bool = True) -> FERMam:
        """Like nn.Module.train, but a frozen landmark branch stays in eval mode (its BN statistics
        belong to its landmark pretraining and must not drift)."""
        super().train(mode)
        if self.config.landmark_frozen:
            self.landmark_branch.eval()
        return self

    def landmark_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 512, 7, 7) geometry map of the landmark branch (no graph when frozen)."""
        frozen = self.config.landmark_frozen
        with torch.no_grad() if frozen else contextlib.nullcontext():
            return self.landmark_branch(x, features_only=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, dim) pooled, SE-gated embedding."""
        tokens = self.conv_ssm(self.patch_merge(self.ir50(x)))  # (B, 7, 7, dim)
        fused = self.fusion(tokens, self.landmark_features(x))  # (B, 7, 7, dim)
        return self.se(fused.mean(dim=(1, 2)))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
