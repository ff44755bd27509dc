"""Architectures the teacher can build from a repository `config.json` (by import path).

An architecture is an `nn.Module` with:
- `forward_features(inputs) -> dict[str, Tensor]`: the shared backbone, run once per batch; every
  entry is a named hint, and the entry `"features"` is what the task heads consume;
- `heads: nn.ModuleDict`, one head per task, mapping `features` to that task's logits.
"""
