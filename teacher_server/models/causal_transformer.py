"""A decoder-only transformer over token ids: a language-model head per token, sequence heads.

THE SEQUENCE MODEL CONTRACT (every sequence teacher follows it: this architecture and the Hugging
Face adapters; the engine will rely on nothing else):

- attributes: `task_levels: dict[str, str]` (task -> `"token"` or `"sequence"`), `heads:
  nn.ModuleDict` (task -> module mapping hidden `(..., dim)` to logits `(..., classes)`),
  `vocab_size: int`, `max_length: int`.
- `forward_features(input_ids: LongTensor (batch, length), lengths: LongTensor (batch,)) ->
  dict[str, Tensor]` with `"tokens"`: `(batch, length, dim)` the hidden states feeding token-level
  heads, `"sequence"`: `(batch, dim)` the pooled state feeding sequence-level heads (for a causal
  model: the state at the last real token), plus named hints (e.g. `"layer_2"`:
  `(batch, length, dim)`). Positions `>= lengths[i]` are padding: they never influence any real
  position's value.
- `forward(input_ids, lengths) -> dict[str, Tensor]`: task -> float32 logits, `(batch, length,
  classes)` for token-level tasks (values at padding positions are unspecified), `(batch,
  classes)` for sequence-level tasks.

This architecture: pre-norm blocks (LayerNorm, causal self-attention, LayerNorm, GELU MLP), learned
or rotary positions, a final LayerNorm. The language-model task (`lm_task`, default `next_token`:
at position t, the distribution of token t + 1) is the only token-level task; its head's weight is
also the input embedding (tied), so the state dict holds it once, as `heads.<lm_task>.weight`.
Every other task is sequence-level: a linear head on the state at the last real token. Hints:
`layer_<i>` for each layer in `hint_layers` (1-based), the block's output per token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

POSITIONS = ("rotary", "learned")


class TiedLanguageModelHead(nn.Module):
    """Logits over the vocabulary from hidden states; its weight is also the input embedding."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab_size, dim) * dim**-0.5)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)  # (batch, length, dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.weight.t()  # (..., vocab)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (Su et al., 2021, RoFormer) on (batch, heads, length, head_dim)."""
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


class _Block(nn.Module):
    def __init__(self, dim: int, attention_heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.attention_heads = attention_heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim), nn.Dropout(dropout)
        )

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = (
            self.qkv(self.norm1(x))
            .view(batch, length, 3, self.attention_heads, dim // self.attention_heads)
            .permute(2, 0, 3, 1, 4)  # 3 x (batch, heads, length, head_dim)
        )
        if rotary is not None:
            q, k = _rotate(q, *rotary), _rotate(k, *rotary)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        attended = attended.transpose(1, 2).reshape(batch, length, dim)
        x = x + F.dropout(self.out(attended), self.dropout, self.training)
        return x + self.mlp(self.norm2(x))


class CausalTransformer(nn.Module):
    """A decoder-only transformer following the sequence model contract (module docstring).

    `tasks` maps each task to its class count; `tasks[lm_task]` must equal `vocab_size`.
    Inputs: `input_ids` (batch, length) int64 in [0, vocab_size), length <= `max_length`;
    `lengths` (batch,) int64 in [1, length].
    """

    inverse_frequency: torch.Tensor  # rotary positions: (head_dim / 2,), not saved

    def __init__(
        self,
        tasks: dict[str, int],
        vocab_size: int,
        max_length: int = 128,
        dim: int = 128,
        layers: int = 2,
        attention_heads: int = 4,
        mlp_dim: int | None = None,
        positions: str = "rotary",
        dropout: float = 0.0,
        lm_task: str = "next_token",
        hint_layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if tasks.get(lm_task) != vocab_size:
            raise ValueError(
                f"tasks[{lm_task!r}]: the language-model task needs vocab_size={vocab_size} "
                f"classes, got {tasks.get(lm_task)}"
            )
        if positions not in POSITIONS:
            raise ValueError(f"positions: expected one of {list(POSITIONS)}, got {positions!r}")
        if dim % attention_heads or (positions == "rotary" and (dim // attention_heads) % 2):
            raise ValueError(f"dim {dim} must split into {attention_heads} heads of even size")
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.positions = positions
        self.hint_layers = (
            tuple(hint_layers) if hint_layers is not None else tuple(range(1, layers + 1))
        )
        if not all(1 <= i <= layers for i in self.hint_layers):
            raise ValueError(f"hint_layers: expected layers in [1, {layers}], got {hint_layers}")
        self.task_levels = {t: "token" if t == lm_task else "sequence" for t in tasks}
        self.lm_task = lm_task
        self.heads = nn.ModuleDict(
            {
                name: TiedLanguageModelHead(vocab_size, dim)
                if name == lm_task
                else nn.Linear(dim, n)
                for name, n in tasks.items()
            }
        )
        self.position_embedding = nn.Embedding(max_length, dim) if positions == "learned" else None
        head_dim = dim // attention_heads
        inverse_frequency = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inverse_frequency", inverse_frequency, persistent=False)
        self.blocks = nn.ModuleList(
            _Block(dim, attention_heads, mlp_dim or 4 * dim, dropout) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def _lm_head(self) -> TiedLanguageModelHead:
        head = self.heads[self.lm_task]
        assert isinstance(head, TiedLanguageModelHead)
        return head

    def forward_features(
        self, input_ids: torch.Tensor, lengths: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        batch, length = input_ids.shape
        if length > self.max_length:
            raise ValueError(f"input_ids: length {length} is over max_length {self.max_length}")
        device = input_ids.device
        position = torch.arange(length, device=device)
        x = self._lm_head().embed(input_ids)  # (batch, length, dim)
        rotary = None
        if self.position_embedding is not None:
            x = x + self.position_embedding(position)
        else:
            angles = position[:, None].float() * self.inverse_frequency  # (length, head_dim / 2)
            rotary = (angles.cos(), angles.sin())
        x = self.dropout(x)
        # A query sees keys at or before it that are real: padding never reaches a real position,
        # and a padding query still sees key 0, so no row of the softmax is empty.
        causal = position[None, :] <= position[:, None]  # (length, length): [query, key]
        real_key = position[None, :] < lengths.to(device)[:, None]  # (batch, length)
        mask = (causal[None] & real_key[:, None, :])[:, None]  # (batch, 1, length, length)
        features: dict[str, torch.Tensor] = {}
        for index, block in enumerate(self.blocks, start=1):
            x = block(x, mask, rotary)
            if index in self.hint_layers:
                features[f"layer_{index}"] = x
        tokens = self.norm(x)  # (batch, length, dim)
        last = (lengths.to(device) - 1).clamp(min=0)
        features["tokens"] = tokens
        features["sequence"] = tokens[torch.arange(batch, device=device), last]  # (batch, dim)
        return features

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.forward_features(input_ids, lengths)
        return {
            name: head(features["tokens" if self.task_levels[name] == "token" else "sequence"])
            for name, head in self.heads.items()
        }
