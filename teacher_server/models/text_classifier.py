"""A token-id text classifier: the mean of the tokens' embeddings, one linear head per task.

A small architecture for teachers whose inputs are token ids rather than pixels. Its `config.json`
declares `"input": {"shape": [seq_len], "dtype": "int64", "max_value": vocab_size}`, so the server
refuses ids outside `[0, vocab_size)` before the forward.
"""

from __future__ import annotations

import torch
from torch import nn


class TokenClassifier(nn.Module):
    """`nn.EmbeddingBag(mode="mean")` over the token ids, one linear head per task.

    Input: (batch, seq_len) int64 ids in [0, vocab_size). Hint: `features` (batch, embedding_dim),
    the mean embedding the heads consume.
    """

    def __init__(
        self, tasks: dict[str, int], vocab_size: int = 1000, embedding_dim: int = 32
    ) -> None:
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocab_size, embedding_dim, mode="mean")
        self.heads = nn.ModuleDict({name: nn.Linear(embedding_dim, n) for name, n in tasks.items()})

    def forward_features(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        # A 2-D input is a batch of fixed-length bags: one mean embedding per row.
        return {"features": self.embedding(inputs)}

    def forward(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.forward_features(inputs)["features"]
        return {name: head(features) for name, head in self.heads.items()}
