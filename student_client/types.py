"""The student side's own types: what a training script sends and gets back.

Arrays are numpy (zero-copy views of the received bytes where possible); `SoftTargets.tensor`
gives a torch view for the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # only named in `Event`; importing it at run time would pull in grpc
    from protocol.errors import TeacherError


def as_numpy(inputs: np.ndarray | torch.Tensor) -> np.ndarray:
    """A C-contiguous numpy array of the batch (torch tensors are moved to the CPU first)."""
    if isinstance(inputs, torch.Tensor):
        inputs = inputs.detach().cpu().numpy()
    return np.ascontiguousarray(inputs)


@dataclass(frozen=True)
class TargetOptions:
    """What to ask the teacher for, the same for every batch of a run.

    `model` None means the teacher's only (or first) model; `tasks` empty means all tasks;
    `temperature` T > 0; `output` is `probs`, `log_probs` or `logits`; `top_k` 0 means dense;
    `output_dtype` is `float32`, `float16` or `bfloat16`; `model_version` pins the teacher (a
    changed teacher then fails with FailedPrecondition instead of silently mixing two teachers).

    The defaults are the recommended training settings measured in docs/results.md (distillation
    evaluation): T = 4, the losses' default too, and float16 soft targets, which halve the bytes
    on the wire at no cost in accuracy that the evaluation could measure.
    `TeacherClient.soft_targets` (ad-hoc queries) keeps the protocol's T = 1 and float32.
    """

    model: str | None = None
    tasks: Sequence[str] = ()
    temperature: float = 4.0
    output: str = "probs"
    top_k: int = 0
    output_dtype: str = "float16"
    hints: Sequence[str] = ()
    model_version: str = ""
    tokenizer_hash: str = (
        ""  # sequence models: "sha256:<hex>" of the ids' tokenizer ("": unchecked)
    )
    # Sequence models' top-k answers: "packed" (ids at ceil(log2 V) bits, values without their
    # known sign bit, tail mass in `output_dtype`; docs/protocol.md "Packed top-k"), "tensors"
    # (the plain arrays), or "log_prob_codes" (8-bit log-prob codes, lossy: at most 1/32 nat).
    # Decoded to the same arrays either way; tensor (image) requests always use "tensors".
    top_k_encoding: str = "packed"


@dataclass(frozen=True)
class TokenBatch:
    """A batch of token-id sequences for a sequence model (`ModelInfo.input_kind == "tokens"`).

    `ids` is padded, (batch, L) with max(lengths) <= L (ids past a length are padding, never read),
    or packed, (sum(lengths),) with the sequences end to end; `lengths` is (batch,), each >= 1.
    `scored_ids` (optional) is (sum(lengths), m): ids of the caller's choosing per real token, in
    token-row order, at which every token-level task returns its log-probabilities
    (`TaskTargets.scored_values`). Integer arrays (int64 or int32).
    """

    ids: np.ndarray
    lengths: np.ndarray
    scored_ids: np.ndarray | None = None

    @classmethod
    def padded(cls, sequences: Sequence[Sequence[int]], pad_id: int = 0) -> TokenBatch:
        """A padded batch (batch, longest) of int64 ids from lists of ids."""
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        ids = np.full((len(sequences), int(lengths.max(initial=0))), pad_id, dtype=np.int64)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = sequence
        return cls(ids, lengths)

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def tokens(self) -> int:
        """Real tokens: the rows of a token-level answer."""
        return int(np.sum(self.lengths))

    def packed(self) -> TokenBatch:
        """The same batch packed: (sum(lengths),) ids, padding dropped."""
        if self.ids.ndim == 1:
            return self
        ids = np.concatenate([row[:n] for row, n in zip(self.ids, self.lengths, strict=True)])
        return TokenBatch(ids, self.lengths, self.scored_ids)

    def select(self, positions: Sequence[int]) -> TokenBatch:
        """The sequences at `positions` (in that order), packed; `scored_ids` must be None."""
        if self.scored_ids is not None:
            raise ValueError("select: a batch with scored_ids cannot be split by sequence")
        packed = self.packed()
        starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        chosen = [packed.ids[starts[p] : starts[p] + self.lengths[p]] for p in positions]
        ids = np.concatenate(chosen) if chosen else packed.ids[:0]
        return TokenBatch(ids, np.asarray(self.lengths)[list(positions)])


TeacherInputs = np.ndarray | TokenBatch
"""What one request carries: a tensor batch (image models) or a `TokenBatch` (sequence models)."""


@dataclass(frozen=True)
class TaskTargets:
    """One task's soft targets for a batch: dense `values` (batch, classes), or top-k `values` and
    `indices` (batch, k) with `tail_mass` (batch,) = the probability left outside the top k.

    A token-level task (`level == "token"`, sequence models) has one row per real token instead of
    one per sample, (sum(lengths), classes or k), split by `SoftTargets.lengths`; with scored ids it
    has `scored_values` (sum(lengths), m), the log-probabilities at T at those ids. Indices are
    int64 whatever their wire dtype (UINT8, UINT16, INT32)."""

    task: str
    kind: str
    values: np.ndarray
    indices: np.ndarray | None = None
    tail_mass: np.ndarray | None = None
    level: str = "sequence"
    scored_values: np.ndarray | None = None


@dataclass(frozen=True)
class SoftTargets:
    model: str
    model_version: str
    batch_id: str
    temperature: float
    outputs: dict[str, TaskTargets]
    hints: dict[str, np.ndarray] = field(default_factory=dict)
    lengths: np.ndarray | None = None  # sequence requests: (batch,) int64, splits token rows

    def tensor(self, task: str) -> torch.Tensor:
        """The task's values as a float32 torch tensor (batch, classes or k)."""
        return torch.from_numpy(
            np.array(self.outputs[task].values, dtype=np.float32)
        )  # a copy: the received bytes are read-only

    @property
    def batch_size(self) -> int:
        """Samples (sequences for a sequence model, not token rows)."""
        if self.lengths is not None:
            return int(self.lengths.shape[0])
        return int(next(iter(self.outputs.values())).values.shape[0])

    def split(self, task: str) -> list[np.ndarray]:
        """A token-level task's values, one (length_i, classes or k) view per sequence."""
        if self.lengths is None:
            raise ValueError(f"split: answer has no lengths (task {task!r} is not token-level)")
        ends = np.cumsum(self.lengths)[:-1]
        return np.split(self.outputs[task].values, ends)


@dataclass(frozen=True)
class TaskInfo:
    name: str
    class_names: tuple[str, ...]
    test_accuracy: float | None = None
    level: str = "sequence"  # "token": one row per real token (sequence models)
    num_classes: int = 0  # a vocabulary task has no class names: class i is token id i

    @property
    def classes(self) -> int:
        return self.num_classes or len(self.class_names)


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer a sequence model's ids come from (its file: `TeacherClient.tokenizer()`)."""

    file_name: str
    sha256: str  # "sha256:<hex>" of the file's bytes
    vocab_size: int
    special_ids: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenizerFile:
    """A downloaded tokenizer file, its SHA-256 checked against the teacher's."""

    file_name: str
    sha256: str
    content: bytes


@dataclass(frozen=True)
class ModelInfo:
    name: str
    model_version: str
    tasks: tuple[TaskInfo, ...]
    input_shape: tuple[int, ...]
    input_dtype: str
    accepted_input_dtypes: tuple[str, ...]
    uint8_scale: float
    hints: dict[str, tuple[int, ...]]
    max_batch_size: int
    description: str = ""
    parameter_count: int = 0
    input_kind: str = "tensor"  # "tokens": variable-length id sequences (send `TokenBatch`)
    max_length: int = 0  # tokens: the longest sequence
    vocab_size: int = 0  # tokens: ids in [0, vocab_size)
    max_batch_tokens: int = 0  # tokens: real tokens the teacher merges into one forward (0: none)
    tokenizer: TokenizerInfo | None = None
    held_out_metrics: dict[str, float] = field(default_factory=dict)

    def task(self, name: str) -> TaskInfo:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"model {self.name!r} has no task {name!r}")


@dataclass(frozen=True)
class ModelSummary:
    """One served version of a model, or a model folder the teacher failed to load."""

    name: str
    model_version: str
    ready: bool
    default_version: bool = False
    error: str = ""
    label: str = ""


def as_token_batch(item: Any) -> tuple[TokenBatch, Any]:
    """A source item as `(TokenBatch, labels)`: the item is a `TokenBatch`, `(TokenBatch,
    labels)`, `(ids, lengths)` or `(ids, lengths, labels)` (ids padded or packed; numpy or
    torch)."""
    if isinstance(item, TokenBatch):
        return item, None
    if isinstance(item, (tuple, list)):
        if item and isinstance(item[0], TokenBatch):
            return item[0], item[1] if len(item) > 1 else None
        if len(item) in (2, 3):
            ids, lengths = _integers(item[0], "ids"), _integers(item[1], "lengths")
            return TokenBatch(ids, lengths), item[2] if len(item) == 3 else None
    raise TypeError(
        "batches: expected a TokenBatch, (TokenBatch, labels), (ids, lengths) or "
        f"(ids, lengths, labels), got {type(item).__name__}"
    )


def _integers(value: Any, field: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    array = np.ascontiguousarray(value)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{field}: expected integers, got dtype {array.dtype}")
    return array if array.dtype in (np.int64, np.int32) else array.astype(np.int64)


Event = tuple[object, str | None, "SoftTargets | TeacherError"]
"""What a stream reports to its loader: (tag, batch_id, answer). A `None` batch id means the stream
itself broke, with the error as the answer."""
