"""The default sequence teacher's text, split and chunked the way the teacher was trained.

The corpus is `pydoc_data.topics.topics` (the Python docs `help()` shows; shipped with every
Python, so nothing is downloaded). The split is BY DOCUMENT, fixed and seeded, and mirrors
`teacher_server.repository.default_sequence_teacher.corpus_split` (which this package may not
import): per topic group, the sorted names are permuted with `SEQUENCE_SPLIT_SEED` by torch's
generator and a fifth (at least one) is held out. So a student's held-out documents were never
seen by the teacher nor by its tokenizer. `check_split` compares the result with the document
lists the teacher wrote into its `config.json` (the corpus follows the running Python's version:
a teacher trained under another Python may have another split).

Windows as the teacher's: each document is `encode(text) + [<eos>]`, cut into pieces of
`max_length` ids, each prefixed with `<bos>`; a model reads all but a window's last id and
predicts each next one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from student_client.types import TokenBatch

# Must equal teacher_server.repository.default_sequence_teacher's constants.
DEFAULT_SEQUENCE_MODEL_NAME = "pydoc-causal-lm"
SEQUENCE_SPLIT_SEED = 20240617
HELD_OUT_FRACTION = 0.2
GROUPS = ("statement", "builtin_type", "language")
LM_TASK = "next_token"


def topic_group(name: str) -> str:
    """`statement` (a document `help()` opens for a keyword), `builtin_type`, or `language`."""
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


def pydoc_split() -> tuple[dict[str, str], dict[str, str]]:
    """(train, held_out) documents by name: the teacher's split by document."""
    from pydoc_data.topics import topics

    train: dict[str, str] = {}
    held_out: dict[str, str] = {}
    generator = torch.Generator().manual_seed(SEQUENCE_SPLIT_SEED)
    for group in GROUPS:
        names = sorted(n for n in topics if topic_group(n) == group)
        order = torch.randperm(len(names), generator=generator).tolist()
        n_held = max(1, round(HELD_OUT_FRACTION * len(names)))
        for rank, index in enumerate(order):
            (held_out if rank < n_held else train)[names[index]] = topics[names[index]]
    return train, held_out


def check_split(config_file: Path, train: dict[str, str], held_out: dict[str, str]) -> None:
    """Raise `ValueError` unless the teacher's `config.json` lists the same documents (a config
    without the lists, e.g. another teacher's, is not checked)."""
    training = json.loads(config_file.read_text()).get("training", {})
    for field, documents in (("train_documents", train), ("held_out_documents", held_out)):
        if field in training and sorted(training[field]) != sorted(documents):
            raise ValueError(
                f"{config_file}: training.{field} differs from the student's split "
                f"({len(training[field])} vs {len(documents)} documents): the teacher was trained "
                "on another corpus (another Python version?)"
            )


@dataclass(frozen=True)
class Windows:
    """`ids` (n, max_length + 1) int64 padded with `<pad>` (0); `lengths` (n,) real ids, >= 2."""

    ids: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def predicted_tokens(self) -> int:
        """Real next-token targets: every id of a window but its first."""
        return int((self.lengths - 1).sum())

    def batch(self, rows: np.ndarray) -> tuple[TokenBatch, np.ndarray]:
        """The model's inputs for `rows` (all but each window's last id, padded to the longest)
        and the next-token targets, packed (sum(lengths),) int64 in token-row order."""
        lengths = self.lengths[rows] - 1  # (batch,)
        longest = int(lengths.max())
        ids = self.ids[rows, : longest + 1]  # (batch, longest + 1)
        real = np.arange(longest)[None] < lengths[:, None]  # (batch, longest)
        return TokenBatch(np.ascontiguousarray(ids[:, :-1]), lengths), ids[:, 1:][real]


@dataclass(frozen=True)
class TextSplit:
    train: Windows
    held_out: Windows
    train_documents: int
    held_out_documents: int
    vocab_size: int


def windows(tokenizer_file: Path, documents: dict[str, str], max_length: int) -> Windows:
    """`documents` encoded with the `tokenizers` file and cut as the teacher cuts them."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    bos, eos = tokenizer.token_to_id("<bos>"), tokenizer.token_to_id("<eos>")
    if bos is None or eos is None:
        raise ValueError(f"{tokenizer_file}: expected <bos> and <eos> tokens")
    rows: list[list[int]] = []
    for text in documents.values():
        ids = [*tokenizer.encode(text).ids, eos]
        for begin in range(0, len(ids), max_length):
            rows.append([bos, *ids[begin : begin + max_length]])
    padded = np.zeros((len(rows), max_length + 1), dtype=np.int64)  # <pad> is id 0
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
    return Windows(padded, np.array([len(row) for row in rows], dtype=np.int64))


def pydoc_text_split(
    tokenizer_file: Path, max_length: int, config_file: Path | None = None
) -> TextSplit:
    """The teacher's split of the Python docs as windows of its tokenizer's ids, checked against
    its `config_file` when given."""
    from tokenizers import Tokenizer

    train, held_out = pydoc_split()
    if config_file is not None:
        check_split(config_file, train, held_out)
    return TextSplit(
        windows(tokenizer_file, train, max_length),
        windows(tokenizer_file, held_out, max_length),
        len(train),
        len(held_out),
        Tokenizer.from_file(str(tokenizer_file)).get_vocab_size(),
    )


def shuffled_windows(count: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Row indices of `count` windows in batches of `batch_size`, in a seeded order."""
    order = np.random.default_rng(seed).permutation(count)
    for start in range(0, count, batch_size):
        yield order[start : start + batch_size]
