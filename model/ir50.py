"""IR-50 stages 1-3 (the improved-residual ResNet of ArcFace), FERMam's image CNN at 112x112.

Only the stem and the first three stages are built: FERMam reads the 256x14x14 map of stage 3;
stage 4 and the embedding layer of the face-recognition network are never used.
"""

from __future__ import annotations

import torch
from torch import nn

STEM_CHANNELS = 64
STAGE_CHANNELS = (64, 128, 256)


class IRUnit(nn.Module):
    """One `bottleneck_IR` unit: BN -> conv3x3 -> PReLU -> conv3x3 (stride) -> BN, plus a shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        # Same width: the shortcut is a strided subsample (a 1x1 max-pool in the research code).
        self.shortcut: nn.Module | None = None
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.bn_in = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.act = nn.PReLU(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn_out = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is not None:
            shortcut = self.shortcut(x)
        else:
            shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        residual = self.bn_out(self.conv2(self.act(self.conv1(self.bn_in(x)))))
        return residual + shortcut


class IR50Trunk(nn.Module):
    """Stem and IR-50 stages 1-3: (B, 3, 112, 112) -> (B, 256, 14, 14)."""

    def __init__(self, units_per_stage: tuple[int, ...] = (3, 4, 14)) -> None:
        super().__init__()
        if len(units_per_stage) != len(STAGE_CHANNELS):
            raise ValueError(f"IR-50 trunk has {len(STAGE_CHANNELS)} stages; got {units_per_stage}")
        self.stem = nn.Sequential(
            nn.Conv2d(3, STEM_CHANNELS, 3, padding=1, bias=False),
            nn.BatchNorm2d(STEM_CHANNELS),
            nn.PReLU(STEM_CHANNELS),
        )
        units: list[nn.Module] = []
        in_channels = STEM_CHANNELS
        for out_channels, count in zip(STAGE_CHANNELS, units_per_stage, strict=True):
            for index in range(count):
                units.append(IRUnit(in_channels, out_channels, stride=2 if index == 0 else 1))
                in_channels = out_channels
        self.units = nn.Sequential(*units)
        self.out_channels = in_channels
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        # Zero the last BN of every residual branch so each unit starts as its shortcut: deep
        # residual nets trained from scratch converge faster and more stably that way.
        for unit in self.units:
            nn.init.zeros_(unit.bn_out.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.units(self.stem(x))
