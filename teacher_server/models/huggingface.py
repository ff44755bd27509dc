"""Adapters that serve Hugging Face `save_pretrained` folders under the project's model contracts.

`transformers` is optional (`pip install 'distill-teacher[hf]'`): it is imported only when a folder
is loaded. Loading is local and safe: `local_files_only=True`, safetensors weights only,
`trust_remote_code=False` (the repository refuses such folders before they get here, see
`teacher_server.repository.huggingface_config`; the flags are the second lock).

Two adapters:
- `HuggingFaceImageClassifier` (`*ForImageClassification`, ViT-style): the image contract.
  Inputs are raw pixels in [0, 1], (batch, 3, H, W) float32; the adapter normalises them with
  the folder's `image_mean` / `image_std` itself, so a student sends plain images.
- `HuggingFaceSequenceModel` (causal LMs, sequence and token classifiers): the sequence contract,
  `forward_features(input_ids, lengths)` with `"tokens"` and `"sequence"` states.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

INSTALL_HINT = "Hugging Face folders need transformers: pip install 'distill-teacher[hf]'"

# The `architectures[0]` suffix of a folder's config.json -> (our kind, the transformers Auto class).
KINDS = {
    "ForImageClassification": ("image_classification", "AutoModelForImageClassification"),
    "LMHeadModel": ("causal_lm", "AutoModelForCausalLM"),
    "ForCausalLM": ("causal_lm", "AutoModelForCausalLM"),
    "ForSequenceClassification": ("sequence_classification", "AutoModelForSequenceClassification"),
    "ForTokenClassification": ("token_classification", "AutoModelForTokenClassification"),
}
KINDS_BY_KIND = {kind: auto for kind, auto in KINDS.values()}
# The task each kind serves, and whether it is per token or per sequence.
TASKS = {
    "image_classification": ("label", "sequence"),
    "causal_lm": ("next_token", "token"),
    "sequence_classification": ("label", "sequence"),
    "token_classification": ("token_label", "token"),
}
# The `forward_features` entry each task level's head consumes.
STATE_OF_LEVEL = {"token": "tokens", "sequence": "sequence"}


class HuggingFaceLoadError(Exception):
    """A Hugging Face folder that cannot be adapted; the message names the fault."""


def model_kind(architectures: Any) -> str:
    """Our kind for a config.json's `architectures` list (e.g. `["GPT2LMHeadModel"]`)."""
    if not isinstance(architectures, list) or len(architectures) != 1:
        raise HuggingFaceLoadError(f"'architectures' must name one class, got {architectures!r}")
    for suffix, (kind, _) in KINDS.items():
        if str(architectures[0]).endswith(suffix):
            return kind
    raise HuggingFaceLoadError(
        f"architecture {architectures[0]!r} is not supported; supported: classes ending in "
        f"{sorted(KINDS)}"
    )


def load_pretrained(folder: Path) -> tuple[str, nn.Module]:
    """(kind, the transformers model in eval mode, float32) from a local `save_pretrained` folder."""
    try:
        import transformers
    except ImportError as error:
        raise HuggingFaceLoadError(INSTALL_HINT) from error
    raw = json.loads((folder / "config.json").read_text())
    kind = model_kind(raw.get("architectures"))
    auto_class = getattr(transformers, KINDS_BY_KIND[kind])
    try:
        model = auto_class.from_pretrained(
            str(folder),
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            dtype=torch.float32,
        )
    except (OSError, ValueError, KeyError) as error:
        raise HuggingFaceLoadError(f"transformers cannot load {folder}: {error}") from error
    return kind, model.eval()


def build_adapter(folder: Path) -> nn.Module:
    """The adapter for a folder: an image classifier or a sequence model."""
    kind, model = load_pretrained(folder)
    if kind == "image_classification":
        processor_path = folder / "preprocessor_config.json"
        processor = json.loads(processor_path.read_text()) if processor_path.is_file() else {}
        return HuggingFaceImageClassifier(model, processor)
    return HuggingFaceSequenceModel(model, kind)


def _classifier(model: nn.Module) -> nn.Module:
    for name in ("classifier", "score"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise HuggingFaceLoadError(f"{type(model).__name__} has no `classifier` or `score` head")


class HuggingFaceImageClassifier(nn.Module):
    """A ViT-style image classifier: `features` is the CLS token of the last layer (what its
    classifier consumes), `heads["label"]` its classifier; hints `layer_0` .. `layer_N` are the
    hidden states (batch, tokens, dim), `layer_0` the embeddings.

    Input: (batch, 3, H, W) float32 raw pixels in [0, 1] (the processor's rescaled range, H and W
    its `size`); normalised inside with `image_mean` / `image_std` when `do_normalize`.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: Any, processor: dict[str, Any]) -> None:
        super().__init__()
        self.model: nn.Module = model  # a transformers PreTrainedModel
        self.base: nn.Module = getattr(model, model.base_model_prefix)  # the backbone
        self.heads = nn.ModuleDict({"label": _classifier(model)})
        normalise = processor.get("do_normalize", True)
        mean = processor.get("image_mean", [0.5] * 3) if normalise else [0.0] * 3
        std = processor.get("image_std", [0.5] * 3) if normalise else [1.0] * 3
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward_features(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        normalised = (pixel_values - self.mean) / self.std  # (batch, 3, H, W)
        outputs = self.base(pixel_values=normalised, output_hidden_states=True)
        hints = {f"layer_{i}": state for i, state in enumerate(outputs.hidden_states)}
        return {"features": outputs.last_hidden_state[:, 0], **hints}  # (batch, dim)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.forward_features(pixel_values)["features"]
        return {name: head(features).float() for name, head in self.heads.items()}


class HuggingFaceSequenceModel(nn.Module):
    """A causal LM (task `next_token`, the LM head), a sequence classifier (task `label`) or a token
    classifier (task `token_label`) under the sequence contract.

    `"sequence"` is what a sequence-level head consumes: the pooler output where the model has a
    pooler (BERT), else the state at the last real token (GPT-2's classifier reads that token).
    Hints `layer_0` .. `layer_N` are the hidden states (batch, length, dim). Positions at or after
    `lengths[i]` are padding, masked out of attention, so they change no real position's value.
    """

    def __init__(self, model: Any, kind: str) -> None:
        super().__init__()
        self.model: nn.Module = model  # a transformers PreTrainedModel
        self.base: nn.Module = getattr(model, model.base_model_prefix)  # the backbone
        config = model.config
        task, level = TASKS[kind]
        head = model.get_output_embeddings() if kind == "causal_lm" else _classifier(model)
        if head is None:
            raise HuggingFaceLoadError(f"{type(model).__name__} has no output head")
        self.heads = nn.ModuleDict({task: head})
        self.task_levels = {task: level}
        # The ids the embedding reads, and the head's width (the vocabulary for a causal LM):
        # checked at load against config.json, which the served config was derived from.
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        self.head_classes = linears[-1].out_features if linears else 0
        self.max_length = int(
            getattr(config, "max_position_embeddings", None) or config.n_positions
        )

    def forward_features(
        self, input_ids: torch.Tensor, lengths: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device)
        attention_mask = (positions[None, :] < lengths[:, None]).long()  # (batch, length)
        outputs = self.base(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        )
        tokens = outputs.last_hidden_state  # (batch, length, dim)
        pooled = getattr(outputs, "pooler_output", None)
        if pooled is None:
            last = (lengths - 1).clamp(min=0)
            pooled = tokens[torch.arange(batch, device=tokens.device), last]  # (batch, dim)
        hints = {f"layer_{i}": state for i, state in enumerate(outputs.hidden_states)}
        return {"tokens": tokens, "sequence": pooled, **hints}

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.forward_features(input_ids, lengths)
        return {
            task: head(features[STATE_OF_LEVEL[self.task_levels[task]]]).float()
            for task, head in self.heads.items()
        }
