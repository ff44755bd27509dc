"""Small student architectures: a shared trunk and one linear head per task."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class StudentMLP(nn.Module):
    """Flatten -> hidden layers (ReLU) -> one linear head per task. `forward` returns
    {task: logits (batch, classes)}."""

    def __init__(
        self, input_shape: Sequence[int], tasks: dict[str, int], hidden: Sequence[int] = (32,)
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(width, n) for name, n in tasks.items()})

    def forward(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.trunk(inputs)  # (batch, hidden[-1])
        return {name: head(features) for name, head in self.heads.items()}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
