"""The default teacher's architecture: a small CNN backbone shared by one linear head per task."""

from __future__ import annotations

import torch
from torch import nn


class MultiTaskCNN(nn.Module):
    """Two conv blocks (a spatial `feature_map` hint), a dense `features` layer, one head per task.

    Input: (batch, 1, 28, 28) float32 in [0, 1]. Hints: `feature_map` (batch, c2, 7, 7) and
    `features` (batch, feature_dim).
    """

    def __init__(
        self,
        tasks: dict[str, int],
        in_channels: int = 1,
        channels: tuple[int, int] = (32, 64),
        feature_dim: int = 256,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14 -> 7
        )
        self.dense = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * 7 * 7, feature_dim), nn.ReLU(), nn.Dropout(dropout)
        )
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, n) for name, n in tasks.items()})

    def forward_features(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        feature_map = self.conv(inputs)  # (batch, c2, 7, 7)
        return {"feature_map": feature_map, "features": self.dense(feature_map)}

    def forward(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.forward_features(inputs)["features"]
        return {name: head(features) for name, head in self.heads.items()}
