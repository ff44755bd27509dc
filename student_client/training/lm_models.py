"""A tiny causal language model for the LM quickstart (`student-client demo-lm`).

Smaller than the default sequence teacher (dim 128, 2 layers, an output layer of its own): by
default dim 64, 1 layer, 4 heads, learned positions and the output layer tied to the embedding.
Written with `torch.nn` only, so the student needs nothing of the teacher's code.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyCausalLM(nn.Module):
    """`forward(ids)`: ids (batch, L) int64 in [0, vocab_size), L <= max_length, padding after
    the real ids (never read by a real position: attention is causal); returns next-token logits
    (batch, L, vocab_size), float32. Row t predicts the id at t + 1."""

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        dim: int = 64,
        layers: int = 1,
        attention_heads: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if dim % attention_heads:
            raise ValueError(f"dim: {dim} does not split into {attention_heads} attention heads")
        self.max_length = max_length
        self.embedding = nn.Embedding(vocab_size, dim)
        self.positions = nn.Parameter(torch.zeros(max_length, dim))
        nn.init.normal_(self.positions, std=0.02)
        nn.init.normal_(self.embedding.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(
            dim,
            attention_heads,
            dim_feedforward=4 * dim,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        if length > self.max_length:
            raise ValueError(f"ids: length {length} exceeds max_length {self.max_length}")
        hidden = self.dropout(self.embedding(ids) + self.positions[:length])  # (batch, L, dim)
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device)
        hidden = self.blocks(hidden, mask=causal, is_causal=True)  # (batch, L, dim)
        return self.norm(hidden) @ self.embedding.weight.T  # (batch, L, vocab): tied output
