"""The default sequence teacher: a small causal transformer trained on the Python docs it ships with.

Corpus: `pydoc_data.topics.topics`, the ~80 documents of the Language Reference that `help()`
shows (~465 KB of real English; every Python has it, so nothing is downloaded; its content follows
the running Python's version). Split BY DOCUMENT, fixed and seeded: within each topic group (below)
the sorted document names are permuted with `SPLIT_SEED` and a fifth (at least one) is held out,
so held-out figures are on documents the teacher and its tokenizer never saw.

Tokenizer: byte-level BPE (Hugging Face `tokenizers`) trained on the training documents only,
4,096 ids (so top-k matters): `<pad>` 0, `<bos>` 1, `<eos>` 2; byte-level, so no unknown token.
Sequences: each document is `encode(text) + [eos]`, cut into windows of `max_length` tokens; each
window is `[bos] + window`, the model reads all but its last id and predicts each next one.

Tasks: `next_token` (token-level, the vocabulary) and `topic_group` (sequence-level, on the state at
the last real token): which group of documents a window comes from, derived from the standard
library itself: `statement` if `pydoc.Helper.keywords` opens that document for a Python keyword,
`builtin_type` if its name starts with `types` or `bltin-` (the built-in types chapter), else
`language` (expressions, data model, execution model). Why this one: the labels are real and
deterministic, need no annotation, and generalise across documents (a held-out document's group
is learnable from how it is written), which "which document" would not under a by-document split.

Held-out figures, logged and stored in config.json: perplexity per real token (every target of
every held-out window, padding excluded; a window's first target sees only `<bos>`), and the
accuracy of `topic_group` over held-out windows.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from teacher_server.models.causal_transformer import CausalTransformer
from teacher_server.repository.model_config import (
    ModelConfig,
    TaskConfig,
    TokenizerConfig,
    file_sha256,
)
from teacher_server.repository.store import save_model

log = logging.getLogger(__name__)

DEFAULT_SEQUENCE_MODEL_NAME = "pydoc-causal-lm"
TOKENIZER_FILE = "tokenizer.json"
SPLIT_SEED = 20240617
HELD_OUT_FRACTION = 0.2
SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>"}
GROUPS = ("statement", "builtin_type", "language")
LM_TASK, GROUP_TASK = "next_token", "topic_group"


@dataclass(frozen=True)
class Recipe:
    """What a training run uses: the full default, or `SMALL` for tests (seconds)."""

    vocab_size: int = 4096
    max_length: int = 128
    dim: int = 128
    layers: int = 2
    attention_heads: int = 4
    dropout: float = 0.1
    steps: int = 400
    batch_size: int = 16
    learning_rate: float = 3e-3
    group_loss_weight: float = 0.5


SMALL = Recipe(vocab_size=512, max_length=32, dim=32, layers=1, steps=30, batch_size=16)


def topic_group(name: str) -> str:
    import pydoc

    keyword_documents = {
        target if isinstance(target, str) else target[0]
        for target in pydoc.Helper.keywords.values()
    }
    if name in keyword_documents:
        return "statement"
    if name.startswith(("types", "bltin-")):
        return "builtin_type"
    return "language"


def corpus_split() -> tuple[dict[str, str], dict[str, str]]:
    """(train, held_out) documents by name: the fixed, seeded split by document, per group."""
    from pydoc_data.topics import topics

    train: dict[str, str] = {}
    held_out: dict[str, str] = {}
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    for group in GROUPS:
        names = sorted(n for n in topics if topic_group(n) == group)
        order = torch.randperm(len(names), generator=generator).tolist()
        n_held = max(1, round(HELD_OUT_FRACTION * len(names)))
        for rank, index in enumerate(order):
            (held_out if rank < n_held else train)[names[index]] = topics[names[index]]
    return train, held_out


def train_tokenizer(documents: list[str], vocab_size: int) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` with the special tokens at ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


def windows(
    tokenizer: Any, documents: dict[str, str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (n, max_length + 1) padded with `<pad>`, lengths (n,) of real ids, groups (n,)): each
    row is `[bos]` + up to `max_length` ids of one document; inputs are `ids[:, :-1]`, targets
    `ids[:, 1:]`, real targets where position < lengths - 1."""
    bos, eos = tokenizer.token_to_id("<bos>"), tokenizer.token_to_id("<eos>")
    rows, groups = [], []
    for name, text in documents.items():
        ids = [*tokenizer.encode(text).ids, eos]
        for begin in range(0, len(ids), max_length):
            rows.append([bos, *ids[begin : begin + max_length]])
            groups.append(GROUPS.index(topic_group(name)))
    padded = torch.zeros(len(rows), max_length + 1, dtype=torch.long)  # <pad> is id 0
    for i, row in enumerate(rows):
        padded[i, : len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(row) for row in rows])
    return padded, lengths, torch.tensor(groups)


def evaluate(
    model: CausalTransformer, ids: torch.Tensor, lengths: torch.Tensor, groups: torch.Tensor
) -> dict[str, float]:
    """Held-out perplexity per real token and `topic_group` accuracy over windows."""
    model.eval()
    total_loss, total_tokens, correct = 0.0, 0, 0
    with torch.inference_mode():
        for begin in range(0, len(ids), 64):
            batch, batch_lengths = ids[begin : begin + 64], lengths[begin : begin + 64] - 1
            outputs = model(batch[:, :-1], batch_lengths)
            real = torch.arange(batch.shape[1] - 1)[None] < batch_lengths[:, None]
            losses = F.cross_entropy(
                outputs[LM_TASK].transpose(1, 2), batch[:, 1:], reduction="none"
            )  # (batch, length)
            total_loss += float(losses[real].sum())
            total_tokens += int(real.sum())
            predicted = outputs[GROUP_TASK].argmax(1)
            correct += int((predicted == groups[begin : begin + 64]).sum())
    return {
        "perplexity": math.exp(total_loss / total_tokens),
        "topic_group_accuracy": correct / len(ids),
        "tokens": float(total_tokens),
        "windows": float(len(ids)),
    }


def train_default_sequence_teacher(
    out_dir: Path, *, small: bool = False, seed: int = 0
) -> dict[str, float]:
    """Train the default sequence teacher into `out_dir` (config.json, model.safetensors,
    tokenizer.json) and return its held-out metrics. `small`: a tiny model, seconds (tests)."""
    recipe = SMALL if small else Recipe()
    start = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_docs, held_out_docs = corpus_split()
    tokenizer = train_tokenizer(list(train_docs.values()), recipe.vocab_size)
    vocab_size = tokenizer.get_vocab_size()
    train_ids, train_lengths, train_groups = windows(tokenizer, train_docs, recipe.max_length)
    test_ids, test_lengths, test_groups = windows(tokenizer, held_out_docs, recipe.max_length)
    log.info(
        "sequence teacher: %d train documents (%d windows), %d held out (%d windows); "
        "tokenizer of %d ids (%.1fs)",
        len(train_docs),
        len(train_ids),
        len(held_out_docs),
        len(test_ids),
        vocab_size,
        time.perf_counter() - start,
    )
    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size,
        "max_length": recipe.max_length,
        "dim": recipe.dim,
        "layers": recipe.layers,
        "attention_heads": recipe.attention_heads,
        "positions": "rotary",
        "lm_task": LM_TASK,
    }
    tasks = {LM_TASK: vocab_size, GROUP_TASK: len(GROUPS)}
    model = CausalTransformer(tasks, dropout=recipe.dropout, **kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, recipe.learning_rate, total_steps=recipe.steps, pct_start=0.1
    )
    order = torch.randperm(len(train_ids), generator=generator)
    cursor = 0
    for step in range(1, recipe.steps + 1):
        model.train()
        if cursor + recipe.batch_size > len(order):
            order, cursor = torch.randperm(len(train_ids), generator=generator), 0
        index = order[cursor : cursor + recipe.batch_size]
        cursor += recipe.batch_size
        lengths = train_lengths[index] - 1
        longest = int(lengths.max())
        batch = train_ids[index, : longest + 1]
        outputs = model(batch[:, :-1], lengths)
        real = torch.arange(longest)[None] < lengths[:, None]
        lm_loss = F.cross_entropy(outputs[LM_TASK][real], batch[:, 1:][real])
        group_loss = F.cross_entropy(outputs[GROUP_TASK], train_groups[index])
        loss = lm_loss + recipe.group_loss_weight * group_loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % max(1, recipe.steps // 10) == 0 or step == recipe.steps:
            log.info(
                "sequence teacher: step %d/%d, next_token loss %.3f, topic_group loss %.3f (%.0fs)",
                step,
                recipe.steps,
                lm_loss.item(),
                group_loss.item(),
                time.perf_counter() - start,
            )
    metrics = evaluate(model, test_ids, test_lengths, test_groups)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / TOKENIZER_FILE))
    config = ModelConfig(
        name=out_dir.name,
        description=(
            "Default sequence teacher: a causal transformer on the Python docs in "
            f"pydoc_data.topics (split by document, seed {SPLIT_SEED})"
        ),
        architecture="teacher_server.models.causal_transformer:CausalTransformer",
        kwargs=kwargs,
        tasks=(
            TaskConfig(LM_TASK, (), level="token", num_classes=vocab_size),
            TaskConfig(GROUP_TASK, GROUPS, round(metrics["topic_group_accuracy"], 4)),
        ),
        input_shape=(recipe.max_length,),
        input_dtype="int64",
        uint8_scale=1.0,
        hints=tuple(f"layer_{i}" for i in range(1, recipe.layers + 1)),
        max_value=vocab_size,
        input_kind="tokens",
        tokenizer=TokenizerConfig(
            TOKENIZER_FILE,
            file_sha256((out_dir / TOKENIZER_FILE).read_bytes()),
            vocab_size,
            {role: tokenizer.token_to_id(token) for role, token in SPECIAL_TOKENS.items()},
        ),
        held_out_metrics={
            "perplexity": round(metrics["perplexity"], 3),
            "topic_group_accuracy": round(metrics["topic_group_accuracy"], 4),
            "tokens": metrics["tokens"],
        },
        extra={
            "training": {
                "seed": seed,
                "split_seed": SPLIT_SEED,
                "steps": recipe.steps,
                "batch_size": recipe.batch_size,
                "train_documents": sorted(train_docs),
                "held_out_documents": sorted(held_out_docs),
                "seconds": round(time.perf_counter() - start, 1),
            }
        },
    )
    save_model(out_dir, config, model)
    log.info(
        "sequence teacher saved to %s in %.0fs; held-out perplexity %.2f (uniform: %d), "
        "topic_group accuracy %.4f",
        out_dir,
        time.perf_counter() - start,
        metrics["perplexity"],
        vocab_size,
        metrics["topic_group_accuracy"],
    )
    return metrics
