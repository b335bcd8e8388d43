"""MobileFaceNet at 112x112: FERMam's landmark branch.

Its 512x7x7 map (after `conv_6_sep`) gives the 49 geometry tokens the fusion consumes; its GDC
head regresses 68 (x, y) landmarks as fractions of the crop side, the task it is pretrained on so
that those tokens are geometry-aware. Module names follow the public MobileFaceNet landmark
checkpoints (conv1, conv2_dw, conv_23, ..., output_layer) so their weights map with few renames.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import NUM_LANDMARKS

FEATURE_CHANNELS = 512


class ConvBN(nn.Module):
    """Conv (no bias) + BN, optionally + PReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int = 1,
        stride: int = 1,
        groups: int = 1,
        activation: bool = True,
        padding: int | None = None,
    ) -> None:
        super().__init__()
        padding = kernel // 2 if padding is None else padding
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel, stride=stride, padding=padding, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.prelu = nn.PReLU(out_channels) if activation else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.prelu(x) if self.prelu is not None else x


class DepthwiseBottleneck(nn.Module):
    """Inverted bottleneck: 1x1 expand, depthwise 3x3 (stride), linear 1x1 projection."""

    def __init__(
        self, in_channels: int, out_channels: int, expanded: int, stride: int, residual: bool
    ) -> None:
        super().__init__()
        self.conv = ConvBN(in_channels, expanded, 1)
        self.conv_dw = ConvBN(expanded, expanded, 3, stride=stride, groups=expanded)
        self.project = ConvBN(expanded, out_channels, 1, activation=False)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.conv_dw(self.conv(x)))
        return x + out if self.residual else out


class ResidualStack(nn.Module):
    """`count` stride-1 residual bottlenecks of constant width."""

    def __init__(self, channels: int, count: int, expanded: int) -> None:
        super().__init__()
        self.model = nn.Sequential(
            *[DepthwiseBottleneck(channels, channels, expanded, 1, residual=True) for _ in range(count)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LandmarkHead(nn.Module):
    """Global depthwise 7x7 conv, then a linear layer to 68 (x, y) fractions of the crop side."""

    def __init__(self, channels: int = FEATURE_CHANNELS, outputs: int = 2 * NUM_LANDMARKS) -> None:
        super().__init__()
        # Unpadded 7x7 depthwise conv: a learned weighted pooling of the 7x7 map to 1x1.
        self.conv_6_dw = ConvBN(channels, channels, 7, groups=channels, activation=False, padding=0)
        self.linear = nn.Linear(channels, outputs, bias=False)
        self.bn = nn.BatchNorm1d(outputs)
        # Start near the crop centre with a small spread: targets are fractions in [0, 1].
        nn.init.constant_(self.bn.weight, 0.1)
        nn.init.constant_(self.bn.bias, 0.5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = self.conv_6_dw(features).flatten(1)  # (B, C, 7, 7) -> (B, C)
        return self.bn(self.linear(pooled))


class MobileFaceNet(nn.Module):
    """(B, 3, 112, 112) -> features (B, 512, 7, 7) and landmarks (B, 136)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = ConvBN(3, 64, 3, stride=2)  # 56x56
        self.conv2_dw = ConvBN(64, 64, 3, groups=64)
        self.conv_23 = DepthwiseBottleneck(64, 64, 128, stride=2, residual=False)  # 28x28
        self.conv_3 = ResidualStack(64, 4, 128)
        self.conv_34 = DepthwiseBottleneck(64, 128, 256, stride=2, residual=False)  # 14x14
        self.conv_4 = ResidualStack(128, 6, 256)
        self.conv_45 = DepthwiseBottleneck(128, 128, 512, stride=2, residual=False)  # 7x7
        self.conv_5 = ResidualStack(128, 2, 256)
        self.conv_6_sep = ConvBN(128, FEATURE_CHANNELS, 1)
        self.output_layer = LandmarkHead()
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        # The 7x7 head conv averages a whole map; fan_out init would make it far too loud.
        nn.init.normal_(self.output_layer.conv_6_dw.conv.weight, std=1.0 / 7)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2_dw(self.conv1(x))
        x = self.conv_3(self.conv_23(x))
        x = self.conv_4(self.conv_34(x))
        x = self.conv_5(self.conv_45(x))
        return self.conv_6_sep(x)

    def forward(self, x: torch.Tensor, features_only: bool = False) -> torch.Tensor:
        """68 landmarks as (B, 136): x0, y0, x1, y1, ... as fractions of the crop side.

        ``features_only`` returns the (B, 512, 7, 7) map instead; FERMam calls the branch that way
        so that module hooks (flop counting, profiling) see it run.
        """
        features = self.forward_features(x)
        return features if features_only else self.output_layer(features)
