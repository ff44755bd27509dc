"""The core's request, result and model-info types: plain dataclasses both doors convert to and from.

Transports convert their messages (protobuf, JSON) into these at the edge and back, once.
Arrays are numpy; shapes are noted per field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import numpy as np

OUTPUT_KINDS: Final = ("probs", "log_probs", "logits")
OUTPUT_DTYPES: Final = ("float32", "float16", "bfloat16")
# How top-k outputs travel: Tensors, packed (protocol.packed), packed with 8-bit log-prob codes.
TOP_K_ENCODINGS: Final = ("tensors", "packed", "log_prob_codes")
TASK_LEVELS: Final = ("sequence", "token")  # one row per sample / one row per real token


@dataclass(frozen=True)
class SoftTargetsRequest:
    """A request as a transport decoded it, before validation (see `teacher_server.serving.validation`)."""

    model: str
    inputs: np.ndarray  # (batch, *input_shape), any dtype the transport produced
    tasks: tuple[str, ...] = ()  # empty: every task of the model
    temperature: float = 1.0
    output: str = "probs"
    batch_id: str = ""
    model_version: str = ""  # non-empty: pin
    top_k: int = 0  # 0: dense
    output_dtype: str = "float32"
    hints: tuple[str, ...] = ()
    # Sequence models only. `lengths` (batch,) integers: the real length of each sequence; then
    # `inputs` is either padded ids (batch, L) with every length <= L (what lies past a length is
    # padding and never reaches a result), or packed ids (sum(lengths),), the sequences end to end.
    lengths: np.ndarray | None = None
    # (tokens, m) integers, tokens = sum(lengths): per real position, in sequence order, m ids of
    # the student's choosing whose log-probabilities at T each token-level task returns.
    scored_ids: np.ndarray | None = None
    tokenizer_hash: str = ""  # non-empty: the ids came from this tokenizer (`sha256:...`)
    top_k_encoding: str = "tensors"  # one of TOP_K_ENCODINGS; only top-k outputs change


@dataclass(frozen=True)
class ValidatedRequest:
    """A request the core accepted: tasks resolved, inputs of an accepted dtype and shape.

    Sequence requests arrive here padded: `inputs` (batch, L) int64 with the model's pad id past
    each length, `lengths` (batch,) int64, `scored_ids` (tokens, m) int64 or None."""

    request: SoftTargetsRequest
    tasks: tuple[str, ...]
    inputs: np.ndarray  # (batch, *input_shape): float32, float16, uint8 or int64
    lengths: np.ndarray | None = None
    scored_ids: np.ndarray | None = None

    @property
    def batch_size(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def tokens(self) -> int:
        """Real tokens (sequence requests), else rows: what a token budget counts."""
        return int(self.lengths.sum()) if self.lengths is not None else self.batch_size


@dataclass(frozen=True)
class TaskResult:
    """One task's soft targets for a batch.

    Dense: `values` (rows, classes). Top-k: `values` (rows, k) sorted descending, `indices`
    (rows, k) int64, and for probs/log_probs `tail_mass` (rows,) float32 = 1 - sum of the top-k
    probabilities. `values` is float32, or float16 / bfloat16-rounded float32 as requested.
    Rows are the batch's samples for a `sequence`-level task, and its real tokens (sequence 0's
    positions, then sequence 1's, ...) for a `token`-level task. `scored_values` (tokens, m):
    the log-probabilities at T of the request's `scored_ids` (token-level tasks only).
    """

    task: str
    kind: str
    values: np.ndarray
    indices: np.ndarray | None = None
    tail_mass: np.ndarray | None = None
    classes: int = 0  # the task's number of classes
    level: str = "sequence"
    scored_values: np.ndarray | None = None


@dataclass(frozen=True)
class SoftTargets:
    model: str
    model_version: str
    batch_id: str
    temperature: float
    output_dtype: str
    outputs: tuple[TaskResult, ...]
    hints: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (batch, *hint_shape)
    lengths: np.ndarray | None = None  # sequence requests: (batch,) int64, to split token rows
    # The request's: how the doors encode top-k outputs. With "log_prob_codes" a top-k task's
    # `values` are uint8 codes (protocol.packed.log_prob_codes), not floats.
    top_k_encoding: str = "tensors"


@dataclass(frozen=True)
class TaskInfo:
    name: str
    class_names: tuple[str, ...]  # may be empty for a token-level task (e.g. a vocabulary)
    test_accuracy: float | None
    level: str = "sequence"
    num_classes: int = 0  # 0: len(class_names)


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer a sequence model's ids come from; its file is served beside the model."""

    file_name: str  # e.g. "tokenizer.json"
    sha256: str  # "sha256:<hex>" of the file's bytes
    vocab_size: int  # ids the tokenizer defines (the model's head may have more rows)
    special_ids: dict[str, int]  # e.g. {"pad": 0, "bos": 1, "eos": 2}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    model_version: str
    tasks: tuple[TaskInfo, ...]
    input_shape: tuple[int, ...]
    input_dtype: str
    accepted_input_dtypes: tuple[str, ...]
    uint8_scale: float
    hints: dict[str, tuple[int, ...]]  # name -> per-sample shape
    max_batch_size: int
    description: str
    parameter_count: int
    ready: bool
    max_value: int | None = None  # token models: ids must be < max_value
    members: tuple[str, ...] = ()  # ensembles: member model names
    input_kind: str = "tensor"  # "tensor": fixed shape; "tokens": variable-length id sequences
    max_length: int = 0  # tokens: the longest sequence accepted
    vocab_size: int = 0  # tokens: ids accepted, [0, vocab_size)
    max_batch_tokens: int = 0  # tokens: real tokens merged into one forward at most
    tokenizer: TokenizerInfo | None = None
    held_out_metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class VersionSummary:
    """One served version of a model (or a model folder that failed to load: `error` set)."""

    name: str
    model_version: str
    ready: bool
    default_version: bool = False
    error: str = ""
    label: str = ""  # the version's subfolder name, e.g. "2"; "" for a model without subfolders


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did: the model's versions now, and the versions loaded and unloaded."""

    model: str
    versions: tuple[VersionSummary, ...]
    loaded: tuple[str, ...]
    unloaded: tuple[str, ...]
