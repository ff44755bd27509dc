"""The student side's own types: what a training script sends and gets back.

Arrays are numpy (zero-copy views of the received bytes where possible); `SoftTargets.tensor`
gives a torch view for the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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


@dataclass(frozen=True)
class TaskTargets:
    """One task's soft targets for a batch: dense `values` (batch, classes), or top-k `values` and
    `indices` (batch, k) with `tail_mass` (batch,) = the probability left outside the top k."""

    task: str
    kind: str
    values: np.ndarray
    indices: np.ndarray | None = None
    tail_mass: np.ndarray | None = None


@dataclass(frozen=True)
class SoftTargets:
    model: str
    model_version: str
    batch_id: str
    temperature: float
    outputs: dict[str, TaskTargets]
    hints: dict[str, np.ndarray] = field(default_factory=dict)

    def tensor(self, task: str) -> torch.Tensor:
        """The task's values as a float32 torch tensor (batch, classes or k)."""
        return torch.from_numpy(
            np.array(self.outputs[task].values, dtype=np.float32)
        )  # a copy: the received bytes are read-only

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.outputs.values())).values.shape[0])


@dataclass(frozen=True)
class TaskInfo:
    name: str
    class_names: tuple[str, ...]
    test_accuracy: float | None = None


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


Event = tuple[object, str | None, "SoftTargets | TeacherError"]
"""What a stream reports to its loader: (tag, batch_id, answer). A `None` batch id means the stream
itself broke, with the error as the answer."""
