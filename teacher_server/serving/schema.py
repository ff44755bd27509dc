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


@dataclass(frozen=True)
class ValidatedRequest:
    """A request the core accepted: tasks resolved, inputs of an accepted dtype and shape."""

    request: SoftTargetsRequest
    tasks: tuple[str, ...]
    inputs: np.ndarray  # (batch, *input_shape): float32, float16, uint8 or int64

    @property
    def batch_size(self) -> int:
        return int(self.inputs.shape[0])


@dataclass(frozen=True)
class TaskResult:
    """One task's soft targets for a batch.

    Dense: `values` (batch, classes). Top-k: `values` (batch, k) sorted descending, `indices`
    (batch, k) int64, and for probs/log_probs `tail_mass` (batch,) float32 = 1 - sum of the top-k
    probabilities. `values` is float32, or float16 / bfloat16-rounded float32 as requested.
    """

    task: str
    kind: str
    values: np.ndarray
    indices: np.ndarray | None = None
    tail_mass: np.ndarray | None = None
    classes: int = 0  # the task's number of classes


@dataclass(frozen=True)
class SoftTargets:
    model: str
    model_version: str
    batch_id: str
    temperature: float
    output_dtype: str
    outputs: tuple[TaskResult, ...]
    hints: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (batch, *hint_shape)


@dataclass(frozen=True)
class TaskInfo:
    name: str
    class_names: tuple[str, ...]
    test_accuracy: float | None


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
