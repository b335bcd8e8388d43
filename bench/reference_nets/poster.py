"""POSTER (Zheng et al. 2022, "A Pyramid Cross-Fusion Transformer Network for Facial Expression Recognition").

The published configuration (released code, POSTER-L as trained on RAF-DB): IR-50 stages 1-3 give 49
image tokens (2x2 patches of the 256x14x14 map, Linear(1024, 512)), a frozen MobileFaceNet gives 49
landmark tokens of 512 (its 512x7x7 map); each stream gets a mean token in front and the image
stream a position embedding: 100 tokens. The pyramid is over the embedding width: strided Conv1d
over the channel axis make 100 x 256 and 100 x 128 copies; each of 8 pyramid blocks runs one
two-stream cross-attention block per width (image attends to landmark queries and landmark to image
queries, MLP ratio 2, a 1x1 Conv1d mixing the 100 tokens) and adds the narrower result, widened by a
transposed Conv1d, into the wider one. The image mean token of the 512-wide stream goes through a
squeeze-excite gate to the classifier.

Input (B, 3, 112, 112); output (B, num_classes) logits. Random weights: for counting and timing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.reference_nets.common import Mlp, ir50_embedding_layer
from model.fermam import PatchMerge, SqueezeExcite
from model.ir50 import IR50Trunk
from model.mobilefacenet import MobileFaceNet

EMBED_DIM = 512
DEPTH = 8  # POSTER-L, the released default (small 4, base 6)
HEADS = 8
MLP_RATIO = 2
STREAM_TOKENS = 49 + 1  # 7x7 grid plus a mean token, per stream
TOKENS = 2 * STREAM_TOKENS
PYRAMID_STRIDES = (2, 4)  # widths 512 / 2 and 512 / 4
NORM_EPS = 1e-6

# POSTER V2's paper lists POSTER at 71.8 M parameters and 15.7 G "FLOPs" (the POSTER paper's own
# figures); read with thop, the released model has 58.98 M parameters in modules that run and
# 7.90 G MACs (design/fermam.md).
PUBLISHED = {"params": 71_800_000, "macs": 15_700_000_000, "source": "POSTER V2 paper, Table (POSTER)"}


class CrossAttention(nn.Module):
    """One stream's tokens (keys, values) attend to the other stream's tokens as queries, unprojected."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """queries, tokens (B, N, C) -> (B, N, C)."""
        batch, count, channels = tokens.shape
        head_dim = channels // self.heads
        kv = self.kv(tokens).reshape(batch, count, 2, self.heads, head_dim)
        key, value = kv.permute(2, 0, 3, 1, 4)  # 2 x (B, heads, N, head_dim)
        query = queries.reshape(batch, count, self.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value)
        return self.proj(out.transpose(1, 2).reshape(batch, count, channels))


class TwoStreamBlock(nn.Module):
    """Image-to-landmark and landmark-to-image cross-attention with an MLP each, then a 1x1 Conv1d
    over all 100 tokens. Both attentions read the block's input, normalised separately."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm_image_attn = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn_image = CrossAttention(dim, HEADS)
        self.norm_image_mlp = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp_image = Mlp(dim, MLP_RATIO * dim)
        self.norm_landmark_attn = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn_landmark = CrossAttention(dim, HEADS)
        self.norm_landmark_mlp = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp_landmark = Mlp(dim, MLP_RATIO * dim)
        self.mix = nn.Conv1d(TOKENS, TOKENS, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 100, C) -> (B, 100, C): image tokens first, landmark tokens second."""
        image, landmark = x[:, :STREAM_TOKENS], x[:, STREAM_TOKENS:]
        a = self.norm_image_attn(x)
        image = image + self.attn_image(a[:, STREAM_TOKENS:], a[:, :STREAM_TOKENS])
        image = image + self.mlp_image(self.norm_image_mlp(image))
        b = self.norm_landmark_attn(x)
        landmark = landmark + self.attn_landmark(b[:, :STREAM_TOKENS], b[:, STREAM_TOKENS:])
        landmark = landmark + self.mlp_landmark(self.norm_landmark_mlp(landmark))
        return self.mix(torch.cat([image, landmark], dim=1))


class PyramidBlock(nn.Module):
    """A two-stream block at each width (512, 256, 128); narrow results widened and added upward."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.large = TwoStreamBlock(dim)
        self.medium = TwoStreamBlock(dim // PYRAMID_STRIDES[0])
        self.small = TwoStreamBlock(dim // PYRAMID_STRIDES[1])
        # Transposed convs over the channel axis (tokens as channels) double the width.
        self.widen_small = nn.ConvTranspose1d(TOKENS, TOKENS, 2, stride=2)
        self.widen_medium = nn.ConvTranspose1d(TOKENS, TOKENS, 2, stride=2)

    def forward(
        self, large: torch.Tensor, medium: torch.Tensor, small: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        large, medium, small = self.large(large), self.medium(medium), self.small(small)
        medium = medium + self.widen_small(small)
        large = large + self.widen_medium(medium)
        return large, medium, small


class PyramidFusion(nn.Module):
    """Mean tokens and position embeddings, the width pyramid, 8 pyramid blocks -> (B, 512) image
    mean token of the widest stream."""

    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, STREAM_TOKENS, EMBED_DIM))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        # Strided Conv1d over the channel axis (the 100 tokens are Conv1d channels): 512 -> 256, 128.
        self.narrow = nn.ModuleList(nn.Conv1d(TOKENS, TOKENS, s, stride=s) for s in PYRAMID_STRIDES)
        self.blocks = nn.ModuleList(PyramidBlock(EMBED_DIM) for _ in range(DEPTH))
        self.norm = nn.LayerNorm(EMBED_DIM, eps=NORM_EPS)

    def forward(self, image: torch.Tensor, landmark: torch.Tensor) -> torch.Tensor:
        """image, landmark (B, 49, 512) -> (B, 512)."""
        image = torch.cat([image.mean(dim=1, keepdim=True), image], dim=1) + self.pos_embed
        landmark = torch.cat([landmark.mean(dim=1, keepdim=True), landmark], dim=1)
        large = torch.cat([image, landmark], dim=1)  # (B, 100, 512)
        medium, small = (narrow(large) for narrow in self.narrow)  # (B, 100, 256), (B, 100, 128)
        for block in self.blocks:
            large, medium, small = block(large, medium, small)
        return self.norm(large)[:, 0]


class Poster(nn.Module):
    """POSTER at its published configuration; ``dead_weights`` adds the modules the released model
    carries but never runs, so that the parameter total matches the paper's 71.8 M."""

    def __init__(self, num_classes: int = 7, dead_weights: bool = True) -> None:
        super().__init__()
        self.ir50 = IR50Trunk()
        self.patch_merge = PatchMerge(self.ir50.out_channels, EMBED_DIM)  # the paper's Linear(1024, 512)
        self.landmark_branch = MobileFaceNet()
        self.landmark_branch.requires_grad_(False)  # a frozen landmark regressor, as published
        self.fusion = PyramidFusion()
        self.se = SqueezeExcite(EMBED_DIM)
        self.head = nn.Linear(EMBED_DIM, num_classes)
        # Built by the released model, never run: IR-50's embedding layer, and a class token that
        # the code replaces by the stream's mean.
        self.dead_weights = (
            nn.ModuleDict({"ir50_embedding": ir50_embedding_layer()}) if dead_weights else None
        )
        self.dead_cls_token = nn.Parameter(torch.zeros(1, 1, EMBED_DIM)) if dead_weights else None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) -> (B, 512) gated image mean token."""
        image = self.patch_merge(self.ir50(x)).flatten(1, 2)  # (B, 49, 512)
        landmark = self.landmark_branch(x, features_only=True).flatten(2).transpose(1, 2)  # (B, 49, 512)
        return self.se(self.fusion(image, landmark))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
