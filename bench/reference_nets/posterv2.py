"""POSTER++ (POSTER V2, Mao et al. 2023, "A simpler and stronger facial expression recognition network").

The published configuration (released code, RAF-DB / AffectNet): IR-50 stages 1-3 and a frozen
MobileFaceNet landmark network, both on a 112x112 face (the code takes 224x224 and resizes it to 112
for both branches); at three scales the image map, halved by a stride-2 conv, attends to the
landmark map in windows (28, 14, 7: one window per map), the landmark tokens being the queries
shared by every window; the three results become 49 + 49 + 49 tokens of 768 that two ViT blocks
fuse; the class token goes through a squeeze-excite gate to the classifier.

Input (B, 3, 112, 112); output (B, num_classes) logits. Random weights: for counting and timing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.reference_nets.common import IR50Stages, LandmarkScales, Mlp, ir50_embedding_layer
from model.fermam import SqueezeExcite
from model.mobilefacenet import FEATURE_CHANNELS as LANDMARK_CHANNELS

SCALE_DIMS = (64, 128, 256)  # IR-50 stage widths; the landmark maps are brought to the same
SCALE_HEADS = (2, 4, 8)
WINDOWS = (28, 14, 7)  # each equals its map's side after the stride-2 reduction
EMBED_DIM = 768
VIT_DEPTH = 2
VIT_HEADS = 8
MLP_RATIO = 4
LAYER_SCALE = 1e-5  # the window blocks' residual branches start almost closed
TOKENS_PER_SCALE = 49  # every scale ends as a 7x7 grid
VIT_NORM_EPS = 1e-6

# Figures published with the model: the README (and abstract) give 8.4 G "FLOPs" and 43.7 M params,
# both from thop at 7 classes (thop counts MACs, and only the parameters of modules that run).
PUBLISHED = {"params": 43_700_000, "macs": 8_400_000_000, "source": "POSTER V2 README / abstract (thop)"}


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) index into a (2w-1)^2 table of learned biases, one per 2-D offset between positions."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/w * W/w, w*w, C), windows batch-major."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // window, window, width // window, window, channels)
    return x.transpose(2, 3).reshape(-1, window * window, channels)


def window_merge(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of window_partition: (B * nW, w*w, C) -> (B, H, W, C)."""
    channels = windows.shape[-1]
    x = windows.reshape(-1, height // window, width // window, window, window, channels)
    return x.transpose(2, 3).reshape(-1, height, width, channels)


class WindowCrossAttention(nn.Module):
    """Image windows (keys, values) attend to landmark tokens (queries, unprojected, shared by all
    windows), with a relative-position bias per head."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads = heads
        self.window = window
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        self.register_buffer("bias_index", relative_position_index(window), persistent=False)

    def forward(self, windows: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """windows (B * nW, N, C), queries (B, N, C) -> (B * nW, N, C)."""
        batch_windows, tokens, channels = windows.shape
        batch = queries.shape[0]
        head_dim = channels // self.heads
        kv = self.kv(windows).reshape(batch_windows, tokens, 2, self.heads, head_dim)
        key, value = kv.permute(2, 0, 3, 1, 4)  # 2 x (B * nW, heads, N, head_dim)
        query = queries.reshape(batch, 1, tokens, self.heads, head_dim).transpose(2, 3)
        query = query.expand(batch, batch_windows // batch, -1, -1, -1)
        query = query.reshape(batch_windows, self.heads, tokens, head_dim)
        bias = self.bias_table[self.bias_index].permute(2, 0, 1)  # (heads, N, N)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias.to(query.dtype))
        return self.proj(out.transpose(1, 2).reshape(batch_windows, tokens, channels))


class LandmarkWindowBlock(nn.Module):
    """One scale: halve the IR-50 map (stride-2 conv), normalise, window cross-attention to the
    landmark map, then an MLP; both residual branches layer-scaled. The normalised map is the
    shortcut, as published."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.window = window
        self.reduce = nn.Conv2d(dim, dim, 3, stride=2, padding=1)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowCrossAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, MLP_RATIO * dim)
        self.gamma1 = nn.Parameter(torch.full((dim,), LAYER_SCALE))
        self.gamma2 = nn.Parameter(torch.full((dim,), LAYER_SCALE))

    def forward(self, image_map: torch.Tensor, landmark_map: torch.Tensor) -> torch.Tensor:
        """image_map (B, C, 2H, 2W), landmark_map (B, C, H, W) with H = W = window -> (B, C, H, W)."""
        x = self.norm1(self.reduce(image_map).permute(0, 2, 3, 1))  # (B, H, W, C)
        height, width = x.shape[1:3]
        queries = landmark_map.flatten(2).transpose(1, 2)  # (B, H*W, C), raster order
        attended = self.attn(window_partition(x, self.window), queries)
        x = x + self.gamma1 * window_merge(attended, self.window, height, width)
        x = x + self.gamma2 * self.mlp(self.norm2(x))
        return x.permute(0, 3, 1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, channels // self.heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, heads, N, head_dim)
        out = F.scaled_dot_product_attention(query, key, value)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, channels))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=VIT_NORM_EPS)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=VIT_NORM_EPS)
        self.mlp = Mlp(dim, MLP_RATIO * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def published_dead_weights() -> nn.ModuleDict:
    """Modules the released POSTER++ constructs and never runs (its thop figure leaves them out):
    IR-50's embedding layer, and leftovers inside its ViT class (a patch embedding, a 1x1 conv, two
    linear layers, an ECA conv, and a token-mixing Conv1d in each block)."""
    tokens = 3 * TOKENS_PER_SCALE + 1
    return nn.ModuleDict(
        {
            "ir50_embedding": ir50_embedding_layer(),
            "vit_patch_embed": nn.Conv2d(SCALE_DIMS[-1], EMBED_DIM, 1),
            "vit_con1": nn.Conv2d(SCALE_DIMS[-1], EMBED_DIM, 1, bias=False),
            "vit_ir_linear1": nn.Linear(1024, EMBED_DIM),
            "vit_ir_linear2": nn.Linear(EMBED_DIM, 512),
            "vit_eca": nn.Conv1d(1, 1, 5, padding=2, bias=False),
            "vit_block_mix": nn.ModuleList(nn.Conv1d(tokens, tokens, 1) for _ in range(VIT_DEPTH)),
        }
    )


class WindowCrossFusion(nn.Module):
    """The three scales: each IR-50 map attends to the landmark map of its size, and each result is
    embedded as 7x7 tokens of 768 -> (B, 147, 768)."""

    def __init__(self) -> None:
        super().__init__()
        self.landmark_reduce = nn.Conv2d(LANDMARK_CHANNELS, SCALE_DIMS[-1], 3, padding=1)  # 512 -> 256
        self.scales = nn.ModuleList(
            LandmarkWindowBlock(dim, heads, window)
            for dim, heads, window in zip(SCALE_DIMS, SCALE_HEADS, WINDOWS, strict=True)
        )
        fine, middle, coarse = SCALE_DIMS
        self.embed = nn.ModuleList(
            [
                nn.Sequential(  # 28x28 -> 14x14 -> 7x7
                    nn.Conv2d(fine, EMBED_DIM, 3, stride=2, padding=1),
                    nn.Conv2d(EMBED_DIM, EMBED_DIM, 3, stride=2, padding=1),
                ),
                nn.Conv2d(middle, EMBED_DIM, 3, stride=2, padding=1),  # 14x14 -> 7x7
                nn.Conv2d(coarse, EMBED_DIM, 1),  # 7x7
            ]
        )

    def forward(self, image_maps: list[torch.Tensor], landmark_maps: list[torch.Tensor]) -> torch.Tensor:
        landmark_maps = [*landmark_maps[:-1], self.landmark_reduce(landmark_maps[-1])]
        tokens = []
        for scale, embed, image_map, landmark_map in zip(
            self.scales, self.embed, image_maps, landmark_maps, strict=True
        ):
            tokens.append(embed(scale(image_map, landmark_map)).flatten(2).transpose(1, 2))  # (B, 49, 768)
        return torch.cat(tokens, dim=1)


class FusionTransformer(nn.Module):
    """A class token and position embeddings on the 147 tokens, two ViT blocks -> (B, 768) class token."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, EMBED_DIM))
        self.pos_embed = nn.Parameter(torch.zeros(1, 3 * TOKENS_PER_SCALE + 1, EMBED_DIM))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(EMBED_DIM, VIT_HEADS) for _ in range(VIT_DEPTH)))
        self.norm = nn.LayerNorm(EMBED_DIM, eps=VIT_NORM_EPS)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)  # (B, 148, 768)
        return self.norm(self.blocks(x + self.pos_embed))[:, 0]


class PosterV2(nn.Module):
    """POSTER++ at its published configuration; ``dead_weights`` adds the modules the released
    model carries but never runs, so that the parameter total matches a checkpoint's."""

    def __init__(self, num_classes: int = 7, dead_weights: bool = True) -> None:
        super().__init__()
        self.ir50 = IR50Stages()
        self.landmark_branch = LandmarkScales()
        self.landmark_branch.requires_grad_(False)  # a frozen landmark regressor, as published
        self.fusion = WindowCrossFusion()
        self.transformer = FusionTransformer()
        self.se = SqueezeExcite(EMBED_DIM)
        self.head = nn.Linear(EMBED_DIM, num_classes)
        self.dead_weights = published_dead_weights() if dead_weights else None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) -> (B, 768) gated class token."""
        tokens = self.fusion(self.ir50(x), self.landmark_branch(x))  # (B, 147, 768)
        return self.se(self.transformer(tokens))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
