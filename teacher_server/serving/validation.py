"""Validation of soft-target requests, done once for every transport.

Each failure is an `InvalidArgument` / `NotFound` / `FailedPrecondition` whose message names the
field and the value, e.g. `inputs.shape: expected [N, 1, 28, 28], got [4, 784]`.
"""

from __future__ import annotations

import math

import numpy as np

from protocol.errors import FailedPrecondition, InvalidArgument
from teacher_server.serving.schema import (
    OUTPUT_DTYPES,
    OUTPUT_KINDS,
    ModelInfo,
    SoftTargetsRequest,
    ValidatedRequest,
)

MAX_BATCH_ID_LENGTH = 128


def validate(request: SoftTargetsRequest, info: ModelInfo) -> ValidatedRequest:
    """Check `request` against the model described by `info`; return it with tasks resolved."""
    if request.model_version and request.model_version != info.model_version:
        raise FailedPrecondition(
            f"model_version: pinned {request.model_version!r} but model {info.name!r} is serving "
            f"{info.model_version!r}",
            "model_version",
        )
    if len(request.batch_id) > MAX_BATCH_ID_LENGTH:
        raise InvalidArgument(
            f"batch_id: at most {MAX_BATCH_ID_LENGTH} characters, got {len(request.batch_id)}",
            "batch_id",
        )
    task_names = tuple(task.name for task in info.tasks)
    tasks = request.tasks or task_names
    unknown = [task for task in tasks if task not in task_names]
    if unknown:
        raise InvalidArgument(
            f"tasks: unknown task {unknown[0]!r}; model {info.name!r} has {list(task_names)}",
            "tasks",
        )
    if len(set(tasks)) != len(tasks):
        raise InvalidArgument(f"tasks: listed twice in {list(tasks)}", "tasks")
    temperature = request.temperature
    if not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise InvalidArgument(
            f"temperature: must be a finite number > 0, got {temperature!r}", "temperature"
        )
    if request.output not in OUTPUT_KINDS:
        raise InvalidArgument(
            f"output: unknown output kind {request.output!r}; expected one of {list(OUTPUT_KINDS)}",
            "output",
        )
    if request.output_dtype not in OUTPUT_DTYPES:
        raise InvalidArgument(
            f"output_dtype: {request.output_dtype!r} is not one of {list(OUTPUT_DTYPES)}",
            "output_dtype",
        )
    classes = {task.name: len(task.class_names) for task in info.tasks}
    smallest = min(classes[task] for task in tasks)
    if not 0 <= request.top_k <= smallest:
        raise InvalidArgument(
            f"top_k: must be between 0 (dense) and {smallest} (the fewest classes of the requested "
            f"tasks), got {request.top_k}",
            "top_k",
        )
    if len(set(request.hints)) != len(request.hints):
        raise InvalidArgument(f"hints: listed twice in {list(request.hints)}", "hints")
    unknown_hints = [hint for hint in request.hints if hint not in info.hints]
    if unknown_hints:
        raise InvalidArgument(
            f"hints: unknown hint {unknown_hints[0]!r}; model {info.name!r} has {list(info.hints)}",
            "hints",
        )
    return ValidatedRequest(
        request=request, tasks=tuple(tasks), inputs=_validate_inputs(request, info)
    )


def _validate_inputs(request: SoftTargetsRequest, info: ModelInfo) -> np.ndarray:
    inputs = request.inputs
    dtype = inputs.dtype.name
    if dtype not in info.accepted_input_dtypes:
        raise InvalidArgument(
            f"inputs.dtype: model {info.name!r} accepts {list(info.accepted_input_dtypes)}, got {dtype}",
            "inputs.dtype",
        )
    expected = ["N", *info.input_shape]
    if inputs.ndim != len(expected) or tuple(inputs.shape[1:]) != info.input_shape:
        raise InvalidArgument(
            f"inputs.shape: expected [{', '.join(map(str, expected))}], got {list(inputs.shape)}",
            "inputs.shape",
        )
    batch = inputs.shape[0]
    if batch < 1:
        raise InvalidArgument(
            "inputs.shape: empty batch (N = 0); send at least one sample", "inputs.shape"
        )
    if batch > info.max_batch_size:
        raise InvalidArgument(
            f"inputs.shape: batch of {batch} is above the maximum of {info.max_batch_size}; split it",
            "inputs.shape",
        )
    if inputs.dtype.kind in "iu" and info.max_value is not None and inputs.size:
        bad = (inputs < 0) | (inputs >= info.max_value)
        if bad.any():
            position = [int(i) for i in np.argwhere(bad)[0]]
            raise InvalidArgument(
                f"inputs: token id {int(inputs[tuple(position)])} at index {position} is outside "
                f"[0, {info.max_value}) for model {info.name!r}",
                "inputs",
            )
    if inputs.dtype.kind == "f":
        finite = np.isfinite(inputs)
        if not finite.all():
            where = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise InvalidArgument(
                f"inputs: value {inputs[where]} at index {list(where)} is not finite", "inputs"
            )
    return inputs
