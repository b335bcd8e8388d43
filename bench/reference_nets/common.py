"""Pieces POSTER and POSTER++ share: IR-50 stage maps, MobileFaceNet scale maps, the dead weights
their published checkpoints carry, a transformer MLP."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from model.ir50 import IR50Trunk
from model.mobilefacenet import MobileFaceNet

IR50_UNITS = (3, 4, 14)  # stages 1-3 of IR-50; both papers drop stage 4
IR50_STAGE4_CHANNELS = 512
IR50_EMBEDDING = 512
STAGE4_SIDE = 7  # stage 4 would give 512x7x7 at 112x112


class IR50Stages(nn.Module):
    """IR-50 stages 1-3 returning every stage's map: (B, 64, 56, 56), (B, 128, 28, 28), (B, 256, 14, 14)
    at 112x112. The project's IR50Trunk, whose forward returns only the last map (all FERMam reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = IR50Trunk(IR50_UNITS)
        self.stage_ends = set(itertools.accumulate(IR50_UNITS))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.trunk.stem(x)
        maps: list[torch.Tensor] = []
        for index, unit in enumerate(self.trunk.units, start=1):
            x = unit(x)
            if index in self.stage_ends:
                maps.append(x)
        return maps


class LandmarkScales(nn.Module):
    """MobileFaceNet returning its maps after conv_3, conv_4 and conv_6_sep: (B, 64, 28, 28),
    (B, 128, 14, 14), (B, 512, 7, 7). The project's network (the same layers as POSTER's landmark
    regressor), whose forward_features returns only the last map; its landmark head is not run."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MobileFaceNet()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self.net
        fine = net.conv_3(net.conv_23(net.conv2_dw(net.conv1(x))))
        middle = net.conv_4(net.conv_34(fine))
        coarse = net.conv_6_sep(net.conv_5(net.conv_45(middle)))
        return [fine, middle, coarse]


def ir50_embedding_layer() -> nn.Sequential:
    """IR-50's face-recognition output layer (BN, flatten, Linear(512*7*7, 512), BN).

    Both published models construct it with the backbone so that face.evoLVe's ir50.pth loads
    whole, and never run it (stage 4, which would feed it, is gone): 12.85 M dead parameters.
    """
    return nn.Sequential(
        nn.BatchNorm2d(IR50_STAGE4_CHANNELS),
        nn.Flatten(),
        nn.Linear(IR50_STAGE4_CHANNELS * STAGE4_SIDE * STAGE4_SIDE, IR50_EMBEDDING),
        nn.BatchNorm1d(IR50_EMBEDDING),
    )


class Mlp(nn.Module):
    """Transformer feed-forward: Linear, GELU, Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
